//! Intensity-based refinement: the pose the landmarks gave, polished by matching the frame
//! against DRRs of the CT. Beyond the paper, which stops at the landmarks.
//!
//! Why it pays: eight landmarks fix the pose across the image well, but along the beam (depth,
//! and the tilts that move points in depth) only through their spread, so a pixel of landmark
//! error moves the CT by millimetres. Every bone edge of the frame constrains the pose too.
//!
//! - Similarity: gradient correlation (Penney et al. 1998, "A comparison of similarity measures
//!   for use in 2-D-3-D medical image registration"), the mean of the normalised
//!   cross-correlations of the horizontal and vertical gradients of the Gaussian-smoothed
//!   images. Gradients ignore the smooth soft-tissue background and the frame's offset, and the
//!   correlation its gain.
//! - Optimiser: Levenberg-Marquardt on the residual `ĝ_drr − ĝ_frame` of the unit-normalised
//!   gradient images, whose squared norm is `4 (1 − similarity)`, with a forward-difference
//!   Jacobian (six DRRs rendered as one batch), coarse to fine. Each accepted step lowers the
//!   residual, so the similarity only rises within a level; the result falls back to the
//!   starting pose if the finest level's similarity did not beat it.
//! - Parametrisation: a rotation about a pivot (the CT's landmark centroid) and a translation,
//!   both in camera axes, so that turning does not also slide the anatomy across the image.

use crate::drr::DrrSource;
use crate::geometry::sampling::{angle_from_ap_rad, perturbed_pose};
use crate::geometry::{Camera, Pose, rodrigues};
use crate::task::Task;
use nalgebra::{DMatrix, DVector, Matrix6, Point2, Point3, Vector3, Vector6};
use serde::Serialize;

/// How to refine.
#[derive(Clone, Debug, PartialEq)]
pub struct IntensityOptions {
    /// The pyramid, coarse to fine.
    pub levels: Vec<LevelSpec>,
    /// Levenberg-Marquardt iterations per level, at most.
    pub max_iterations: usize,
    /// A level has converged once an accepted step moves the image by less than this, pixels
    /// of the level (0: only once a step no longer lowers the residual). Each further
    /// Levenberg-Marquardt step costs 13 DRRs or more, and steps of hundredths of a pixel only
    /// polish what the next, finer level redoes anyway.
    pub converged_px: f64,
    /// Border left out of the comparison on each side, fraction of the image (collimator
    /// blades and the detector's edge are not anatomy).
    pub margin: f64,
    /// A run that ends under this similarity is taken for a wrong optimum, and the next of
    /// `restarts` is tried; the most similar result wins.
    pub restart_below: f64,
    /// Other starts, tried in turn.
    pub restarts: Vec<Start>,
    /// When the run from the given pose ends unlike the frame: a scan of the C-arm's views, whose
    /// candidates compete with the restarts (`None`: none).
    pub search: Option<Search>,
    /// A run that ends with the view turned further than this from AP (degrees) is not taken.
    /// Seen from behind, a near-lateral pelvis looks almost as from the front, mirrored, so an
    /// optimum lies there too; a C-arm's views lie within 86° of AP (the paper's ±45° about
    /// each axis).
    pub max_angle_from_ap_deg: f64,
}

/// The wider search of [`refine`]: when the run from the given pose ends unlike the frame, the
/// landmark pose is no guide (a few landmarks in the field, or wrong ones), and the restarts
/// about it may end in another wrong optimum that passes the line; so the views a C-arm takes of
/// the pelvis are scanned too. Each candidate view puts the pivot where the given pose put it in
/// the image, at a few depths; all of them are rendered at the coarsest level in one batch of
/// DRRs, on a canvas wider than the frame, and each is placed across the beam where it correlates
/// best with the frame (a landmark pose built on wrong landmarks can be off across the beam as
/// well: h80's phantom 414 view 19 put the pivot 95 px from where it is). The most similar few
/// are refined.
#[derive(Clone, Debug, PartialEq)]
pub struct Search {
    /// Candidate views: turns from the AP view about the patient's x, y and z axes, radians (as
    /// [`perturbed_pose`]'s).
    pub turns: Vec<Vector3<f64>>,
    /// Source-to-pivot distances tried for each view, mm.
    pub depths_mm: Vec<f64>,
    /// How many of the most similar candidates are refined, best first, until one ends like the
    /// frame.
    pub keep: usize,
    /// How far each candidate may be moved across the beam, a fraction of the image on each
    /// side (0: the pivot stays where the given pose puts it). The candidates are rendered on a
    /// canvas that much wider, and the best placement is found on a grid of `shift_step_px`
    /// (pixels of the coarsest level), then to the pixel.
    pub shift_fraction: f64,
    /// The grid of placements, pixels of the coarsest level.
    pub shift_step_px: usize,
}

impl Search {
    /// A grid over the C-arm's range: `steps` turns about each axis spanning `±max_deg`, the
    /// pivot at each of `depths_mm`.
    pub fn grid(max_deg: f64, steps: usize, depths_mm: Vec<f64>, keep: usize) -> Self {
        let a = max_deg.to_radians();
        let at = |i: usize| {
            if steps < 2 {
                0.0
            } else {
                -a + 2.0 * a * i as f64 / (steps - 1) as f64
            }
        };
        let turns = (0..steps.pow(3))
            .map(|k| Vector3::new(at(k % steps), at(k / steps % steps), at(k / steps / steps)))
            .collect();
        Self {
            turns,
            depths_mm,
            keep,
            shift_fraction: 0.5,
            shift_step_px: 2,
        }
    }

    /// The candidate poses for a pivot that `init` puts at pixel `uv`.
    fn candidates(&self, camera: &Camera, pivot: &Point3<f64>, init: &Pose) -> Vec<Pose> {
        // Where the given pose shows the pivot, kept inside the image; the image centre if it
        // puts the pivot behind the source.
        let (w, h) = (camera.width_px as f64, camera.height_px as f64);
        let uv = camera
            .project_in_front(init, pivot)
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .map(|p| Point2::new(p.x.clamp(0.0, w), p.y.clamp(0.0, h)))
            .unwrap_or(Point2::new(camera.cx_px, camera.cy_px));
        let ray = camera.detector_point(&uv).coords / camera.sdd_mm;
        let mut poses = Vec::with_capacity(self.turns.len() * self.depths_mm.len());
        for turn in &self.turns {
            let view = perturbed_pose(pivot, 0.0, turn, &Vector3::zeros());
            let r = view.rotation_matrix();
            for &d in &self.depths_mm {
                poses.push(Pose::from_matrix(&r, ray * d - r * pivot.coords));
            }
        }
        poses
    }
}

impl Default for Search {
    /// The paper's range of views (±45° about each axis around AP) at 20° steps, the pivot
    /// 700-900 mm from the source (the C-arm's isocentre distances), each placed across the beam
    /// within half the image, the best three refined: 375 DRRs at the coarsest level, on a
    /// canvas twice its width. On the held-out ±45° phantoms the optimiser's basin is
    /// about ±10-15° wide, so some candidate falls in it.
    fn default() -> Self {
        Self::grid(40.0, 5, vec![700.0, 800.0, 900.0], 3)
    }
}

/// A start for [`refine`] besides the given pose: that pose moved along the pivot's ray and
/// tilted about the pivot, where a landmark pose errs most.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Start {
    /// Along the ray through the pivot, a fraction of its distance from the source.
    pub depth: f64,
    /// Tilts about the camera's x and y axes through the pivot, degrees.
    pub tilt_deg: [f64; 2],
}

impl Start {
    /// The start moved along the ray by `depth`.
    pub fn depth(depth: f64) -> Self {
        Self {
            depth,
            ..Self::default()
        }
    }

    /// The start tilted by `x` and `y` degrees.
    pub fn tilt(x: f64, y: f64) -> Self {
        Self {
            tilt_deg: [x, y],
            ..Self::default()
        }
    }

    /// `pose` moved to this start (`pivot` in world coordinates).
    pub fn apply(&self, pose: &Pose, pivot: &Point3<f64>) -> Pose {
        let c = pose.camera_from_world(pivot).coords;
        let shift = c * self.depth;
        let [x, y] = self.tilt_deg.map(f64::to_radians);
        moved(
            pose,
            &c,
            &Vector6::new(x, y, 0.0, shift.x, shift.y, shift.z),
        )
    }
}

impl Default for IntensityOptions {
    fn default() -> Self {
        Self {
            levels: vec![
                LevelSpec::new(64, Similarity::Intensity, 2.0),
                LevelSpec::new(128, Similarity::Gradient, 1.0),
            ],
            max_iterations: 20,
            converged_px: CONVERGED_PX,
            margin: 0.03,
            restart_below: RESTART_BELOW,
            // A landmark pose that is off by centimetres is off in depth, or tilted.
            restarts: vec![
                Start::depth(-0.1),
                Start::depth(0.1),
                Start::tilt(20.0, 0.0),
                Start::tilt(-20.0, 0.0),
                Start::tilt(0.0, 20.0),
                Start::tilt(0.0, -20.0),
                Start::depth(-0.2),
                Start::depth(0.2),
            ],
            search: Some(Search::default()),
            max_angle_from_ap_deg: 90.0,
        }
    }
}

/// [`IntensityOptions::converged_px`]'s default: a quarter of a pixel. On 100 of the held-out
/// ±45° phantoms' images (`eval --refine --limit 100`) it halved the DRRs (novel subjects 163 ->
/// 87 per image, novel views 231 -> 123) and the time, for a TRE 0.02 / 0.08 mm higher (95%
/// intervals over images -0.02 to +0.06 / +0.04 to +0.13); a tenth of a pixel took 159 DRRs on
/// the novel views for +0.04 mm.
pub const CONVERGED_PX: f64 = 0.25;

/// Similarity under which a refinement is taken for a wrong optimum. Every refinement of the
/// held-out ±45° phantoms that converged (to a TRE under 3 mm) ended at 0.867 or more; the
/// failures at 0.63-0.83.
pub const RESTART_BELOW: f64 = 0.85;

/// One level of the pyramid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelSpec {
    /// Working image width, pixels (at most the frame's width).
    pub width_px: u32,
    /// What is compared.
    pub similarity: Similarity,
    /// Gaussian blur before comparing, pixels of the level.
    pub blur_px: f64,
}

impl LevelSpec {
    /// A level `width_px` wide comparing `similarity` after a blur of `blur_px`.
    pub fn new(width_px: u32, similarity: Similarity, blur_px: f64) -> Self {
        Self {
            width_px,
            similarity,
            blur_px,
        }
    }
}

/// What refinement did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Refinement {
    /// The refined pose (the starting pose when refinement did not improve it).
    pub pose: Pose,
    /// Gradient correlation of the starting pose at the finest level, in [-1, 1].
    pub similarity_before: f64,
    /// Gradient correlation of the returned pose at the finest level.
    pub similarity: f64,
    /// DRRs rendered.
    pub renders: usize,
    /// Accepted Levenberg-Marquardt steps, all levels.
    pub steps: usize,
    /// The frame was matched with its polarity reversed (bone dark, as many X-ray formats
    /// store it), because it correlated negatively with the DRR at the starting pose.
    pub inverted: bool,
    /// Starts tried besides the given pose ([`IntensityOptions::restarts`]).
    pub restarts: usize,
    /// Candidates of the scan of views refined ([`IntensityOptions::search`]; 0: no scan).
    pub searched: usize,
}

/// Why a refinement could not run.
#[derive(Debug, thiserror::Error)]
pub enum IntensityError {
    /// The frame does not fit the camera, or holds no image.
    #[error("intensity registration: {0}")]
    Input(String),
    /// The renderer failed.
    #[error("intensity registration: rendering the DRR: {0}")]
    Render(String),
    /// Its task was cancelled ([`refine_watched`]).
    #[error("intensity registration: cancelled")]
    Cancelled,
}

/// What a level compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Similarity {
    /// Normalised cross-correlation of the smoothed images: a wide, smooth basin (the whole
    /// silhouette of the pelvis moves with the pose), for coarse levels.
    Intensity,
    /// Gradient correlation: sharp edges, a narrow but precise optimum, for fine levels.
    Gradient,
}

/// The unit-normalised channels of one picture at one level: the similarity's features.
struct Features {
    channels: Vec<Vec<f64>>,
}

impl Features {
    /// Blurs, then takes the image itself or its gradients (central differences), each
    /// normalised to zero mean and unit norm over the pixels inside the margin. `None` when a
    /// channel is flat.
    fn new(
        img: &[f32],
        w: usize,
        h: usize,
        similarity: Similarity,
        blur_px: f64,
        margin: f64,
    ) -> Option<Self> {
        let mut img = img.to_vec();
        if blur_px > 0.0 {
            crate::model::noise::gaussian_blur(&mut img, w, h, blur_px);
        }
        let m = ((margin * w.min(h) as f64).round() as usize).max(1);
        let (x0, x1, y0, y1) = (m, w.saturating_sub(m), m, h.saturating_sub(m));
        if x1 <= x0 + 1 || y1 <= y0 + 1 {
            return None;
        }
        let at = |xx: usize, yy: usize| img[yy * w + xx] as f64;
        let inside = || (y0..y1).flat_map(move |y| (x0..x1).map(move |x| (x, y)));
        let channels = match similarity {
            Similarity::Intensity => vec![inside().map(|(x, y)| at(x, y)).collect()],
            Similarity::Gradient => vec![
                inside()
                    .map(|(x, y)| 0.5 * (at((x + 1).min(w - 1), y) - at(x.saturating_sub(1), y)))
                    .collect(),
                inside()
                    .map(|(x, y)| 0.5 * (at(x, (y + 1).min(h - 1)) - at(x, y.saturating_sub(1))))
                    .collect(),
            ],
        };
        Some(Self {
            channels: channels.into_iter().map(unit).collect::<Option<_>>()?,
        })
    }

    /// Channel by channel `a − b`: `|r|² = 2 channels (1 − similarity)`.
    fn residual(&self, other: &Self) -> DVector<f64> {
        let n = self.channels.iter().map(Vec::len).sum();
        DVector::from_iterator(
            n,
            self.channels
                .iter()
                .zip(&other.channels)
                .flat_map(|(a, b)| a.iter().zip(b).map(|(a, b)| a - b)),
        )
    }
}

/// Zero mean, unit norm; `None` for a constant (or non-finite) signal.
fn unit(mut v: Vec<f64>) -> Option<Vec<f64>> {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    v.iter_mut().for_each(|x| *x -= mean);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(norm.is_finite() && norm > 1e-12) {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(v)
}

/// Similarity from a residual of `channels` unit channels: `1 − |r|² / (2 channels)`, the
/// mean of the channels' correlations.
fn similarity(r: &DVector<f64>, channels: usize) -> f64 {
    1.0 - r.norm_squared() / (2.0 * channels as f64)
}

/// Area-averages `img` (`w x h`) down to `nw x nh`: each output pixel is the mean of the input
/// pixels whose centres fall in its footprint, so that the frame is seen as a detector of
/// larger pixels would see it.
fn downsample(img: &[f32], w: usize, h: usize, nw: usize, nh: usize) -> Vec<f32> {
    if (nw, nh) == (w, h) {
        return img.to_vec();
    }
    let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
    let span = |i: usize, s: f64, n: usize| {
        let a = ((i as f64 * s) - 0.5).ceil().max(0.0) as usize;
        let b = (((i + 1) as f64 * s) - 0.5).ceil().max(0.0) as usize;
        (a.min(n - 1), b.clamp(a.min(n - 1) + 1, n))
    };
    let mut out = Vec::with_capacity(nw * nh);
    for y in 0..nh {
        let (ya, yb) = span(y, sy, h);
        for x in 0..nw {
            let (xa, xb) = span(x, sx, w);
            let mut sum = 0.0f64;
            for yy in ya..yb {
                sum += img[yy * w + xa..yy * w + xb]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
            out.push((sum / ((yb - ya) * (xb - xa)) as f64) as f32);
        }
    }
    out
}

/// `pose` moved by `d = (ω, τ)`: rotated by `R(ω)` about `pivot` (camera coordinates), then
/// shifted by `τ` (mm, camera axes).
fn moved(pose: &Pose, pivot: &Vector3<f64>, d: &Vector6<f64>) -> Pose {
    let w = rodrigues(&Vector3::new(d[0], d[1], d[2]));
    let t = w * (pose.translation_mm - pivot) + pivot + Vector3::new(d[3], d[4], d[5]);
    Pose::from_matrix(&(w * pose.rotation_matrix()), t)
}

/// One level of the pyramid: the camera and the frame's features at that size.
struct Level {
    spec: LevelSpec,
    camera: Camera,
    frame: Features,
}

impl Level {
    /// The frame (`camera`'s size) seen at `spec`'s level.
    fn new(
        frame: &[f32],
        camera: &Camera,
        spec: LevelSpec,
        margin: f64,
    ) -> Result<Self, IntensityError> {
        let (w, h) = (camera.width_px as usize, camera.height_px as usize);
        if frame.len() != w * h || w < 8 || h < 8 {
            return Err(IntensityError::Input(format!(
                "the frame holds {} values but the camera is {w}x{h}",
                frame.len()
            )));
        }
        let scale = (spec.width_px as f64 / w as f64).min(1.0);
        let cam = camera.rescaled(scale);
        let (nw, nh) = (cam.width_px as usize, cam.height_px as usize);
        let small = downsample(frame, w, h, nw, nh);
        let frame = Features::new(&small, nw, nh, spec.similarity, spec.blur_px, margin)
            .ok_or_else(|| {
                IntensityError::Input("the frame is flat (or not finite): nothing to match".into())
            })?;
        Ok(Self {
            spec,
            camera: cam,
            frame,
        })
    }

    /// Matches the frame with its polarity reversed.
    fn invert(&mut self) {
        for c in &mut self.frame.channels {
            c.iter_mut().for_each(|v| *v = -*v);
        }
    }

    /// The features of an image at this level (the frame's, or a DRR's); `None` when flat.
    fn features(&self, img: &[f32], margin: f64) -> Option<Features> {
        let (w, h) = (
            self.camera.width_px as usize,
            self.camera.height_px as usize,
        );
        Features::new(img, w, h, self.spec.similarity, self.spec.blur_px, margin)
    }

    /// `DRR features − frame features` for a DRR at this level. A DRR that misses the CT
    /// entirely (flat) counts as unlike the frame as a flat picture can be.
    fn residual(&self, img: &[f32], margin: f64) -> DVector<f64> {
        match self.features(img, margin) {
            Some(f) => f.residual(&self.frame),
            None => DVector::from_iterator(
                self.frame.channels.iter().map(Vec::len).sum(),
                self.frame.channels.iter().flatten().copied(),
            ),
        }
    }

    /// Mean correlation of a residual's channels.
    fn similarity(&self, r: &DVector<f64>) -> f64 {
        similarity(r, self.frame.channels.len())
    }
}

/// Refines `init` so that DRRs of `source`'s CT match `frame` (`height x width` line integrals
/// or any monotone image of them, row 0 at the top, the size of `camera`). `pivot` (world, mm)
/// is what the pose turns about, typically the centroid of the CT's landmarks.
///
/// A run that ends under [`IntensityOptions::restart_below`] is started again from the other
/// starts of [`IntensityOptions::restarts`] until one gets there, then from the best candidates
/// of [`IntensityOptions::search`]'s scan of views until one of them gets there; a run that ends beyond
/// [`IntensityOptions::max_angle_from_ap_deg`] counts as not having moved. The most similar
/// result is returned, and `similarity_before` is the given pose's.
pub fn refine(
    frame: &[f32],
    camera: &Camera,
    pivot: &Point3<f64>,
    init: &Pose,
    source: &mut dyn DrrSource,
    opts: &IntensityOptions,
) -> Result<Refinement, IntensityError> {
    refine_watched(frame, camera, pivot, init, source, opts, &Task::new())
}

/// [`refine`], reporting to `task` as it goes (the DRRs rendered as its progress, the run under
/// way as its message) and stopping with [`IntensityError::Cancelled`] before the next batch of
/// DRRs once `task` is cancelled. On a CPU's software renderer a refinement whose landmark pose
/// is no guide renders hundreds of DRRs over seconds; the app shows it and lets it go.
pub fn refine_watched(
    frame: &[f32],
    camera: &Camera,
    pivot: &Point3<f64>,
    init: &Pose,
    source: &mut dyn DrrSource,
    opts: &IntensityOptions,
    task: &Task,
) -> Result<Refinement, IntensityError> {
    let source = &mut Watched { source, task };
    task.set_message("from the landmark pose");
    if !init.is_finite() {
        return Err(IntensityError::Input(
            "the starting pose is not finite".into(),
        ));
    }
    if opts.levels.is_empty() {
        return Err(IntensityError::Input("no pyramid levels".into()));
    }
    // The frame's pyramid, built once for every run.
    let mut levels = opts
        .levels
        .iter()
        .map(|&spec| Level::new(frame, camera, spec, opts.margin))
        .collect::<Result<Vec<_>, _>>()?;
    // The frame's polarity, judged once at the given pose (from a far start the correlation's
    // sign says little). DRRs are bright where the CT attenuates; many X-ray formats (an XA cine
    // in MONOCHROME2, say) store the opposite. A negative correlation at the coarsest level
    // means the frame is matched inverted.
    let first = &levels[0];
    let inverted = first
        .features(
            &render_checked(source, &first.camera, &[*init])?[0],
            opts.margin,
        )
        .is_some_and(|f| first.similarity(&f.residual(&first.frame)) < 0.0);
    if inverted {
        levels.iter_mut().for_each(Level::invert);
    }
    let mut best = refine_once(&levels, pivot, init, source, opts)?;
    let first_unlike = best.similarity < opts.restart_below;
    let mut renders = 1 + best.renders;
    let similarity_before = best.similarity_before;
    let consider = |r: Refinement, start: &Pose, best: &mut Refinement| {
        // A run that did not move keeps its start, which is no answer: only a result more like
        // the frame than the given pose counts.
        if r.similarity > best.similarity && r.pose != *start {
            *best = Refinement {
                restarts: best.restarts,
                searched: best.searched,
                ..r
            };
        }
    };
    for (k, s) in opts.restarts.iter().enumerate() {
        if best.similarity >= opts.restart_below {
            break;
        }
        task.set_message(format!("restart {} of {}", k + 1, opts.restarts.len()));
        let start = s.apply(init, pivot);
        let r = refine_once(&levels, pivot, &start, source, opts)?;
        renders += r.renders;
        consider(r, &start, &mut best);
        best.restarts = k + 1;
    }
    // Once the landmark pose has led to an optimum unlike the frame, it is no guide, and a
    // restart near it that gets over the line may have found another wrong one (a depth or tilt
    // away: seen on h80, 74 mm off at 0.858): the scan's candidates compete with it, until one
    // of them gets over the line.
    if let Some(search) = opts.search.as_ref()
        && first_unlike
    {
        task.set_message("scanning the C-arm's views");
        let (starts, scanned) = scan(&levels[0], camera, pivot, init, source, opts, search)?;
        renders += scanned;
        for (k, start) in starts.iter().enumerate() {
            task.set_message(format!("scanned view {} of {}", k + 1, starts.len()));
            let r = refine_once(&levels, pivot, start, source, opts)?;
            renders += r.renders;
            let matched = r.similarity >= opts.restart_below;
            consider(r, start, &mut best);
            best.searched = k + 1;
            if matched {
                break;
            }
        }
    }
    // The first run never ends below the given pose (it falls back to it), and a later run
    // replaces it only by something more similar.
    best.renders = renders;
    best.similarity_before = similarity_before;
    best.inverted = inverted;
    Ok(best)
}

/// The scan of [`Search`]: every candidate view rendered at the coarsest `level`, placed across
/// the beam where it correlates best with the frame there; the `keep` most similar, best first,
/// and the DRRs it took.
fn scan(
    level: &Level,
    camera: &Camera,
    pivot: &Point3<f64>,
    init: &Pose,
    source: &mut Watched,
    opts: &IntensityOptions,
    search: &Search,
) -> Result<(Vec<Pose>, usize), IntensityError> {
    let poses = search.candidates(camera, pivot, init);
    // Placement correlates intensities; a level of gradients is compared where it stands.
    let shifts = level.spec.similarity == Similarity::Intensity && search.shift_fraction > 0.0;
    let canvas = Canvas::around(
        &level.camera,
        if shifts { search.shift_fraction } else { 0.0 },
    );
    let images = render_checked(source, &canvas.camera, &poses)?;
    let mut scored: Vec<(f64, Pose)> = if shifts {
        use rayon::prelude::*;
        let placement = Placement::new(level, opts.margin);
        images
            .par_iter()
            .zip(&poses)
            .filter_map(|(img, p)| {
                let (score, dx, dy) =
                    placement.best(&canvas, img, level.spec.blur_px, search.shift_step_px)?;
                Some((score, across(p, pivot, &level.camera, dx as f64, dy as f64)))
            })
            .collect()
    } else {
        images
            .iter()
            .zip(&poses)
            .map(|(img, p)| (level.similarity(&level.residual(img, opts.margin)), *p))
            .collect()
    };
    scored.retain(|(s, _)| s.is_finite());
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = poses.len();
    Ok((
        scored
            .into_iter()
            .take(search.keep)
            .map(|(_, p)| p)
            .collect(),
        n,
    ))
}

/// A camera like a level's, its detector widened by `pad_x`, `pad_y` pixels on each side: the
/// level's pixel `(x, y)` is the canvas's `(x + pad_x, y + pad_y)`, seen along the same ray.
struct Canvas {
    camera: Camera,
    pad_x: usize,
    pad_y: usize,
}

impl Canvas {
    /// `fraction` of `camera`'s width and height added on each side.
    fn around(camera: &Camera, fraction: f64) -> Self {
        let pad = |n: u32| (fraction.max(0.0) * n as f64).round() as usize;
        let (pad_x, pad_y) = (pad(camera.width_px), pad(camera.height_px));
        Self {
            camera: Camera {
                width_px: camera.width_px + 2 * pad_x as u32,
                height_px: camera.height_px + 2 * pad_y as u32,
                cx_px: camera.cx_px + pad_x as f64,
                cy_px: camera.cy_px + pad_y as f64,
                ..*camera
            },
            pad_x,
            pad_y,
        }
    }
}

/// The frame's intensities at the coarsest level, for placing a canvas DRR across the beam by
/// normalised cross-correlation: `Σ f g / |g − ḡ|` over the pixels inside the margin, with `f`
/// the frame's zero-mean unit channel (so `ḡ` drops out of the numerator).
struct Placement<'a> {
    frame: &'a [f64],
    /// The box inside the level's margin: x from, x to, y from, y to.
    inside: (usize, usize, usize, usize),
}

impl<'a> Placement<'a> {
    fn new(level: &'a Level, margin: f64) -> Self {
        let (w, h) = (
            level.camera.width_px as usize,
            level.camera.height_px as usize,
        );
        // The same box as `Features::new`.
        let m = ((margin * w.min(h) as f64).round() as usize).max(1);
        Self {
            frame: &level.frame.channels[0],
            inside: (m, w.saturating_sub(m), m, h.saturating_sub(m)),
        }
    }

    /// The best placement of `img` (a DRR on `canvas`, blurred here by `blur_px` as the level
    /// blurs): its correlation with the frame and the shift `(dx, dy)` (level pixels) by which
    /// the picture moves from where the canvas's centre window shows it. `None` when every
    /// window is flat.
    fn best(
        &self,
        canvas: &Canvas,
        img: &[f32],
        blur_px: f64,
        step: usize,
    ) -> Option<(f64, i64, i64)> {
        let (cw, ch) = (
            canvas.camera.width_px as usize,
            canvas.camera.height_px as usize,
        );
        let mut g = img.to_vec();
        if blur_px > 0.0 {
            crate::model::noise::gaussian_blur(&mut g, cw, ch, blur_px);
        }
        let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        let (x0, x1, y0, y1) = self.inside;
        let (iw, ih) = (x1 - x0, y1 - y0);
        let n = (iw * ih) as f64;
        // Summed-area tables of g and g², (cw + 1) x (ch + 1).
        let mut s1 = vec![0.0f64; (cw + 1) * (ch + 1)];
        let mut s2 = s1.clone();
        for y in 0..ch {
            let (mut r1, mut r2) = (0.0, 0.0);
            for x in 0..cw {
                let v = g[y * cw + x];
                r1 += v;
                r2 += v * v;
                s1[(y + 1) * (cw + 1) + x + 1] = s1[y * (cw + 1) + x + 1] + r1;
                s2[(y + 1) * (cw + 1) + x + 1] = s2[y * (cw + 1) + x + 1] + r2;
            }
        }
        let boxed = |s: &[f64], ox: usize, oy: usize| {
            let (a, b) = (oy * (cw + 1) + ox, (oy + ih) * (cw + 1) + ox);
            s[b + iw] - s[b] - s[a + iw] + s[a]
        };
        // The correlation with the window whose inside starts at canvas (ox, oy).
        let score = |dx: i64, dy: i64| -> Option<f64> {
            let ox: usize = (canvas.pad_x as i64 - dx + x0 as i64).try_into().ok()?;
            let oy: usize = (canvas.pad_y as i64 - dy + y0 as i64).try_into().ok()?;
            if ox + iw > cw || oy + ih > ch {
                return None;
            }
            let sum = boxed(&s1, ox, oy);
            let var = boxed(&s2, ox, oy) - sum * sum / n;
            // A flat (or non-finite) window.
            if var.is_nan() || var <= 1e-12 * n {
                return None;
            }
            let dot: f64 = (0..ih)
                .map(|y| {
                    let f = &self.frame[y * iw..(y + 1) * iw];
                    let row = &g[(oy + y) * cw + ox..(oy + y) * cw + ox + iw];
                    f.iter().zip(row).map(|(a, b)| a * b).sum::<f64>()
                })
                .sum();
            Some(dot / var.sqrt())
        };
        let (px, py) = (canvas.pad_x as i64, canvas.pad_y as i64);
        let step = step.max(1) as i64;
        let mut best: Option<(f64, i64, i64)> = None;
        let consider = |dx: i64, dy: i64, best: &mut Option<(f64, i64, i64)>| {
            if let Some(c) = score(dx, dy)
                && best.is_none_or(|b| c > b.0)
            {
                *best = Some((c, dx, dy));
            }
        };
        // The grid, through the unshifted placement, then every pixel about its best.
        for ky in -(py / step)..=py / step {
            for kx in -(px / step)..=px / step {
                consider(kx * step, ky * step, &mut best);
            }
        }
        let (_, bx, by) = best?;
        for dy in by - step + 1..by + step {
            for dx in bx - step + 1..bx + step {
                if dx.abs() <= px && dy.abs() <= py {
                    consider(dx, dy, &mut best);
                }
            }
        }
        best
    }
}

/// `pose` moved across the beam (at the pivot's depth) so that the pivot's image moves by
/// `(dx, dy)` pixels of `camera`.
fn across(pose: &Pose, pivot: &Point3<f64>, camera: &Camera, dx: f64, dy: f64) -> Pose {
    let z = pose.camera_from_world(pivot).z;
    let shift = Vector3::new(
        dx * camera.delx_mm * z / camera.sdd_mm,
        dy * camera.dely_mm * z / camera.sdd_mm,
        0.0,
    );
    Pose::from_matrix(&pose.rotation_matrix(), pose.translation_mm + shift)
}

/// The renderer of one refinement and the task it reports to.
struct Watched<'a> {
    source: &'a mut dyn DrrSource,
    task: &'a Task,
}

/// `poses` rendered as one batch, one image each; nothing once the task is cancelled.
fn render_checked(
    source: &mut Watched,
    camera: &Camera,
    poses: &[Pose],
) -> Result<Vec<Vec<f32>>, IntensityError> {
    if source.task.is_cancelled() {
        return Err(IntensityError::Cancelled);
    }
    let images = source
        .source
        .render_batch(camera, poses)
        .map_err(IntensityError::Render)?;
    source.task.inc(poses.len() as u64);
    if images.len() != poses.len() {
        return Err(IntensityError::Render(format!(
            "{} images for {} poses",
            images.len(),
            poses.len()
        )));
    }
    Ok(images)
}

/// One run of [`refine`] from `init` through the frame's pyramid `levels` (coarse to fine, of
/// the polarity [`refine`] found). Its `inverted` is left for [`refine`] to set.
fn refine_once(
    levels: &[Level],
    pivot: &Point3<f64>,
    init: &Pose,
    source: &mut Watched,
    opts: &IntensityOptions,
) -> Result<Refinement, IntensityError> {
    let mut renders = 0usize;
    let mut render = |cam: &Camera, poses: &[Pose], n: &mut usize| {
        *n += poses.len();
        render_checked(source, cam, poses)
    };
    let residual = |level: &Level, img: &[f32]| level.residual(img, opts.margin);

    let finest = levels.len() - 1;
    let r_init = residual(
        &levels[finest],
        &render(&levels[finest].camera, &[*init], &mut renders)?[0],
    );
    let mut pose = *init;
    let mut steps = 0;
    let mut r_last = r_init.clone();
    for (li, level) in levels.iter().enumerate() {
        let cam = &level.camera;
        // Finite-difference steps of about half an object-space pixel: the pivot's pixel
        // footprint sets the translation step, 100 mm of lever arm the rotation step, and depth,
        // which only rescales the image, gets four times the in-plane step.
        let depth = pose.camera_from_world(pivot).z.max(1.0);
        let px_mm = cam.delx_mm.max(cam.dely_mm) * depth / cam.sdd_mm;
        let step_mm = 0.5 * px_mm;
        let scale = Vector6::new(
            step_mm / 100.0,
            step_mm / 100.0,
            step_mm / 100.0,
            step_mm,
            step_mm,
            4.0 * step_mm,
        );
        let mut r = if li == finest && pose == *init {
            r_init.clone()
        } else {
            residual(level, &render(cam, &[pose], &mut renders)?[0])
        };
        let mut lambda = 1e-3;
        for _ in 0..opts.max_iterations {
            let pivot_cam = pose.camera_from_world(pivot).coords;
            // Central differences: the forward ones' error (half the curvature times the
            // step) is what stalled the steps along the depth valley.
            let probes: Vec<Pose> = (0..12)
                .map(|k| {
                    let mut d = Vector6::zeros();
                    d[k / 2] = if k % 2 == 0 {
                        scale[k / 2]
                    } else {
                        -scale[k / 2]
                    };
                    moved(&pose, &pivot_cam, &d)
                })
                .collect();
            let images = render(cam, &probes, &mut renders)?;
            let mut jac = DMatrix::zeros(r.len(), 6);
            for k in 0..6 {
                let col =
                    (residual(level, &images[2 * k]) - residual(level, &images[2 * k + 1])) * 0.5;
                jac.set_column(k, &col);
            }
            let a: Matrix6<f64> = (jac.transpose() * &jac).fixed_view::<6, 6>(0, 0).into();
            let g: Vector6<f64> = (jac.transpose() * &r).fixed_rows::<6>(0).into();
            let mut accepted = None;
            while lambda < 1e6 {
                let mut m = a;
                for k in 0..6 {
                    m[(k, k)] += lambda * a[(k, k)].max(1e-12);
                }
                let Some(chol) = m.cholesky() else {
                    lambda *= 8.0;
                    continue;
                };
                let mut u = -chol.solve(&g);
                // A trust region of 20 steps (about 10 pixels): the gradients' linearity ends
                // well before that.
                let n = u.norm();
                if n > 20.0 {
                    u *= 20.0 / n;
                }
                let cand = moved(&pose, &pivot_cam, &u.component_mul(&scale));
                let rc = residual(level, &render(cam, &[cand], &mut renders)?[0]);
                if rc.norm_squared() < r.norm_squared() {
                    accepted = Some((cand, rc, u.norm()));
                    lambda = (lambda / 4.0).max(1e-7);
                    break;
                }
                lambda *= 8.0;
            }
            let Some((cand, rc, u_norm)) = accepted else {
                break;
            };
            let gain = r.norm_squared() - rc.norm_squared();
            pose = cand;
            r = rc;
            steps += 1;
            // A unit of `u` is a finite-difference step: about half a pixel of this level.
            if gain < 1e-5 * r.norm_squared() || 0.5 * u_norm < opts.converged_px {
                break;
            }
        }
        r_last = r;
    }
    let (before, after) = (
        levels[finest].similarity(&r_init),
        levels[finest].similarity(&r_last),
    );
    // A view from behind is the mirror optimum, not the C-arm's pose.
    let plausible = angle_from_ap_rad(&pose).to_degrees() <= opts.max_angle_from_ap_deg;
    Ok(if after > before && plausible {
        Refinement {
            pose,
            similarity_before: before,
            similarity: after,
            renders,
            steps,
            inverted: false,
            restarts: 0,
            searched: 0,
        }
    } else {
        Refinement {
            pose: *init,
            similarity_before: before,
            similarity: before,
            renders,
            steps,
            inverted: false,
            restarts: 0,
            searched: 0,
        }
    })
}

/// Carries a refinement over to another pose of the same C-arm: the correction that took `from`
/// (a landmark pose) to `refined`, expressed in the camera frame, applied to `to` (a later
/// frame's landmark pose). Landmark poses at nearby views err alike (mostly in depth, slowly as
/// the C-arm moves), so a refinement a few frames old still corrects most of a live pose's
/// error while the next refinement runs.
pub fn transfer(from: &Pose, refined: &Pose, to: &Pose) -> Pose {
    let rc = refined.rotation_matrix() * from.rotation_matrix().transpose();
    let tc = refined.translation_mm - rc * from.translation_mm;
    Pose::from_matrix(&(rc * to.rotation_matrix()), rc * to.translation_mm + tc)
}

/// The centroid of the points: the pivot [`refine`] turns the pose about.
pub fn centroid(points: &[Point3<f64>]) -> Point3<f64> {
    let n = points.len().max(1) as f64;
    Point3::from(points.iter().map(|p| p.coords).sum::<Vector3<f64>>() / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_averages_blocks() {
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let d = downsample(&img, 4, 4, 2, 2);
        assert_eq!(d, vec![2.5, 4.5, 10.5, 12.5]);
        assert_eq!(downsample(&img, 4, 4, 4, 4), img);
    }

    #[test]
    fn features_see_gain_and_offset_as_equal() {
        let (w, h) = (32, 24);
        let img: Vec<f32> = (0..w * h)
            .map(|i| ((i % w) as f32 * 0.3).sin() + ((i / w) as f32 * 0.2).cos())
            .collect();
        let bright: Vec<f32> = img.iter().map(|v| 3.0 * v + 7.0).collect();
        let (a, b) = (
            Features::new(&img, w, h, Similarity::Gradient, 1.0, 0.05).unwrap(),
            Features::new(&bright, w, h, Similarity::Gradient, 1.0, 0.05).unwrap(),
        );
        assert!((similarity(&a.residual(&b), 2) - 1.0).abs() < 1e-9);
        let inverted: Vec<f32> = img.iter().map(|v| -v).collect();
        let c = Features::new(&inverted, w, h, Similarity::Gradient, 1.0, 0.05).unwrap();
        assert!((similarity(&a.residual(&c), 2) + 1.0).abs() < 1e-9);
        for sim in [Similarity::Gradient, Similarity::Intensity] {
            let flat = vec![1.0; w * h];
            assert!(Features::new(&flat, w, h, sim, 1.0, 0.05).is_none());
            let a = Features::new(&img, w, h, sim, 0.0, 0.05).unwrap();
            let b = Features::new(&bright, w, h, sim, 0.0, 0.05).unwrap();
            assert!((similarity(&a.residual(&b), a.channels.len()) - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn a_transferred_correction_is_the_refinement_on_its_own_frame_and_moves_with_the_carm() {
        let from = Pose::new(
            Vector3::new(0.1, -0.2, 0.05),
            Vector3::new(5.0, -3.0, 800.0),
        );
        let refined = Pose::new(
            Vector3::new(0.11, -0.19, 0.04),
            Vector3::new(4.0, -2.0, 790.0),
        );
        let same = transfer(&from, &refined, &from);
        assert!((same.rotation - refined.rotation).norm() < 1e-12);
        assert!((same.translation_mm - refined.translation_mm).norm() < 1e-9);
        // The C-arm then moves by some M (world side): the corrected pose moves by the same M.
        let m = Pose::new(Vector3::new(0.0, 0.05, 0.0), Vector3::new(10.0, 0.0, -5.0));
        let then = |p: &Pose| {
            Pose::from_matrix(
                &(p.rotation_matrix() * m.rotation_matrix()),
                p.rotation_matrix() * m.translation_mm + p.translation_mm,
            )
        };
        let moved = transfer(&from, &refined, &then(&from));
        let want = then(&refined);
        assert!((moved.rotation - want.rotation).norm() < 1e-12);
        assert!((moved.translation_mm - want.translation_mm).norm() < 1e-9);
    }

    #[test]
    fn the_scan_puts_the_pivot_where_the_start_shows_it_in_every_view_and_depth() {
        let search = Search::grid(40.0, 5, vec![700.0, 900.0], 3);
        assert_eq!(search.turns.len(), 125);
        let a = 40f64.to_radians();
        assert!(search.turns.contains(&Vector3::zeros()));
        assert!(search.turns.contains(&Vector3::new(-a, a, -a)));
        assert!(search.turns.iter().all(|t| t.amax() <= a + 1e-12));
        let camera = Camera::paper(128);
        let pivot = Point3::new(12.0, -40.0, 30.0);
        let init = perturbed_pose(
            &pivot,
            760.0,
            &Vector3::new(0.3, -0.2, 0.1),
            &Vector3::new(30.0, -20.0, 0.0),
        );
        let uv = camera.project(&init, &pivot);
        let poses = search.candidates(&camera, &pivot, &init);
        assert_eq!(poses.len(), 250);
        for (k, p) in poses.iter().enumerate() {
            let c = p.camera_from_world(&pivot);
            assert!((c.z - search.depths_mm[k % 2]).abs() < 1e-9);
            assert!((camera.project(p, &pivot) - uv).norm() < 1e-9);
        }
        // Each view is its turn from AP, whatever the depth.
        let ap = perturbed_pose(&pivot, 800.0, &Vector3::zeros(), &Vector3::zeros());
        assert!((poses[2 * 62].rotation_matrix() - ap.rotation_matrix()).norm() < 1e-12);
        // A start that puts the pivot behind the source says nothing of where it is: the centre.
        let behind = Pose::from_matrix(
            &init.rotation_matrix(),
            init.translation_mm - Vector3::new(0.0, 0.0, 2000.0),
        );
        for p in search.candidates(&camera, &pivot, &behind) {
            let q = camera.project(&p, &pivot);
            assert!((q - Point2::new(camera.cx_px, camera.cy_px)).norm() < 1e-9);
        }
    }

    /// A DRR on the scan's canvas shows in its centre window what the level's camera shows (the
    /// same rays), and the placement finds, to the pixel, how far across the beam a frame was
    /// rendered from the candidate: the correlation the candidate lacks where it stands.
    #[test]
    fn the_scan_places_a_candidate_across_the_beam_where_the_frame_shows_it() {
        use crate::drr::{Attenuation, CpuDrr, DensityVolume};
        let (vol, lm) = crate::volume::phantom::phantom_subject(61, Some(4.0));
        let pivot = centroid(lm.all().expect("phantom landmarks are all set").as_slice());
        let mut source = CpuDrr {
            volume: std::sync::Arc::new(DensityVolume::from_volume(&vol, Attenuation::default())),
            renderer: crate::drr::cpu::Renderer::Siddon { full_line: false },
        };
        let camera = Camera::paper(256);
        let pose = perturbed_pose(
            &vol.center_mm(),
            800.0,
            &Vector3::new(0.3, -0.2, 0.1),
            &Vector3::zeros(),
        );
        // The frame shows the CT moved across the beam by (11, -7) pixels of the 64-px level.
        let (dx, dy) = (11, -7);
        let shifted = across(&pose, &pivot, &camera.rescaled(0.25), dx as f64, dy as f64);
        let frame = source.render(&camera, &shifted).unwrap();
        let spec = LevelSpec::new(64, Similarity::Intensity, 2.0);
        let level = Level::new(&frame, &camera, spec, 0.03).unwrap();
        let canvas = Canvas::around(&level.camera, 0.5);
        assert_eq!(
            (canvas.camera.width_px, canvas.pad_x, canvas.pad_y),
            (128, 32, 32)
        );
        let wide = source.render(&canvas.camera, &pose).unwrap();
        let direct = source.render(&level.camera, &pose).unwrap();
        let top = direct.iter().fold(0f32, |a, &b| a.max(b));
        for y in 0..64 {
            for x in 0..64 {
                let (a, b) = (wide[(y + 32) * 128 + x + 32], direct[y * 64 + x]);
                assert!(
                    (a - b).abs() <= 1e-4 * top,
                    "({x}, {y}): {a} on the canvas, {b}"
                );
            }
        }
        let (score, bx, by) = Placement::new(&level, 0.03)
            .best(&canvas, &wide, spec.blur_px, 2)
            .unwrap();
        let unplaced = level.similarity(&level.residual(&direct, 0.03));
        println!("placed at ({bx}, {by}): {score:.3}; where it stands: {unplaced:.3}");
        assert!(
            (bx - dx).abs() <= 1 && (by - dy).abs() <= 1,
            "placed at ({bx}, {by}), correlation {score:.3}"
        );
        assert!(
            score > 0.95 && score > unplaced + 0.2,
            "placed {score:.3}, where it stands {unplaced:.3}"
        );
        // Placed there, the candidate is the frame's pose to within a level pixel across the beam.
        let placed = across(&pose, &pivot, &level.camera, bx as f64, by as f64);
        let mm_per_px = level.camera.delx_mm * 800.0 / level.camera.sdd_mm;
        assert!(
            (placed.translation_mm - shifted.translation_mm).norm() <= 1.5 * mm_per_px,
            "{} mm off, a pixel is {mm_per_px:.1} mm",
            (placed.translation_mm - shifted.translation_mm).norm()
        );
    }

    #[test]
    fn moving_about_the_pivot_keeps_it_in_place() {
        let pose = Pose::new(
            Vector3::new(0.1, -0.2, 0.05),
            Vector3::new(5.0, -3.0, 800.0),
        );
        let pivot = Point3::new(10.0, 20.0, -30.0);
        let c = pose.camera_from_world(&pivot).coords;
        let turned = moved(&pose, &c, &Vector6::new(0.1, 0.2, -0.1, 0.0, 0.0, 0.0));
        assert!((turned.camera_from_world(&pivot).coords - c).norm() < 1e-9);
        let shifted = moved(&pose, &c, &Vector6::new(0.0, 0.0, 0.0, 1.0, 2.0, 3.0));
        let d = shifted.camera_from_world(&pivot).coords - c;
        assert!((d - Vector3::new(1.0, 2.0, 3.0)).norm() < 1e-9);
    }
}
