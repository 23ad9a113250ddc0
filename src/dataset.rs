//! Training data (paper section 3.1): DRRs of each CT at random C-arm poses (±45° about each
//! axis around AP, ±50 mm, SDD 1020 mm, a 768 px detector seen at the training resolution), with
//! the 8 projected landmarks and the pose of every image.
//!
//! On disk (`DIR/`):
//! - `manifest.json`: what was generated (CTs, their 3D landmarks, camera, seed, realism): a
//!   resumed run must ask for the same thing;
//! - `images/*.png`: 16-bit PNG, min-max scaled line integrals (the model normalises per image
//!   by quantiles, which a min-max scaling does not change);
//! - `labels.jsonl`: one [`Sample`] per line, appended as images are finished (so an
//!   interrupted run resumes where it stopped).
//!
//! Splits as the paper's: `train` views of training subjects, `novel-view` extra views of the
//! same subjects, `novel-subject` views of held-out subjects.

use crate::drr::{AnyDrr, DrrSource};
use crate::drr::{Attenuation, DensityVolume};
use crate::geometry::sampling::PoseRange;
use crate::geometry::{Camera, Pose};
use crate::landmarks::{Landmarks3d, N_LANDMARKS};
use crate::model::noise::gaussian_blur;
use crate::stream::simulated::QuantumNoise;
use crate::task::{Cancelled, Task};
use nalgebra::{Point2, Point3};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors of dataset generation and loading.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A manifest or label that does not parse, or a request that cannot be met.
    #[error("{0}")]
    Invalid(String),
    /// The work was cancelled (what is written so far is kept and resumable).
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.into(),
        source,
    }
}

/// Which evaluation split an image belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// Training views of training subjects.
    Train,
    /// New views of training subjects.
    NovelView,
    /// Views of held-out subjects.
    NovelSubject,
}

impl Split {
    /// Parses `train`, `novel-view`, `novel-subject`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "train" => Some(Self::Train),
            "novel-view" => Some(Self::NovelView),
            "novel-subject" => Some(Self::NovelSubject),
            _ => None,
        }
    }
}

/// Fluoroscopy realism applied to the clean DRR (all off = the paper's clean DiffDRR images).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Realism {
    /// Photons per pixel for Poisson quantum noise; 0 = none.
    pub photons: f64,
    /// With `0 < photons_min < photons`, each image's dose is drawn log-uniformly between the
    /// two instead: fluoroscopy runs at a tenth of a radiograph's dose and less, and a network
    /// that saw one dose reads a lower one badly. 0 = every image at `photons`.
    #[serde(default)]
    pub photons_min: f64,
    /// Gaussian blur sigma, pixels at the stored size; 0 = none.
    pub blur_px: f64,
    /// Random gamma in `[1/(1+g), 1+g]` on the normalised image; 0 = none.
    pub gamma: f64,
    /// Probability of a circular collimator edge (outside is set to the background).
    pub collimation: f64,
}

impl Default for Realism {
    fn default() -> Self {
        Self {
            photons: 0.0,
            photons_min: 0.0,
            blur_px: 0.0,
            gamma: 0.0,
            collimation: 0.0,
        }
    }
}

impl Realism {
    /// Applies the options to a line-integral image in place.
    pub fn apply(&self, img: &mut Vec<f32>, size: usize, rng: &mut impl rand::Rng) {
        if self.photons > 0.0 {
            // Drawn only for a dose range, so that fixed-dose datasets render as they always did.
            let photons = if self.photons_min > 0.0 && self.photons_min < self.photons {
                rng.random_range(self.photons_min.ln()..=self.photons.ln())
                    .exp()
            } else {
                self.photons
            };
            *img = QuantumNoise {
                photons_per_pixel: photons,
            }
            .apply(img, rng);
        }
        if self.blur_px > 0.0 {
            gaussian_blur(img, size, size, self.blur_px);
        }
        if self.gamma > 0.0 || self.collimation > 0.0 {
            let (lo, hi) = img
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
                    (a.min(*v), b.max(*v))
                });
            let span = (hi - lo).max(1e-12);
            if self.gamma > 0.0 {
                let g = 1.0 + self.gamma;
                let e: f64 = rng.random_range(-g.ln()..=g.ln());
                let gamma = e.exp() as f32;
                for v in img.iter_mut() {
                    *v = lo + span * ((*v - lo) / span).clamp(0.0, 1.0).powf(gamma);
                }
            }
            if self.collimation > 0.0 && rng.random_range(0.0..1.0) < self.collimation {
                let r: f64 = rng.random_range(0.42..0.6) * size as f64;
                let c = (size as f64 - 1.0) / 2.0;
                for y in 0..size {
                    for x in 0..size {
                        if ((x as f64 - c).powi(2) + (y as f64 - c).powi(2)).sqrt() > r {
                            img[y * size + x] = hi;
                        }
                    }
                }
            }
        }
    }
}

/// One CT of the dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    /// Short name used in image file names.
    pub name: String,
    /// Where the CT comes from (`phantom:N` or a path).
    pub ct: String,
    /// Held out (novel-subject) or training.
    pub held_out: bool,
    /// The 8 landmarks, LPS mm; `None` for one the CT does not hold (a scan that ends above
    /// the symphysis): its images label it absent, like a landmark outside the image.
    pub landmarks3d: [Option<[f64; 3]>; N_LANDMARKS],
    /// The isocentre the poses are drawn around, LPS mm: a phantom's volume centre, a CT file's
    /// landmarks' centroid.
    pub isocenter: [f64; 3],
}

impl Subject {
    /// Loads the CT the images were rendered from.
    pub fn volume(&self) -> Result<crate::volume::Volume, DatasetError> {
        Ok(read_ct(&self.ct)?.0)
    }

    /// The 3D landmarks as points, `None` where the CT does not hold one.
    pub fn points3d(&self) -> Vec<Option<Point3<f64>>> {
        self.landmarks3d
            .iter()
            .map(|p| p.map(Point3::from))
            .collect()
    }

    /// The landmarks the CT holds, in order.
    pub fn present3d(&self) -> Vec<Point3<f64>> {
        self.points3d().into_iter().flatten().collect()
    }

    /// All 8 landmarks, or `None` when the CT lacks one.
    pub fn all3d(&self) -> Option<Vec<Point3<f64>>> {
        self.points3d().into_iter().collect()
    }
}

/// What a dataset is: written first, checked on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Master seed.
    pub seed: u64,
    /// Stored (and training) image size, pixels, square.
    pub size: usize,
    /// The camera at the stored size.
    pub camera: Camera,
    /// Training views per training subject (and views per held-out subject).
    pub views: usize,
    /// Extra novel-view images per training subject.
    pub novel_views: usize,
    /// Largest rotation about each axis, degrees.
    pub max_rotation_deg: f64,
    /// Smallest whole angle of a view from AP, degrees (0: the paper's uniform draw; see
    /// [`PoseRange::min_angle_from_ap_rad`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_angle_from_ap_deg: f64,
    /// Largest translation along each axis, mm.
    pub max_translation_mm: f64,
    /// Realism applied.
    pub realism: Realism,
    /// The CTs.
    pub subjects: Vec<Subject>,
}

/// One image and its labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// File name under `images/`.
    pub image: String,
    /// Index into the manifest's subjects.
    pub subject: usize,
    /// Split.
    pub split: Split,
    /// The pose `(rx, ry, rz, tx, ty, tz)`, camera_from_world, rad and mm.
    pub pose: [f64; 6],
    /// Landmarks in pixels at the stored size; `None` when it projects outside the image.
    pub landmarks: [Option<[f64; 2]>; N_LANDMARKS],
    /// Where each landmark projects, inside the image or not (`None`: not in the CT).
    pub projected: [Option<[f64; 2]>; N_LANDMARKS],
}

impl Sample {
    /// The pose.
    pub fn pose(&self) -> Pose {
        Pose::from_params(&self.pose)
    }
    /// Visible landmarks as points.
    pub fn points(&self) -> Vec<Option<Point2<f64>>> {
        self.landmarks
            .iter()
            .map(|p| p.map(|[x, y]| Point2::new(x, y)))
            .collect()
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct Request {
    /// The CTs: `(spec, held_out)`; the spec is `phantom:N` or a CT path with a landmarks file.
    pub subjects: Vec<SubjectSource>,
    /// Views per subject.
    pub views: usize,
    /// Novel views per training subject.
    pub novel_views: usize,
    /// Stored size.
    pub size: usize,
    /// Master seed.
    pub seed: u64,
    /// Pose range.
    pub range: PoseRange,
    /// Realism.
    pub realism: Realism,
    /// Render on the CPU reference even if a GPU exists.
    pub cpu: bool,
}

/// A CT to render.
#[derive(Clone, Debug)]
pub struct SubjectSource {
    /// `phantom:N` or a CT path.
    pub ct: String,
    /// Its landmarks (required for a CT file; phantoms carry their own).
    pub landmarks: Option<PathBuf>,
    /// Held out for the novel-subject split.
    pub held_out: bool,
}

/// Parses `phantom:A..B` (inclusive), `phantom:N`, a CT file or a folder of CT files (each
/// with `NAME.mrk.json`, `NAME.fcsv` or `NAME.csv` beside it). The last `held_out` subjects
/// are held out.
pub fn parse_subjects(spec: &str, held_out: usize) -> Result<Vec<SubjectSource>, DatasetError> {
    let mut out = Vec::new();
    if let Some(r) = spec.strip_prefix("phantom:") {
        let (a, b) = match r.split_once("..") {
            Some((a, b)) => (a, b),
            None => (r, r),
        };
        let parse = |s: &str| {
            s.trim().parse::<u64>().map_err(|_| {
                DatasetError::Invalid(format!("{spec:?}: expected phantom:N or phantom:A..B"))
            })
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if b < a {
            return Err(DatasetError::Invalid(format!("{spec:?}: empty range")));
        }
        for id in a..=b {
            out.push(SubjectSource {
                ct: format!("phantom:{id}"),
                landmarks: None,
                held_out: false,
            });
        }
    } else {
        let p = Path::new(spec);
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(io_err(p))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let n = f.to_string_lossy();
                    n.ends_with(".nii") || n.ends_with(".nii.gz")
                })
                .collect();
            v.sort();
            v
        } else {
            vec![p.to_path_buf()]
        };
        for f in files {
            let base = f
                .to_string_lossy()
                .trim_end_matches(".gz")
                .trim_end_matches(".nii")
                .to_string();
            let lm = [".mrk.json", ".fcsv", ".csv"]
                .iter()
                .map(|e| PathBuf::from(format!("{base}{e}")))
                .find(|c| c.exists());
            out.push(SubjectSource {
                ct: f.to_string_lossy().into_owned(),
                landmarks: lm,
                held_out: false,
            });
        }
    }
    if out.is_empty() {
        return Err(DatasetError::Invalid(format!("{spec:?}: no CTs found")));
    }
    if held_out >= out.len() && held_out > 0 {
        return Err(DatasetError::Invalid(format!(
            "{held_out} held-out subjects leave none of the {} for training",
            out.len()
        )));
    }
    let n = out.len();
    for s in out.iter_mut().skip(n - held_out) {
        s.held_out = true;
    }
    Ok(out)
}

/// A subject's CT from its spec: `phantom:N` (with the phantom's own landmarks) or a CT path.
fn read_ct(spec: &str) -> Result<(crate::volume::Volume, Option<Landmarks3d>), DatasetError> {
    if let Some(id) = spec.strip_prefix("phantom:") {
        let id: u64 = id
            .parse()
            .map_err(|_| DatasetError::Invalid(format!("bad phantom id in {spec:?}")))?;
        let (vol, lm) = crate::volume::phantom::phantom_subject(id, None);
        Ok((vol, Some(lm)))
    } else {
        let vol = crate::volume::read_volume(Path::new(spec), None)
            .map_err(|e| DatasetError::Invalid(format!("{spec}: {e}")))?;
        Ok((vol, None))
    }
}

/// A subject's manifest entry: for a phantom from its outline, without rasterising it (the
/// volume is made once, when its images are rendered); for a CT file from the file.
fn subject_entry(src: &SubjectSource, index: usize) -> Result<Subject, DatasetError> {
    if let Some(id) = src.ct.strip_prefix("phantom:") {
        let id: u64 = id
            .parse()
            .map_err(|_| DatasetError::Invalid(format!("bad phantom id in {:?}", src.ct)))?;
        let (lm, centre) = crate::volume::phantom::phantom_outline(id, None);
        return describe_subject(src, index, lm, centre);
    }
    Ok(load_subject(src, index)?.0)
}

fn load_subject(
    src: &SubjectSource,
    index: usize,
) -> Result<(Subject, crate::volume::Volume), DatasetError> {
    let (vol, phantom_landmarks) = read_ct(&src.ct)?;
    let (lm, centre) = match phantom_landmarks {
        // A phantom is the pelvis alone: its poses are drawn around the volume centre, as
        // `phantom_outline` says without rasterising it.
        Some(lm) => (lm, vol.center_mm()),
        None => {
            let path = src.landmarks.as_ref().ok_or_else(|| {
                DatasetError::Invalid(format!(
                    "{}: no landmarks file (NAME.mrk.json, .fcsv or .csv) beside it",
                    src.ct
                ))
            })?;
            let lm = Landmarks3d::read(path)
                .map_err(|e| DatasetError::Invalid(format!("{}: {e}", path.display())))?;
            // A CT's poses are drawn around its landmarks: its scan range is the
            // radiologist's choice (this may reach from the ribs to the symphysis), the
            // landmarks are the pelvis.
            let centre = crate::registration::intensity::centroid(&lm.present());
            (lm, centre)
        }
    };
    Ok((describe_subject(src, index, lm, centre)?, vol))
}

fn describe_subject(
    src: &SubjectSource,
    index: usize,
    lm: Landmarks3d,
    c: Point3<f64>,
) -> Result<Subject, DatasetError> {
    // Three points are the fewest a pose can be solved from (P3P, up to four solutions).
    let placed = lm.present().len();
    if placed < MIN_LANDMARKS3D {
        return Err(DatasetError::Invalid(format!(
            "{}: {placed} of the 8 landmarks placed; at least {MIN_LANDMARKS3D} are needed",
            src.ct
        )));
    }
    let name = match src.ct.strip_prefix("phantom:") {
        Some(id) => format!("phantom{id:0>3}"),
        None => format!(
            "ct{index:03}_{}",
            Path::new(&src.ct)
                .file_name()
                .map(|n| n
                    .to_string_lossy()
                    .split('.')
                    .next()
                    .unwrap_or("ct")
                    .to_string())
                .unwrap_or_default()
        ),
    };
    Ok(Subject {
        name,
        ct: src.ct.clone(),
        held_out: src.held_out,
        landmarks3d: lm.points.map(|p| p.map(|p| [p.x, p.y, p.z])),
        isocenter: [c.x, c.y, c.z],
    })
}

/// The fewest 3D landmarks a subject may have.
pub const MIN_LANDMARKS3D: usize = 3;

/// One image's 2D landmarks in pixels, `None` where absent.
pub type Points2 = Vec<Option<[f64; 2]>>;

/// Labels of one pose: the landmarks in the image (`None` outside `[0, size)` or not in the
/// CT), and where each projects (`None` only when not in the CT).
pub fn label(camera: &Camera, pose: &Pose, points: &[Option<Point3<f64>>]) -> (Points2, Points2) {
    let (w, h) = (camera.width_px as f64, camera.height_px as f64);
    let proj: Vec<Option<[f64; 2]>> = points
        .iter()
        .map(|p| {
            p.map(|p| {
                let uv = camera.project(pose, &p);
                [uv.x, uv.y]
            })
        })
        .collect();
    let vis = proj
        .iter()
        .map(|p| {
            p.filter(|&[x, y]| {
                x.is_finite()
                    && y.is_finite()
                    && x >= -0.5
                    && y >= -0.5
                    && x < w - 0.5
                    && y < h - 0.5
            })
        })
        .collect();
    (vis, proj)
}

/// Older manifests have no smallest angle: 0, and it is left out when 0 so that they still
/// compare equal on resume.
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Generates (or resumes) a dataset in `dir`. Returns the number of images rendered now.
pub fn generate(req: &Request, dir: &Path, task: &Task) -> Result<usize, DatasetError> {
    if req.size == 0 || req.views == 0 {
        return Err(DatasetError::Invalid(
            "size and views must be positive".into(),
        ));
    }
    req.range.check().map_err(DatasetError::Invalid)?;
    std::fs::create_dir_all(dir.join("images")).map_err(io_err(dir))?;
    let camera = Camera::paper(req.size as u32);
    task.set_message("loading CTs");
    let mut subjects = Vec::new();
    for (i, s) in req.subjects.iter().enumerate() {
        subjects.push(subject_entry(s, i)?);
    }
    let manifest = Manifest {
        version: 1,
        seed: req.seed,
        size: req.size,
        camera,
        views: req.views,
        novel_views: req.novel_views,
        max_rotation_deg: req.range.max_rotation_rad.to_degrees(),
        min_angle_from_ap_deg: req.range.min_angle_from_ap_rad.to_degrees(),
        max_translation_mm: req.range.max_translation_mm,
        realism: req.realism,
        subjects: subjects.clone(),
    };
    let mpath = dir.join("manifest.json");
    if mpath.exists() {
        let old = Dataset::read_manifest(dir)?;
        if old != manifest {
            return Err(DatasetError::Invalid(format!(
                "{} holds a different dataset (manifest differs); use a new folder",
                dir.display()
            )));
        }
    } else {
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| DatasetError::Invalid(e.to_string()))?;
        crate::io::atomic_write(&mpath, text.as_bytes()).map_err(io_err(&mpath))?;
    }
    // Keep only whole label lines (a crash may have cut the last one), then append.
    let lpath = dir.join("labels.jsonl");
    let done = Dataset::read_labels(&lpath)?;
    let text: String = done
        .iter()
        .filter_map(|s| serde_json::to_string(s).ok().map(|l| l + "\n"))
        .collect();
    crate::io::atomic_write(&lpath, text.as_bytes()).map_err(io_err(&lpath))?;
    let done: std::collections::HashSet<String> = done.into_iter().map(|s| s.image).collect();
    let mut labels = std::fs::OpenOptions::new()
        .append(true)
        .open(&lpath)
        .map_err(io_err(&lpath))?;

    // Every image's pose and noise come from (seed, subject, view): resuming renders the same.
    let mut jobs: Vec<(usize, Split, usize)> = Vec::new();
    for (si, s) in subjects.iter().enumerate() {
        let (main, extra) = if s.held_out {
            (Split::NovelSubject, 0)
        } else {
            (Split::Train, req.novel_views)
        };
        for v in 0..req.views {
            jobs.push((si, main, v));
        }
        for v in 0..extra {
            jobs.push((si, Split::NovelView, req.views + v));
        }
    }
    task.set_total(jobs.len() as u64);
    task.set_done(0);
    let name = |si: usize, split: Split, v: usize| {
        let tag = match split {
            Split::Train => "train",
            Split::NovelView => "nview",
            Split::NovelSubject => "nsubj",
        };
        format!("{}_{tag}_{v:04}.png", subjects[si].name)
    };
    let mut rendered = 0;
    let mut source = AnyDrr::new(req.cpu);
    for (si, s) in subjects.iter().enumerate() {
        let todo: Vec<&(usize, Split, usize)> = jobs
            .iter()
            .filter(|(j, sp, v)| *j == si && !done.contains(&name(si, *sp, *v)))
            .collect();
        let already = jobs.iter().filter(|(j, _, _)| *j == si).count() - todo.len();
        task.inc(already as u64);
        if todo.is_empty() {
            continue;
        }
        task.set_message(format!("rendering {}", s.name));
        let vol = load_subject(&req.subjects[si], si)?.1;
        source.set_volume(Arc::new(DensityVolume::from_volume(
            &vol,
            Attenuation::default(),
        )));
        let iso = Point3::from(s.isocenter);
        let pts = s.points3d();
        for &&(_, split, v) in &todo {
            if task.is_cancelled() {
                return Err(Cancelled.into());
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                req.seed ^ ((si as u64) << 32) ^ (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let pose = req.range.sample(&mut rng, &iso);
            let mut img = source
                .render(&camera, &pose)
                .map_err(|e| DatasetError::Invalid(format!("rendering: {e}")))?;
            req.realism.apply(&mut img, req.size, &mut rng);
            let (vis, proj) = label(&camera, &pose, &pts);
            let file = name(si, split, v);
            let path = dir.join("images").join(&file);
            crate::drr::image_io::write_image(&path, &img, req.size, req.size)
                .map_err(|e| DatasetError::Invalid(format!("{}: {e}", path.display())))?;
            let sample = Sample {
                image: file,
                subject: si,
                split,
                pose: pose.params(),
                landmarks: std::array::from_fn(|i| vis[i]),
                projected: std::array::from_fn(|i| proj[i]),
            };
            let line =
                serde_json::to_string(&sample).map_err(|e| DatasetError::Invalid(e.to_string()))?;
            writeln!(labels, "{line}").map_err(io_err(&lpath))?;
            labels.flush().map_err(io_err(&lpath))?;
            rendered += 1;
            task.inc(1);
        }
    }
    Ok(rendered)
}

/// A generated dataset, opened for training or evaluation.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Its folder.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
    /// Its images.
    pub samples: Vec<Sample>,
}

impl Dataset {
    fn read_manifest(dir: &Path) -> Result<Manifest, DatasetError> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        serde_json::from_str(&text)
            .map_err(|e| DatasetError::Invalid(format!("{}: {e}", p.display())))
    }

    fn read_labels(path: &Path) -> Result<Vec<Sample>, DatasetError> {
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Sample>(line) {
                Ok(s) => out.push(s),
                // Only a cut-off last line is expected (a crash mid-write); say so otherwise.
                Err(e) => log::warn!("{}:{}: skipped ({e})", path.display(), i + 1),
            }
        }
        Ok(out)
    }

    /// Opens `dir` (manifest and labels).
    pub fn open(dir: &Path) -> Result<Self, DatasetError> {
        let manifest = Self::read_manifest(dir)?;
        let samples = Self::read_labels(&dir.join("labels.jsonl"))?;
        for s in &samples {
            if s.subject >= manifest.subjects.len() {
                return Err(DatasetError::Invalid(format!(
                    "{}: subject {} is not in the manifest",
                    s.image, s.subject
                )));
            }
        }
        Ok(Self {
            dir: dir.into(),
            manifest,
            samples,
        })
    }

    /// The samples of one split (all when `None`).
    pub fn split(&self, split: Option<Split>) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| split.is_none_or(|sp| s.split == sp))
            .collect()
    }

    /// Reads one image as floats in [0, 1], `size x size`.
    pub fn image(&self, s: &Sample) -> Result<Vec<f32>, DatasetError> {
        let p = self.dir.join("images").join(&s.image);
        let img = image::open(&p)
            .map_err(|e| DatasetError::Invalid(format!("{}: {e}", p.display())))?
            .into_luma16();
        let n = self.manifest.size as u32;
        if img.width() != n || img.height() != n {
            return Err(DatasetError::Invalid(format!(
                "{}: {}x{}, the manifest says {n}x{n}",
                p.display(),
                img.width(),
                img.height()
            )));
        }
        Ok(img.into_raw().iter().map(|v| *v as f32 / 65535.0).collect())
    }
}

/// A camera seen through a resampling of its `w x h` image to `size x size` (pixel centres
/// aligned, as [`crate::model::resize_bilinear`] resamples).
pub fn resampled_camera(c: &Camera, size: usize) -> Camera {
    let (sx, sy) = (
        size as f64 / c.width_px as f64,
        size as f64 / c.height_px as f64,
    );
    Camera {
        sdd_mm: c.sdd_mm,
        width_px: size as u32,
        height_px: size as u32,
        delx_mm: c.delx_mm / sx,
        dely_mm: c.dely_mm / sy,
        cx_px: (c.cx_px + 0.5) * sx - 0.5,
        cy_px: (c.cy_px + 0.5) * sy - 0.5,
    }
}

/// One corrected frame for [`append_annotated`].
pub struct Annotated<'a> {
    /// The CT's name (`phantom:N` or its path) and its 3D landmarks (LPS mm).
    pub ct: &'a str,
    /// The CT's landmarks.
    pub landmarks3d: &'a Landmarks3d,
    /// The CT's centre (the pose sampler's isocentre; informational here).
    pub isocenter: Point3<f64>,
    /// The frame.
    pub pixels: &'a [f32],
    /// Width, height.
    pub size: (usize, usize),
    /// The frame's camera.
    pub camera: &'a Camera,
    /// The corrected landmarks in frame pixels (`None`: not visible).
    pub points: &'a [Option<Point2<f64>>; N_LANDMARKS],
    /// The true pose when known (simulated frames); else it is solved from the landmarks.
    pub pose: Option<Pose>,
}

/// Appends a corrected frame to the dataset in `dir` (created at `size` when new): the image
/// resampled to the dataset size, its landmarks, and its pose (the true one, or the one the
/// corrected landmarks give). Returns the new sample. Annotators' corrections become training
/// data the `train` command reads like any generated set.
pub fn append_annotated(dir: &Path, a: &Annotated, size: usize) -> Result<Sample, DatasetError> {
    let placed = a.landmarks3d.present().len();
    if placed < MIN_LANDMARKS3D {
        return Err(DatasetError::Invalid(format!(
            "the CT has {placed} of the 8 landmarks placed; a training image needs at least \
             {MIN_LANDMARKS3D}"
        )));
    }
    if a.pixels.len() != a.size.0 * a.size.1 || a.size.0 == 0 {
        return Err(DatasetError::Invalid(
            "the frame has the wrong number of pixels".into(),
        ));
    }
    std::fs::create_dir_all(dir.join("images")).map_err(io_err(dir))?;
    let camera = resampled_camera(a.camera, size);
    let mpath = dir.join("manifest.json");
    let mut manifest = if mpath.exists() {
        Dataset::read_manifest(dir)?
    } else {
        Manifest {
            version: 1,
            seed: 0,
            size,
            camera,
            views: 0,
            novel_views: 0,
            max_rotation_deg: 0.0,
            min_angle_from_ap_deg: 0.0,
            max_translation_mm: 0.0,
            realism: Realism::default(),
            subjects: Vec::new(),
        }
    };
    if manifest.size != size || manifest.camera != camera {
        return Err(DatasetError::Invalid(format!(
            "{} holds images of another size or camera; use a new folder",
            dir.display()
        )));
    }
    let lm3 = a.landmarks3d.points.map(|p| p.map(|p| [p.x, p.y, p.z]));
    let si = match manifest
        .subjects
        .iter()
        .position(|s| s.ct == a.ct && s.landmarks3d == lm3)
    {
        Some(i) => i,
        None => {
            manifest.subjects.push(Subject {
                name: format!("annotated{:03}", manifest.subjects.len()),
                ct: a.ct.to_string(),
                held_out: false,
                landmarks3d: lm3,
                isocenter: [a.isocenter.x, a.isocenter.y, a.isocenter.z],
            });
            manifest.subjects.len() - 1
        }
    };
    let (sx, sy) = (size as f64 / a.size.0 as f64, size as f64 / a.size.1 as f64);
    let pts: Vec<Option<Point2<f64>>> = a
        .points
        .iter()
        .map(|p| p.map(|p| Point2::new((p.x + 0.5) * sx - 0.5, (p.y + 0.5) * sy - 0.5)))
        .collect();
    let pose = match a.pose {
        Some(p) => p,
        None => {
            let det: Vec<(Point2<f64>, f64)> = pts
                .iter()
                .map(|p| {
                    (
                        p.unwrap_or(Point2::origin()),
                        if p.is_some() { 1.0 } else { 0.0 },
                    )
                })
                .collect();
            let p3: Vec<Option<Point3<f64>>> = a
                .landmarks3d
                .points
                .iter()
                .zip(&pts)
                .map(|(q, p)| p.and(*q))
                .collect();
            let s = crate::registration::solve_detections(&camera, &p3, &det, None);
            if !s.status.ok() {
                return Err(DatasetError::Invalid(format!(
                    "the corrected landmarks give no pose ({:?}); at least 4 visible are needed",
                    s.status
                )));
            }
            s.pose
        }
    };
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| DatasetError::Invalid(e.to_string()))?;
    crate::io::atomic_write(&mpath, text.as_bytes()).map_err(io_err(&mpath))?;
    let lpath = dir.join("labels.jsonl");
    let n = Dataset::read_labels(&lpath)?.len();
    let file = format!("{}_annot_{n:05}.png", manifest.subjects[si].name);
    let img = crate::model::resize_bilinear(a.pixels, a.size.0, a.size.1, size, size);
    let ipath = dir.join("images").join(&file);
    crate::drr::image_io::write_image(&ipath, &img, size, size)
        .map_err(|e| DatasetError::Invalid(format!("{}: {e}", ipath.display())))?;
    let projected = a.landmarks3d.points.map(|q| {
        q.map(|q| {
            let uv = camera.project(&pose, &q);
            [uv.x, uv.y]
        })
    });
    let sample = Sample {
        image: file,
        subject: si,
        split: Split::Train,
        pose: pose.params(),
        landmarks: std::array::from_fn(|i| pts[i].map(|p| [p.x, p.y])),
        projected,
    };
    let line = serde_json::to_string(&sample).map_err(|e| DatasetError::Invalid(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lpath)
        .map_err(io_err(&lpath))?;
    writeln!(f, "{line}").map_err(io_err(&lpath))?;
    f.flush().map_err(io_err(&lpath))?;
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_specs() {
        let s = parse_subjects("phantom:3..6", 1).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].ct, "phantom:3");
        assert!(s[3].held_out && !s[2].held_out);
        assert_eq!(parse_subjects("phantom:2", 0).unwrap().len(), 1);
        assert!(parse_subjects("phantom:6..3", 0).is_err());
        assert!(parse_subjects("phantom:1..2", 2).is_err());
        assert!(parse_subjects("phantom:x", 0).is_err());
    }

    #[test]
    fn labels_mark_outside_points() {
        let cam = Camera::paper(64);
        let iso = Point3::new(0.0, 0.0, 0.0);
        let pose = crate::geometry::sampling::ap_pose(&iso, 800.0);
        let pts = [
            Some(Point3::new(0.0, 0.0, 0.0)),
            Some(Point3::new(2000.0, 0.0, 0.0)),
            None,
        ];
        let (vis, proj) = label(&cam, &pose, &pts);
        assert!(vis[0].is_some());
        assert!((proj[0].unwrap()[0] - 31.5).abs() < 1.0, "{proj:?}");
        // Outside the image: absent from the labels, but where it projects is kept.
        assert!(vis[1].is_none() && proj[1].unwrap()[0].is_finite());
        // Not in the CT: absent from both.
        assert!(vis[2].is_none() && proj[2].is_none());
    }

    /// A corrected frame becomes a training sample whose landmarks and pose agree: the labels
    /// are where the pose projects the CT's landmarks, on a resampled, non-square frame.
    #[test]
    fn annotated_frames_append_as_training_samples() {
        let (_, lm) = crate::volume::phantom::phantom_subject(2, Some(4.0));
        let all = lm.all().unwrap();
        let cam = Camera::new(1020.0, 320, 240, 1.2, 1.2);
        let iso = Point3::from(all.iter().map(|p| p.coords).sum::<nalgebra::Vector3<f64>>() / 8.0);
        let truth = crate::geometry::sampling::ap_pose(&iso, 800.0);
        let points: [Option<Point2<f64>>; N_LANDMARKS] =
            std::array::from_fn(|i| (i != 3).then(|| cam.project(&truth, &all[i])));
        let dir = tempfile::tempdir().unwrap();
        let a = Annotated {
            ct: "phantom:2",
            landmarks3d: &lm,
            isocenter: iso,
            pixels: &vec![0.5; 320 * 240],
            size: (320, 240),
            camera: &cam,
            points: &points,
            pose: None,
        };
        let s = append_annotated(dir.path(), &a, 64).unwrap();
        assert!(s.landmarks[3].is_none() && s.landmarks[0].is_some());
        for i in [0, 1, 2, 4, 5, 6, 7] {
            let [x, y] = s.landmarks[i].unwrap();
            let [px, py] = s.projected[i].unwrap();
            assert!((x - px).abs() < 1e-6 && (y - py).abs() < 1e-6);
        }
        let err = crate::registration::metrics::rotation_error_deg(&s.pose(), &truth);
        assert!(err < 1e-6, "{err}");
        append_annotated(dir.path(), &a, 64).unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.manifest.subjects.len(), 1);
        assert_eq!(ds.image(&ds.samples[1]).unwrap().len(), 64 * 64);
        // Another size in the same folder is refused.
        assert!(append_annotated(dir.path(), &a, 32).is_err());
    }

    /// The dose each image was noised at, read back from an open-beam image: the noise of
    /// `-ln(counts / n)` has variance `1 / n`.
    fn doses(realism: &Realism, images: usize) -> Vec<f64> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        (0..images)
            .map(|_| {
                let mut img = vec![0.0f32; 64 * 64];
                realism.apply(&mut img, 64, &mut rng);
                let n = img.len() as f64;
                let mean = img.iter().map(|v| *v as f64).sum::<f64>() / n;
                let var = img.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
                1.0 / var
            })
            .collect()
    }

    #[test]
    fn a_dose_range_noises_each_image_at_its_own_dose() {
        let fixed = Realism {
            photons: 10_000.0,
            ..Realism::default()
        };
        for n in doses(&fixed, 20) {
            assert!((n / 10_000.0 - 1.0).abs() < 0.1, "{n:.0} photons");
        }
        // A range whose floor is not below the dose is the fixed dose, draw for draw.
        let empty = Realism {
            photons_min: 10_000.0,
            ..fixed
        };
        assert_eq!(doses(&fixed, 5), doses(&empty, 5));
        let range = Realism {
            photons_min: 200.0,
            ..fixed
        };
        let n = doses(&range, 40);
        let (lo, hi) = n
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(*v), b.max(*v)));
        assert!(lo > 150.0 && hi < 11_000.0, "{lo:.0}..{hi:.0} photons");
        // Log-uniform: the decade ends are both reached (each third of the log range holds a
        // third of the draws).
        assert!(lo < 600.0 && hi > 3_000.0, "{lo:.0}..{hi:.0} photons");
    }
}
