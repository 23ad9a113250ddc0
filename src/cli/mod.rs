//! Command-line interface: one subcommand per thing the app does, for headless use.
//! Errors are reported here with context; the library's typed errors carry the details.

use crate::drr::{Attenuation, DensityVolume, cpu};
use crate::geometry::{Camera, Pose, diffdrr};
use crate::landmarks::Landmarks3d;
use crate::volume::{self, Volume};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nalgebra::{Point3, Vector3};
use std::path::{Path, PathBuf};

mod learn;

/// Real-time pelvic fluoroscopy: landmarks, 2D/3D registration, DRR verification.
#[derive(Parser, Debug)]
#[command(name = "fluoropose", version, about, long_about = None)]
pub struct Cli {
    /// What to do; with none, the desktop app opens (on its embedded default).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Run the app, save a screenshot of the window here after `--frames` frames, and quit.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    /// Frames to run before the screenshot.
    #[arg(long, default_value_t = 60)]
    pub frames: u32,
    /// The tab the app opens on (live, ct, annotate, train).
    #[arg(long)]
    pub tab: Option<String>,
    /// Play these frames (an X-ray DICOM or cine, an image, or a folder of them) instead of
    /// the simulated stream.
    #[arg(long)]
    pub open: Option<PathBuf>,
    /// The stream's frame clock in frames per second, kept as the setting (default: the saved
    /// setting, first 10).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Refine the poses against the CT (intensity-based): off, on paused frames (and the
    /// playing stream while the C-arm holds still), or always (while playing too); kept as the
    /// setting (default: the saved setting, first always where the DRRs run on a discrete GPU,
    /// else paused).
    #[arg(long, value_parser = ["off", "paused", "always"])]
    pub refine: Option<String>,
    /// Present frames without waiting for the display's vertical blank (lower latency; may
    /// tear).
    #[arg(long)]
    pub no_vsync: bool,
    /// The embedded network the Live tab starts with (default: `default` where the network
    /// runs on a GPU or 4+ CPU threads, `compact` on fewer).
    #[arg(long, value_enum)]
    pub network: Option<crate::model::shipped::Shipped>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a CT: dimensions, spacing, orientation, HU range, series.
    Info(InfoArgs),
    /// Generate pelvis phantom subjects (NIfTI + Slicer markups of the 8 landmarks).
    Phantom(PhantomArgs),
    /// Project CT voxel centres to detector pixels for a DiffDRR pose (JSON `[[u, v], ...]`).
    Project(ProjectArgs),
    /// Render a DRR of a CT at a pose (.npy float32, 16-bit .png or .tif).
    Render(RenderArgs),
    /// Solve the C-arm pose from 2D-3D landmark correspondences (paper eqs. 3-8).
    Register(RegisterArgs),
    /// Measure speed (and, for registration, the paper solver's success rate).
    Bench(BenchArgs),
    /// Describe the X-ray frames of a file or folder (DICOM, cine, PNG, TIFF) and their C-arm header.
    Frames(FramesArgs),
    /// Record a simulated C-arm stream: noisy DRRs along a smooth trajectory, with the true poses.
    Simulate(SimulateArgs),
    /// Generate a training dataset: DRRs of CTs at random poses with their 2D landmarks.
    Dataset(learn::DatasetArgs),
    /// Train the landmark U-Net (baseline BCE, composite, pose-loss only, or pose-loss fine-tuning).
    Train(learn::TrainArgs),
    /// Evaluate a model on a dataset as the paper's Table 1 (RMSE at 512 scale, TRE).
    Eval(learn::EvalArgs),
    /// Detect the 8 landmarks on X-ray frames and solve the pose.
    Predict(learn::PredictArgs),
    /// Label X-ray frames of a CT'd patient for training, without an annotator: landmarks,
    /// pose, the pose refined against the CT, and the CT's landmarks projected at it.
    Label(learn::LabelArgs),
    /// The whole Table 1 study: generate, train four ways, evaluate both splits.
    Experiment(learn::ExperimentArgs),
}

/// `fluoropose frames`.
#[derive(Args, Debug)]
pub struct FramesArgs {
    /// A DICOM file (single or multi-frame), a PNG/TIFF, or a folder of them.
    pub path: PathBuf,
}

/// `fluoropose simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// The CT: NIfTI file or DICOM folder, or `phantom:N` (default: the phantom).
    #[arg(long, default_value = "phantom:0")]
    pub ct: String,
    /// Number of frames.
    #[arg(long, default_value_t = 30)]
    pub frames: u64,
    /// Frames per second of stream time.
    #[arg(long, default_value_t = 15.0)]
    pub fps: f64,
    /// Image size (square, the paper's C-arm rescaled).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Photons per pixel for quantum noise, seen through the datasets' detector blur (0.75 mm,
    /// `dataset --blur 0.5` at 256 px), so a dose is as noisy here as in a dataset (0: clean
    /// DRRs, neither noise nor blur).
    #[arg(long, default_value_t = 2000.0)]
    pub photons: f64,
    /// Noise seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Use the CPU reference renderer.
    #[arg(long)]
    pub cpu: bool,
    /// Output folder: frame_NNNN.npy and poses.jsonl.
    #[arg(long)]
    pub out: PathBuf,
}

/// Which registration solver.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverArg {
    /// Robust P3P initialisation + Levenberg-Marquardt (production).
    Lm,
    /// The paper's Adam (lr 1e-3, 100 iterations from r = t = 0).
    AdamPaper,
    /// The paper's L-BFGS variant (100 iterations from r = t = 0).
    LbfgsPaper,
}

/// `fluoropose register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// N 3D points, mm: JSON `[[x,y,z],...]`, or a landmark file (.mrk.json, .fcsv, .csv).
    #[arg(long)]
    pub points3d: PathBuf,
    /// N pixel points: JSON `[[u,v],...]` (null for an absent one).
    #[arg(long)]
    pub points2d: PathBuf,
    #[command(flatten)]
    pub camera: CameraArgs,
    /// Solver.
    #[arg(long, value_enum, default_value_t = SolverArg::Lm)]
    pub solver: SolverArg,
    /// Per-point weights "w1,w2,..." (e.g. heatmap confidences).
    #[arg(long)]
    pub weights: Option<String>,
    /// Start at this pose "rx,ry,rz,tx,ty,tz" (Rodrigues rad, mm) instead of the solver's own start.
    #[arg(long, allow_hyphen_values = true)]
    pub from_pose: Option<String>,
}

/// `fluoropose bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// DRR rendering: GPU single frames and 64-pose batches, and the CPU reference, at 256, 512
    /// and 768 pixels square.
    Drr {
        /// The CT (default: DiffDRR's chest CT when fetched, else the phantom).
        #[arg(long)]
        ct: Option<String>,
        /// Image sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [256u32, 512, 768])]
        sizes: Vec<u32>,
        /// Skip the (slow) CPU reference.
        #[arg(long)]
        no_cpu: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The U-Net: forward per frame (fast kernels and candle's own) and one training step.
    Model {
        /// Input size (square).
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Base channels [default: the shipped model's].
        #[arg(long)]
        base: Option<usize>,
        /// Encoder depth [default: the shipped model's].
        #[arg(long)]
        depth: Option<usize>,
        /// Training batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Repetitions (median reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also time candle's own convolution for comparison.
        #[arg(long)]
        reference: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The Live tab's pipeline without a window (simulated stream -> model -> pose ->
    /// verification DRR): frames per second and frame-to-result latency.
    Pipeline(crate::bench::PipelineOptions),
    /// Intensity-based pose refinement: time per frame and TRE before and after, from starts
    /// as far off as the landmark solver leaves them.
    Refine {
        /// Frames.
        #[arg(long, default_value_t = 20)]
        frames: usize,
        /// Render on the CPU reference instead of the GPU.
        #[arg(long)]
        cpu: bool,
        /// A CT (NIfTI file or DICOM folder) instead of the app's default phantom: its frames
        /// are DRRs of it, and the poses are drawn around its landmarks' centroid.
        #[arg(long)]
        ct: Option<PathBuf>,
        /// The CT's 3D landmarks (Slicer markups JSON, .fcsv or CSV; at least 3 placed): the
        /// points the TRE is measured at (default: NAME.mrk.json, .fcsv or .csv beside the CT).
        #[arg(long, requires = "ct")]
        landmarks: Option<PathBuf>,
        /// A pyramid level has converged once a step moves the image by less than this, pixels
        /// of the level (0: once a step no longer lowers the residual; default: the app's).
        #[arg(long)]
        converged_px: Option<f64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One 8-point solve per solver, over poses drawn from the paper's range.
    Register {
        /// Number of problems.
        #[arg(long, default_value_t = 500)]
        problems: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `fluoropose info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A NIfTI file, a DICOM folder, one DICOM file of a series, or `phantom:N`.
    pub ct: String,
    /// SeriesInstanceUID, when the folder holds several series.
    #[arg(long)]
    pub series: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `fluoropose phantom`.
#[derive(Args, Debug)]
pub struct PhantomArgs {
    /// Subject id `N`, or a range `FIRST..LAST` (inclusive).
    #[arg(long, default_value = "0")]
    pub subject: String,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Voxel size, mm.
    #[arg(long, default_value_t = 2.0)]
    pub spacing: f64,
    /// Also write each subject as a DICOM CT series (a folder of slices).
    #[arg(long)]
    pub dicom: bool,
}

/// Camera options shared by `project` and `render` (DiffDRR's `DRR(...)` arguments).
#[derive(Args, Debug, Clone)]
pub struct CameraArgs {
    /// Detector rows.
    #[arg(long)]
    pub height: u32,
    /// Detector columns (default: height).
    #[arg(long)]
    pub width: Option<u32>,
    /// Pixel spacing along x, mm.
    #[arg(long)]
    pub delx: f64,
    /// Pixel spacing along y, mm (default: delx).
    #[arg(long)]
    pub dely: Option<f64>,
    /// Source-to-detector distance, mm.
    #[arg(long)]
    pub sdd: f64,
}

impl CameraArgs {
    fn camera(&self) -> Result<Camera> {
        let cam = diffdrr::camera(self.sdd, self.height, self.delx, self.width, self.dely);
        cam.validate().map_err(anyhow::Error::msg)?;
        Ok(cam)
    }
}

/// `fluoropose project`.
#[derive(Args, Debug)]
pub struct ProjectArgs {
    /// The CT (its geometry places the voxels and the DiffDRR isocentre).
    #[arg(long)]
    pub ct: PathBuf,
    #[command(flatten)]
    pub camera: CameraArgs,
    /// DiffDRR pose "a,b,c,x,y,z": ZXY Euler angles (rad) and translation (mm).
    #[arg(long, allow_hyphen_values = true)]
    pub diffdrr_pose: String,
    /// Voxel indices "i,j,k;i,j,k;..." (0-based, the file's own index order).
    #[arg(long, allow_hyphen_values = true)]
    pub voxels: String,
}

/// Which ray integral `render` computes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RendererArg {
    /// Exact Siddon ray traversal.
    Siddon,
    /// Trilinear ray marching (DiffDRR's 500 samples).
    Trilinear,
}

/// HU -> attenuation model.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttenuationArg {
    /// DiffDRR's min-max normalised density (the default with --diffdrr-pose).
    Diffdrr,
    /// mu = 0.02/mm (1 + HU/1000) (the default with --pose).
    Physical,
    /// Bone above 200 HU only.
    Bone,
}

/// `fluoropose render`.
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// The CT: NIfTI file or DICOM folder, or `phantom:N`.
    #[arg(long)]
    pub ct: String,
    #[command(flatten)]
    pub camera: CameraArgs,
    /// Ray integral.
    #[arg(long, value_enum, default_value_t = RendererArg::Siddon)]
    pub renderer: RendererArg,
    /// Use the CPU reference renderer.
    #[arg(long)]
    pub cpu: bool,
    /// This project's pose "rx,ry,rz,tx,ty,tz": Rodrigues vector (rad), translation (mm).
    #[arg(long, allow_hyphen_values = true, conflicts_with = "diffdrr_pose")]
    pub pose: Option<String>,
    /// DiffDRR pose "a,b,c,x,y,z" (ZXY Euler, rad; mm), exactly as DiffDRR 0.6.1 renders it.
    #[arg(long, allow_hyphen_values = true)]
    pub diffdrr_pose: Option<String>,
    /// HU -> attenuation.
    #[arg(long, value_enum)]
    pub attenuation: Option<AttenuationArg>,
    /// Output file: .npy, .png or .tif(f).
    #[arg(long)]
    pub out: PathBuf,
    /// Also project these 3D landmarks (.mrk.json, .fcsv, .csv; `auto` for a phantom's own), print
    /// their pixels as JSON and write `<out>.overlay.png` with them drawn on the DRR.
    #[arg(long)]
    pub landmarks: Option<String>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => {
            let tab = match cli.tab.as_deref() {
                Some(t) => Some(
                    crate::app::Tab::parse(t)
                        .with_context(|| format!("--tab {t:?}: use live, ct, annotate or train"))?,
                ),
                None => None,
            };
            crate::app::run(crate::app::AppOptions {
                screenshot: cli.screenshot,
                frames: cli.frames,
                tab,
                open: cli.open,
                fps: cli.fps,
                refine: cli.refine.map(|r| match r.as_str() {
                    "off" => crate::app::RefineMode::Off,
                    "always" => crate::app::RefineMode::Always,
                    _ => crate::app::RefineMode::Paused,
                }),
                no_vsync: cli.no_vsync,
                network: cli.network,
            })
        }
        Some(Command::Info(a)) => info(&a),
        Some(Command::Phantom(a)) => phantom(&a),
        Some(Command::Project(a)) => project(&a),
        Some(Command::Render(a)) => render(&a),
        Some(Command::Register(a)) => register(&a),
        Some(Command::Frames(a)) => frames(&a),
        Some(Command::Simulate(a)) => simulate(&a),
        Some(Command::Dataset(a)) => learn::dataset(&a),
        Some(Command::Train(a)) => learn::train(&a),
        Some(Command::Eval(a)) => learn::eval(&a),
        Some(Command::Predict(a)) => learn::predict(&a),
        Some(Command::Label(a)) => learn::label(&a),
        Some(Command::Experiment(a)) => learn::experiment(&a),
        Some(Command::Bench(a)) => match a.what {
            BenchWhat::Register { problems, json } => crate::bench::register(problems, json),
            BenchWhat::Refine {
                frames,
                cpu,
                ct,
                landmarks,
                converged_px,
                json,
            } => crate::bench::refine(
                frames,
                cpu,
                ct.as_deref(),
                landmarks.as_deref(),
                converged_px,
                json,
            ),
            BenchWhat::Pipeline(o) => crate::bench::pipeline(&o),
            BenchWhat::Model {
                size,
                base,
                depth,
                batch,
                reps,
                reference,
                json,
            } => {
                // Time the default shipped network unless told otherwise.
                let shipped = crate::model::shipped::config().unwrap_or_default();
                crate::bench::model(
                    &learn::device(),
                    size,
                    base.unwrap_or(shipped.base_channels),
                    depth.unwrap_or(shipped.depth),
                    batch,
                    reps,
                    reference,
                    json,
                )
            }
            BenchWhat::Drr {
                ct,
                sizes,
                no_cpu,
                json,
            } => crate::bench::drr(ct.as_deref(), &sizes, !no_cpu, json),
        },
    }
}

/// An error and its causes on one line, as `{:#}` prints them, but without a cause whose text the
/// message before it already says: the library's errors name their cause in their own message
/// (so the app's one-line status reads whole) and also return it as `source()`, which `{:#}`
/// would print twice ("x.nii: no such file: no such file").
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Loads a CT given as a path or `phantom:N`.
pub fn load_ct(spec: &str, series: Option<&str>) -> Result<Volume> {
    if let Some(id) = spec.strip_prefix("phantom:") {
        let id: u64 = id
            .parse()
            .with_context(|| format!("\"{spec}\": the phantom subject must be a number"))?;
        return Ok(volume::phantom::phantom_subject(id, None).0);
    }
    volume::read_volume(Path::new(spec), series).with_context(|| format!("loading the CT {spec}"))
}

fn info(a: &InfoArgs) -> Result<()> {
    let v = load_ct(&a.ct, a.series.as_deref())?;
    let (lo, hi) = v.hu_range();
    let d = v.dims();
    let s = v.spacing_mm();
    let o = v.origin_mm();
    if a.json {
        let j = serde_json::json!({
            "source": v.meta.source,
            "dims": d,
            "spacing_mm": s,
            "origin_lps_mm": [o.x, o.y, o.z],
            "direction": v.direction().as_slice(),
            "orientation": v.orientation_code(),
            "hu_range": [lo, hi],
            "modality": v.meta.modality,
            "series_uid": v.meta.series_uid,
            "description": v.meta.description,
            "warnings": v.meta.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("source:       {}", v.meta.source);
    println!("modality:     {}", v.meta.modality);
    if let Some(uid) = &v.meta.series_uid {
        println!("series:       {uid}");
    }
    if !v.meta.description.is_empty() {
        println!("description:  {}", v.meta.description);
    }
    println!("dimensions:   {} x {} x {} voxels", d[0], d[1], d[2]);
    println!("spacing:      {:.4} x {:.4} x {:.4} mm", s[0], s[1], s[2]);
    let e = v.extent_mm();
    println!("extent:       {:.1} x {:.1} x {:.1} mm", e[0], e[1], e[2]);
    println!(
        "orientation:  {} (voxel axes i, j, k point to)",
        v.orientation_code()
    );
    println!("origin (LPS): ({:.3}, {:.3}, {:.3}) mm", o.x, o.y, o.z);
    println!("HU range:     {lo:.1} .. {hi:.1}");
    for w in &v.meta.warnings {
        println!("warning:      {w}");
    }
    Ok(())
}

fn parse_range(s: &str) -> Result<(u64, u64)> {
    let (a, b) = match s.split_once("..") {
        Some((a, b)) => (a.trim().parse()?, b.trim().parse()?),
        None => {
            let n = s.trim().parse()?;
            (n, n)
        }
    };
    if b < a {
        bail!("empty subject range {s}");
    }
    Ok((a, b))
}

pub(crate) fn progress(n: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn phantom(a: &PhantomArgs) -> Result<()> {
    let (first, last) =
        parse_range(&a.subject).with_context(|| format!("--subject \"{}\"", a.subject))?;
    if !(a.spacing.is_finite() && a.spacing >= 0.25) {
        bail!("--spacing must be at least 0.25 mm");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pb = progress(last - first + 1, "phantom");
    for id in first..=last {
        let (vol, lm) = volume::phantom::phantom_subject(id, Some(a.spacing));
        let stem = format!("phantom_{id:04}");
        let nii = a.out.join(format!("{stem}.nii.gz"));
        volume::write_nifti(&vol, &nii)?;
        lm.write(&a.out.join(format!("{stem}.mrk.json")))?;
        if a.dicom {
            let o = volume::DicomWriteOptions {
                description: vol.meta.description.clone(),
                ..Default::default()
            };
            volume::write_dicom_series(&vol, &a.out.join(format!("{stem}_dicom")), &o)?;
        }
        pb.inc(1);
        pb.println(format!(
            "{} ({} x {} x {} voxels)",
            nii.display(),
            vol.dims()[0],
            vol.dims()[1],
            vol.dims()[2]
        ));
    }
    pb.finish_and_clear();
    Ok(())
}

fn parse_voxels(s: &str) -> Result<Vec<Point3<f64>>> {
    s.split(';')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let v: Vec<f64> = t
                .split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("voxel \"{t}\" is not three numbers"))?;
            match v.as_slice() {
                [i, j, k] if v.iter().all(|x| x.is_finite()) => Ok(Point3::new(*i, *j, *k)),
                _ => bail!("voxel \"{t}\" is not three numbers i,j,k"),
            }
        })
        .collect()
}

fn project(a: &ProjectArgs) -> Result<()> {
    let cam = a.camera.camera()?;
    let dpose = diffdrr::DiffDrrPose::parse(&a.diffdrr_pose).map_err(anyhow::Error::msg)?;
    let voxels = parse_voxels(&a.voxels)?;
    let vol = load_ct(&a.ct.to_string_lossy(), None)?;
    let pose = dpose.to_pose(&vol.center_mm());
    let uv: Vec<[f64; 2]> = voxels
        .iter()
        .map(|ijk| {
            let p = cam.project(&pose, &vol.voxel_to_world(*ijk));
            [p.x, p.y]
        })
        .collect();
    println!("{}", serde_json::to_string(&uv)?);
    Ok(())
}

fn parse_pose(s: &str) -> Result<Pose> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--pose \"{s}\" is not six numbers"))?;
    if v.len() != 6 || v.iter().any(|x| !x.is_finite()) {
        bail!("--pose needs six finite numbers rx,ry,rz,tx,ty,tz, got \"{s}\"");
    }
    Ok(Pose::new(
        Vector3::new(v[0], v[1], v[2]),
        Vector3::new(v[3], v[4], v[5]),
    ))
}

fn render(a: &RenderArgs) -> Result<()> {
    let cam = a.camera.camera()?;
    let vol = load_ct(&a.ct, None)?;
    let (pose, default_att) = match (&a.pose, &a.diffdrr_pose) {
        (Some(p), None) => (parse_pose(p)?, AttenuationArg::Physical),
        (None, Some(d)) => (
            diffdrr::DiffDrrPose::parse(d)
                .map_err(anyhow::Error::msg)?
                .to_pose(&vol.center_mm()),
            AttenuationArg::Diffdrr,
        ),
        _ => bail!("give exactly one of --pose or --diffdrr-pose"),
    };
    let att = match a.attenuation.unwrap_or(default_att) {
        AttenuationArg::Diffdrr => Attenuation::diffdrr(),
        AttenuationArg::Physical => Attenuation::default(),
        AttenuationArg::Bone => Attenuation::BoneOnly {
            threshold_hu: 200.0,
        },
    };
    let density = DensityVolume::from_volume(&vol, att);
    // DiffDRR poses get DiffDRR's semantics (its Siddon integrates the whole line).
    let renderer = match a.renderer {
        RendererArg::Siddon => cpu::Renderer::Siddon {
            full_line: a.diffdrr_pose.is_some(),
        },
        RendererArg::Trilinear => cpu::Renderer::Trilinear { n_points: 500 },
    };
    let density = std::sync::Arc::new(density);
    let img = if a.cpu {
        cpu::render(&density, &cam, &pose, renderer)
    } else {
        match render_gpu(&density, &cam, &pose, renderer) {
            Ok(img) => img,
            Err(e) => {
                eprintln!(
                    "note: {}; rendering on the CPU reference instead",
                    report(&e)
                );
                cpu::render(&density, &cam, &pose, renderer)
            }
        }
    };
    let (w, h) = (cam.width_px as usize, cam.height_px as usize);
    crate::drr::image_io::write_image(&a.out, &img, w, h)?;
    if let Some(spec) = &a.landmarks {
        let lm = match (spec.as_str(), a.ct.strip_prefix("phantom:")) {
            ("auto", Some(id)) => volume::phantom::phantom_subject(id.parse()?, Some(8.0)).1,
            ("auto", None) => bail!("--landmarks auto needs a phantom:N CT"),
            (path, _) => read_landmarks3d(Path::new(path))?,
        };
        let pts: Vec<_> = lm
            .points
            .iter()
            .zip(crate::landmarks::LANDMARKS)
            .filter_map(|(p, info)| p.map(|p| (cam.project(&pose, &p), info.color)))
            .collect();
        let json: Vec<[f64; 2]> = pts.iter().map(|(p, _)| [p.x, p.y]).collect();
        println!("{}", serde_json::to_string(&json)?);
        let over = crate::drr::image_io::overlay_rgb(&img, w, h, &pts);
        let path = a.out.with_extension("overlay.png");
        crate::io::atomic_write_with(&path, |tmp| {
            over.save_with_format(tmp, image::ImageFormat::Png)
                .map_err(std::io::Error::other)
        })
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Reads 3D landmarks for the CLI with context.
pub fn read_landmarks3d(path: &Path) -> Result<Landmarks3d> {
    Ok(Landmarks3d::read(path)?)
}

fn read_points3d(path: &Path) -> Result<Vec<Point3<f64>>> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".mrk.json") || name.ends_with(".fcsv") || name.ends_with(".csv") {
        let lm = Landmarks3d::read(path)?;
        return lm
            .points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: landmark {} is undefined",
                        path.display(),
                        crate::landmarks::LANDMARKS[i].code
                    )
                })
            })
            .collect();
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    crate::landmarks::parse_points::<3>(&v)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            p.map(Point3::from)
                .ok_or_else(|| anyhow::anyhow!("{}: 3D point {} is absent", path.display(), i + 1))
        })
        .collect()
}

fn read_points2d(path: &Path) -> Result<Vec<Option<nalgebra::Point2<f64>>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(crate::landmarks::parse_points::<2>(&v)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .map(|p| p.map(nalgebra::Point2::from))
        .collect())
}

fn register(a: &RegisterArgs) -> Result<()> {
    use crate::registration::{self as reg, Problem, Status};
    let cam = a.camera.camera()?;
    let p3 = read_points3d(&a.points3d)?;
    let p2 = read_points2d(&a.points2d)?;
    if p3.len() != p2.len() {
        bail!("{} 3D points but {} 2D points", p3.len(), p2.len());
    }
    let weights: Option<Vec<f64>> = a
        .weights
        .as_deref()
        .map(|w| {
            w.split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<Result<_, _>>()
        })
        .transpose()
        .context("--weights must be numbers separated by commas")?;
    let pb = Problem {
        camera: &cam,
        points3d: &p3,
        points2d: &p2,
        weights: weights.as_deref(),
    };
    if let Err(e) = pb.validate() {
        bail!("invalid input: {e}");
    }
    let from = a.from_pose.as_deref().map(parse_pose).transpose()?;
    let out = match a.solver {
        SolverArg::Lm => {
            let o = reg::LmOptions::default();
            let s = match from {
                Some(p) => reg::solve_from(&pb, &p, &o),
                None => reg::solve(&pb, &o),
            };
            let cov: Vec<f64> = s.covariance.iter().copied().collect();
            serde_json::json!({
                "rotation": s.pose.rotation.as_slice(),
                "translation": s.pose.translation_mm.as_slice(),
                "rmse_px": finite_or_null(s.rmse_px),
                "iterations": s.iterations,
                "status": s.status,
                "residual_px": s.residual_px,
                "inliers": s.inliers,
                "covariance": if cov.iter().all(|v| v.is_finite()) { serde_json::json!(cov) } else { serde_json::Value::Null },
            })
        }
        SolverArg::AdamPaper | SolverArg::LbfgsPaper => {
            let init = from.map_or([0.0; 6], |p| p.params());
            let o = reg::paper::PaperOptions::default();
            let r = if a.solver == SolverArg::AdamPaper {
                reg::paper::adam::<f64>(&pb, init, &o)
            } else {
                reg::paper::lbfgs::<f64>(&pb, init, &o)
            };
            let n = pb.active().len().max(1) as f64;
            serde_json::json!({
                "rotation": &r.theta[..3],
                "translation": &r.theta[3..],
                "rmse_px": finite_or_null((r.loss / n).sqrt()),
                "iterations": r.iterations,
                "status": Status::MaxIterations,
            })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn finite_or_null(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// A GPU renderer of its own with `density` uploaded (the CLI's device; the app uses eframe's).
fn gpu_renderer(density: &std::sync::Arc<DensityVolume>) -> Result<crate::drr::gpu::DrrRenderer> {
    let (device, queue, info) = crate::drr::gpu::headless_device(false)?;
    log::info!("rendering on {} ({:?})", info.name, info.backend);
    let mut r = crate::drr::gpu::DrrRenderer::new(&device, &queue);
    r.set_volume(density.clone())?;
    Ok(r)
}

fn render_gpu(
    density: &std::sync::Arc<DensityVolume>,
    cam: &Camera,
    pose: &Pose,
    renderer: cpu::Renderer,
) -> Result<Vec<f32>> {
    let mut images = gpu_renderer(density)?.render(cam, std::slice::from_ref(pose), renderer)?;
    images.pop().context("the GPU returned no image")
}

fn frames(a: &FramesArgs) -> Result<()> {
    use crate::stream::{frame_files, read_image_file};
    let files = frame_files(&a.path)?;
    let mut out = Vec::new();
    for f in &files {
        let x = read_image_file(f)?;
        let g = &x.geometry;
        out.push(serde_json::json!({
            "file": f.display().to_string(),
            "modality": x.modality,
            "frames": x.frames.len(),
            "width": x.width,
            "height": x.height,
            "frame_time_ms": x.frame_time_ms,
            "sdd_mm": g.sdd_mm,
            "sod_mm": g.sod_mm,
            "pixel_spacing_mm": g.pixel_spacing_mm.map(|(r, c)| [r, c]),
            "primary_angle_deg": g.primary_angle_deg,
            "secondary_angle_deg": g.secondary_angle_deg,
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn simulate(a: &SimulateArgs) -> Result<()> {
    use crate::stream::simulated::{CpuDrr, Detector, DrrSource, SimulatedStream, Trajectory};
    if !(a.fps.is_finite() && a.fps > 0.0) || a.size == 0 {
        bail!("--fps must be positive and --size at least 1");
    }
    let vol = load_ct(&a.ct, None)?;
    let density = std::sync::Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let cam = Camera::paper(a.size);
    let traj = Trajectory::around(vol.center_mm());
    let detector = (a.photons > 0.0).then(|| Detector::at_dose(a.photons));
    let cpu_src = || CpuDrr {
        volume: density.clone(),
        renderer: cpu::Renderer::Siddon { full_line: false },
    };
    let renderer: Box<dyn DrrSource> = if a.cpu {
        Box::new(cpu_src())
    } else {
        match gpu_renderer(&density) {
            Ok(r) => Box::new(r),
            Err(e) => {
                eprintln!(
                    "note: {}; rendering on the CPU reference instead",
                    report(&e)
                );
                Box::new(cpu_src())
            }
        }
    };
    let mut stream = SimulatedStream::new(traj, cam, renderer, a.fps, detector, a.seed);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pb = progress(a.frames, "simulate");
    let mut poses = String::new();
    for _ in 0..a.frames {
        let f = stream.next_frame().map_err(anyhow::Error::msg)?;
        let name = format!("frame_{:04}.npy", f.index);
        crate::drr::image_io::write_image(
            &a.out.join(&name),
            &f.pixels,
            cam.width_px as usize,
            cam.height_px as usize,
        )?;
        poses.push_str(&serde_json::to_string(&serde_json::json!({
            "frame": name, "time_s": f.time_s,
            "rotation": f.pose.rotation.as_slice(), "translation": f.pose.translation_mm.as_slice(),
        }))?);
        poses.push('\n');
        pb.inc(1);
    }
    pb.finish_and_clear();
    crate::io::atomic_write(&a.out.join("poses.jsonl"), poses.as_bytes())
        .context("writing poses.jsonl")?;
    crate::io::atomic_write(
        &a.out.join("camera.json"),
        serde_json::to_string_pretty(&cam)?.as_bytes(),
    )
    .context("writing camera.json")?;
    println!(
        "{} frames of {}x{} in {}",
        a.frames,
        cam.width_px,
        cam.height_px,
        a.out.display()
    );
    Ok(())
}
