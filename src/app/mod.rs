//! The desktop app (eframe, wgpu renderer): Live, CT, Annotate and Train tabs over one scene.
//!
//! Threads: the UI thread draws and owns the GPU resources (the verification DRR renders on
//! eframe's own device into a texture egui samples: no CPU round trip); the live pipeline runs
//! on its worker ([`pipeline`]); CT loading and training run on their own threads and report
//! through channels and [`crate::task::Task`]. Errors go to the toast list; the app keeps
//! running.

pub mod pipeline;
mod views;

use crate::drr::gpu::{DrrRenderer, Window};
use crate::drr::{Attenuation, DensityVolume};
use crate::geometry::{Camera, Pose};
use crate::landmarks::{Landmarks2d, Landmarks3d, N_LANDMARKS};
use crate::model::Predictor;
use crate::model::shipped::Shipped;
use crate::task::Task;
use crate::train::Metric;
use crate::volume::Volume;
use eframe::egui;
use eframe::wgpu;
use pipeline::{Command, Pipeline, Processed, Source};
pub use pipeline::{RefinedPose, Refining};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How the app starts.
#[derive(Clone, Debug, Default)]
pub struct AppOptions {
    /// Save a screenshot here after `frames` frames, then quit.
    pub screenshot: Option<PathBuf>,
    /// Frames before the screenshot.
    pub frames: u32,
    /// The tab to open on.
    pub tab: Option<Tab>,
    /// Frames (a file or folder) to play instead of the simulated stream.
    pub open: Option<PathBuf>,
    /// The stream's frame clock, overriding the saved setting.
    pub fps: Option<f64>,
    /// Refinement against the CT: off, paused frames only, or while playing too (overrides
    /// the saved setting).
    pub refine: Option<RefineMode>,
    /// Present without waiting for the display's vertical blank: lower latency, may tear.
    pub no_vsync: bool,
    /// The embedded network to start with, instead of the one the compute runs live
    /// ([`Shipped::for_live`]).
    pub network: Option<Shipped>,
}

/// Where a model in the Live tab's picker comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    /// Embedded in the binary.
    Shipped(Shipped),
    /// A checkpoint (`.safetensors` with its `.json`), e.g. from the Train tab.
    File(PathBuf),
}

/// The picker's (and the status bar's) name for a checkpoint: its file name, which fits beside
/// the shipped networks' names; its whole path where another entry already has that name.
fn checkpoint_label(path: &std::path::Path, models: &[(String, ModelRef)]) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if models.iter().any(|(l, _)| *l == name) {
        path.display().to_string()
    } else {
        name
    }
}

/// When the Live tab refines poses against the CT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefineMode {
    /// Never.
    Off,
    /// Paused and stepped frames, and the playing stream while the C-arm holds still.
    Paused,
    /// While playing too.
    Always,
}

/// The tabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tab {
    /// Live overlay, pose and DRR.
    Live,
    /// CT slices and 3D landmarks.
    Ct,
    /// Landmark correction.
    Annotate,
    /// Fine-tuning.
    Train,
}

impl Tab {
    /// Parses a tab name.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "live" => Some(Self::Live),
            "ct" => Some(Self::Ct),
            "annotate" => Some(Self::Annotate),
            "train" => Some(Self::Train),
            _ => None,
        }
    }
}

/// Settings that persist between runs (eframe storage).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Frame clock, fps.
    pub fps: f64,
    /// Loop finite sources.
    pub looping: bool,
    /// Overlay opacity of the DRR over the frame.
    pub overlay_alpha: f32,
    /// How the DRR is compared with the frame.
    pub compare: Compare,
    /// Which way round bone is drawn.
    pub bone: BoneShown,
    /// Quantum noise of the simulated stream.
    pub photons: f64,
    /// Where annotations are saved.
    pub annotation_dir: PathBuf,
    /// Average the heatmaps of each frame and its mirror image.
    pub mirror: bool,
    /// Average the heatmaps of each frame and of it moved both ways
    /// ([`crate::model::Views::shift_px`]); `None` leaves it to the model's device
    /// ([`Settings::shift_views`]).
    pub shift: Option<bool>,
    /// Smooth frames noisier than the network's training data before reading them
    /// ([`crate::model::Views::denoise`]).
    pub denoise: bool,
    /// Take the heatmap peaks that agree with one pose of the CT's landmarks.
    pub consistent: bool,
    /// With `consistent`: draw every landmark where the CT's projects at that pose.
    pub registered: bool,
    /// Which way round frames are read (bone bright as DRRs, or dark as many fluoroscopes
    /// show it).
    pub polarity: crate::detect::Polarity,
    /// Filter the pose over frames (Kalman, constant velocity).
    pub track: bool,
    /// Refine solved poses against the frames with DRRs of the CT (intensity-based): paused
    /// (and stepped) frames, and with `refine_while_playing` every frame it has time for.
    pub refine: bool,
    /// Refine while the stream plays too; `None` leaves it to the DRR's device
    /// ([`Settings::refine_while_playing`]). A new key, so that the `false` every earlier run
    /// saved (it was the one default) does not hold on a GPU.
    pub refine_playing: Option<bool>,
}

impl Settings {
    /// Whether poses are refined while the stream plays: the user's choice, else on where the
    /// DRRs run on a GPU of their own (`gpu`, [`crate::drr::gpu::refines_while_playing`]). On a
    /// CPU's software renderer a refinement takes seconds and shares the 2 cores with the live
    /// pipeline, which then loses about a frame per second: there only paused frames, and the
    /// playing stream while the C-arm holds still (when its correction carries over).
    pub fn refine_while_playing(&self, gpu: bool) -> bool {
        self.refine_playing.unwrap_or(gpu)
    }

    /// Whether frames are read moved as well: the user's choice, else where the network has
    /// the time for it (`fits`, [`crate::model::Views::shifts_fit_live`]).
    pub fn shift_views(&self, fits: bool) -> bool {
        self.shift.unwrap_or(fits)
    }

    /// The landmark decoding these settings ask for, with the moved views by default where
    /// they fit (`shifts_fit`).
    pub fn decode(&self, shifts_fit: bool) -> crate::detect::Decode {
        crate::detect::Decode {
            views: crate::model::Views {
                mirror: self.mirror,
                shift_px: if self.shift_views(shifts_fit) {
                    crate::model::Views::SHIFT_PX
                } else {
                    0
                },
                zoom_pct: 0,
                denoise: self.denoise,
            },
            consensus: self
                .consistent
                .then(|| crate::registration::consensus::ConsensusOptions {
                    snap: self.registered,
                    ..Default::default()
                }),
            polarity: self.polarity,
            inverted_first: false,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            fps: 10.0,
            looping: true,
            overlay_alpha: 0.4,
            compare: Compare::Blend,
            bone: BoneShown::AsSource,
            photons: 100000.0,
            annotation_dir: PathBuf::from("annotations"),
            mirror: true,
            shift: None,
            denoise: true,
            consistent: true,
            // The network's own peaks by default: they show where it disagrees with the CT.
            registered: false,
            polarity: crate::detect::Polarity::Auto,
            track: true,
            refine: true,
            refine_playing: None,
        }
    }
}

/// Which way round frames and DRRs are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BoneShown {
    /// Frames as their source stores them; the DRR to match (inverted beside a frame the
    /// network read inverted).
    #[default]
    AsSource,
    /// Bone bright, as radiographs and DRRs.
    Bright,
    /// Bone dark, as many fluoroscopes show it.
    Dark,
}

impl BoneShown {
    /// Whether a frame the network read `inverted` (bone dark) is drawn inverted.
    pub fn invert_frame(self, inverted: bool) -> bool {
        match self {
            Self::AsSource => false,
            Self::Bright => inverted,
            Self::Dark => !inverted,
        }
    }

    /// Whether the DRR (bone bright) is drawn inverted beside such a frame.
    pub fn invert_drr(self, inverted: bool) -> bool {
        match self {
            Self::AsSource => inverted,
            Self::Bright => false,
            Self::Dark => true,
        }
    }

    /// For menus.
    pub fn label(self) -> &'static str {
        match self {
            Self::AsSource => "as the source",
            Self::Bright => "bright",
            Self::Dark => "dark",
        }
    }
}

/// DRR-versus-frame display.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compare {
    /// Side by side only.
    SideBySide,
    /// DRR alpha-blended over the frame.
    Blend,
    /// Checkerboard of frame and DRR tiles.
    Checkerboard,
}

/// The loaded CT and what is derived from it.
pub struct Scene {
    /// Where it came from.
    pub name: String,
    /// The volume.
    pub volume: Arc<Volume>,
    /// Its attenuation for the DRR.
    pub density: Arc<DensityVolume>,
    /// Its 3D landmarks.
    pub landmarks: Landmarks3d,
}

impl Scene {
    /// A scene from a volume and its landmarks.
    pub fn new(name: String, volume: Volume, landmarks: Landmarks3d) -> Self {
        let density = Arc::new(DensityVolume::from_volume(&volume, Attenuation::default()));
        Self {
            name,
            volume: Arc::new(volume),
            density,
            landmarks,
        }
    }

    /// Whether the CT is one of the project's phantoms (named `phantom:N`), not a file.
    pub fn is_phantom(&self) -> bool {
        self.name.starts_with("phantom:")
    }

    /// The embedded default: phantom subject 62, held out from the shipped model's training
    /// (phantoms 61-64 are; see models/README.md).
    pub fn default_phantom() -> Self {
        let (v, l) = crate::volume::phantom::phantom_subject(DEFAULT_PHANTOM, None);
        Self::new(format!("phantom:{DEFAULT_PHANTOM}"), v, l)
    }
}

/// Frames whose latency the 95th percentile of [`FluoroApp::measurements`] is taken over.
pub const RECENT_FRAMES: usize = 4096;

/// The phantom subject the app opens on (held out from the shipped model's training).
pub const DEFAULT_PHANTOM: u64 = 62;

/// A message for the user.
pub struct Toast {
    /// Text.
    pub text: String,
    /// An error (red) or information.
    pub error: bool,
    /// When it appeared.
    pub at: Instant,
}

/// The verification DRR on eframe's device.
struct GpuDrr {
    renderer: DrrRenderer,
    device: wgpu::Device,
    queue: wgpu::Queue,
    egui_renderer: Arc<egui::mutex::RwLock<eframe::egui_wgpu::Renderer>>,
    texture: Option<(
        wgpu::Texture,
        wgpu::TextureView,
        egui::TextureId,
        (u32, u32),
    )>,
    window: Option<Window>,
    /// Longest side of the verification DRR ([`crate::drr::gpu::verification_max_px`]).
    max_px: u32,
}

/// Annotation state of the current image.
#[derive(Default)]
pub struct Annotation {
    /// The image being corrected.
    pub current: Option<Landmarks2d>,
    /// Undo stack.
    pub undo: Vec<Landmarks2d>,
    /// Redo stack.
    pub redo: Vec<Landmarks2d>,
    /// Landmark being dragged.
    pub dragging: Option<usize>,
    /// Pixels of the image being annotated.
    pub frame: Option<Processed>,
    /// Where it was last saved.
    pub saved: Option<PathBuf>,
    /// Where the image was drawn last (screen points), for pointer mapping.
    pub rect: Option<egui::Rect>,
}

/// Training started from the Train tab.
pub struct TrainingRun {
    /// Progress and cancellation.
    pub task: Task,
    /// Metrics so far.
    pub metrics: Arc<Mutex<Vec<Metric>>>,
    /// Result when finished: the weights written (and their moving average, when kept).
    pub done: Receiver<Result<Vec<PathBuf>, String>>,
    /// Output weights.
    pub out: PathBuf,
}

/// Train tab settings.
pub struct TrainForm {
    /// Dataset folder.
    pub data: String,
    /// More dataset folders trained on together with `data` (other DRR draws, annotated frames).
    pub also: Vec<String>,
    /// Mode.
    pub mode: crate::train::Mode,
    /// Epochs.
    pub epochs: usize,
    /// Batch.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Max steps (0: no limit).
    pub max_steps: usize,
    /// Decay the learning rate along a half cosine to a hundredth.
    pub cosine: bool,
    /// Also keep a moving average of the weights ([`crate::train::Ema`]), listed beside them
    /// when the run ends.
    pub ema: bool,
    /// Its decay per step.
    pub ema_decay: f64,
    /// Start from the network the Live tab runs (always, for finetune); a fresh network when
    /// false.
    pub from_live: bool,
    /// λ of eq. 9 (composite mode).
    pub lambda: f64,
    /// Probability of mirroring each training image (baseline mode; `train --mirror`).
    pub mirror: f64,
    /// Prepare each image as the Live tab reads a frame, noisy ones smoothed
    /// (`train --denoise`); starts as the Live tab's "smooth noisy frames".
    pub denoise: bool,
    /// Output weights.
    pub out: String,
}

impl Default for TrainForm {
    fn default() -> Self {
        Self {
            data: "experiment/data".into(),
            also: Vec::new(),
            mode: crate::train::Mode::Finetune,
            epochs: 1,
            batch: 4,
            lr: 1e-4,
            max_steps: 0,
            cosine: false,
            ema: false,
            ema_decay: 0.99,
            from_live: true,
            lambda: crate::train::TrainOptions::default().lambda,
            mirror: 0.0,
            denoise: Settings::default().denoise,
            out: "models/finetuned.safetensors".into(),
        }
    }
}

/// The app.
pub struct FluoroApp {
    /// Persisted settings.
    pub settings: Settings,
    /// Current tab.
    pub tab: Tab,
    /// The CT.
    pub scene: Scene,
    /// The live pipeline.
    pipeline: Pipeline,
    /// Newest processed frame.
    pub latest: Option<Processed>,
    /// When it was shown (frame-to-overlay latency).
    shown_latency_ms: f64,
    fps_meter: Vec<Instant>,
    /// When the first and the latest frame of this run were shown (the run's mean rate).
    shown_span: Option<(Instant, Instant)>,
    /// Playing.
    pub playing: bool,
    /// Manual pose mode.
    pub manual: bool,
    /// The manual pose (rx, ry, rz in degrees; tx, ty, tz mm).
    pub manual_pose: [f64; 6],
    gpu: Option<GpuDrr>,
    drr_pose: Option<(Pose, Camera, bool)>,
    drr_ms: f64,
    frame_tex: Option<egui::TextureHandle>,
    frame_tex_index: Option<(u64, bool)>,
    /// Messages.
    pub toasts: Vec<Toast>,
    /// Models the Live tab can switch between: (name, where its weights are).
    pub models: Vec<(String, ModelRef)>,
    /// Selected model.
    pub model_index: usize,
    /// CT being loaded.
    ct_loading: Option<(String, Receiver<Result<Scene, String>>)>,
    /// Slice positions (i, j, k) and window preset.
    pub slices: [usize; 3],
    /// HU window (low, high).
    pub hu_window: (f32, f32),
    /// Selected 3D landmark in the CT tab.
    pub selected_landmark: usize,
    slice_tex: [Option<egui::TextureHandle>; 3],
    slice_key: [Option<(usize, (i32, i32))>; 3],
    /// Annotation.
    pub annotation: Annotation,
    /// Training form and run.
    pub train_form: TrainForm,
    /// The current training run.
    pub training: Option<TrainingRun>,
    options: AppOptions,
    /// Frames shown: their count, summed (frame-to-overlay, source, inference, pose) ms, and
    /// the latencies of the most recent [`RECENT_FRAMES`] (for the 95th percentile), so that
    /// a session that streams for hours keeps a fixed size.
    shown: (usize, [f64; 4], std::collections::VecDeque<f64>),
    /// UI frames drawn and their summed CPU seconds (update, tessellation and painting, as
    /// eframe reports them): a running sum, so that a long session does not grow a list.
    ui_cpu: (usize, f64),
    frames_drawn: u32,
    screenshot_requested: bool,
    gpu_status: String,
    /// The DRR's device is a GPU that refines while the stream plays by default.
    pub gpu_refines: bool,
    /// The network has the time to read each frame moved too, by default
    /// ([`crate::model::Views::shifts_fit_live`]).
    pub shifts_fit: bool,
}

impl FluoroApp {
    /// Builds the app on eframe's creation context (its wgpu device, its storage).
    pub fn new(cc: &eframe::CreationContext<'_>, options: AppOptions) -> Self {
        let mut settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        let mut toasts = Vec::new();
        // Panels are left unfilled and the clear colour is theirs: the same picture, but a
        // software rasteriser (lavapipe) no longer shades every pixel of the window twice, and
        // on 2 cores that was most of a UI frame's cost.
        cc.egui_ctx
            .all_styles_mut(|s| s.visuals.panel_fill = egui::Color32::TRANSPARENT);
        let scene = Scene::default_phantom();
        // The network the compute can run live: the compact one on a CPU with few threads.
        let device = crate::model::default_device();
        let shipped = options
            .network
            .unwrap_or_else(|| Shipped::for_live(&device));
        let model = match shipped.predictor(&device) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                toasts.push(Toast {
                    text: format!("no model: {e}"),
                    error: true,
                    at: Instant::now(),
                });
                None
            }
        };
        let source = Source::Simulated {
            density: scene.density.clone(),
            isocenter: scene.volume.center_mm(),
            size: 256,
            photons: settings.photons,
            motion: 1.0,
        };
        let repaint = cc.egui_ctx.clone();
        let shifts_fit = crate::model::Views::shifts_fit_live(&crate::model::default_device());
        let pipeline = Pipeline::start(
            source,
            model,
            scene.landmarks.clone(),
            settings.decode(shifts_fit),
            // A zero-delay request makes egui draw twice ("to let things settle"); any delay
            // draws once. One UI frame per video frame halves what a software rasteriser
            // spends on the window.
            Box::new(move || repaint.request_repaint_after(std::time::Duration::from_micros(1))),
        );
        if let Some(r) = options.refine {
            settings.refine = r != RefineMode::Off;
            settings.refine_playing = Some(r == RefineMode::Always);
        }
        if let Some(f) = options.fps.filter(|f| f.is_finite() && *f > 0.0) {
            settings.fps = f.clamp(0.1, 120.0);
        }
        pipeline.send(Command::Fps(settings.fps));
        pipeline.send(Command::Loop(settings.looping));
        pipeline.send(Command::Track(settings.track));
        pipeline.send(Command::Refine(
            settings.refine.then(|| scene.density.clone()),
        ));
        let (gpu, gpu_status) = match cc.wgpu_render_state.as_ref() {
            Some(rs) => {
                let mut renderer = DrrRenderer::new(&rs.device, &rs.queue);
                let status = match renderer.set_volume(scene.density.clone()) {
                    Ok(()) => format!(
                        "DRR on {} ({:?})",
                        rs.adapter.get_info().name,
                        rs.adapter.get_info().backend
                    ),
                    Err(e) => format!("DRR unavailable: {e}"),
                };
                (
                    Some(GpuDrr {
                        renderer,
                        device: rs.device.clone(),
                        queue: rs.queue.clone(),
                        egui_renderer: rs.renderer.clone(),
                        texture: None,
                        window: None,
                        max_px: crate::drr::gpu::verification_max_px(&rs.adapter.get_info()),
                    }),
                    status,
                )
            }
            None => (
                None,
                "no GPU adapter: DRR verification off, CPU paths only".into(),
            ),
        };
        let gpu_refines = cc
            .wgpu_render_state
            .as_ref()
            .is_some_and(|rs| crate::drr::gpu::refines_while_playing(&rs.adapter.get_info()));
        pipeline.send(Command::RefineWhilePlaying(
            settings.refine_while_playing(gpu_refines),
        ));
        // Which device the U-Net runs on belongs beside the DRR's (a CUDA build on a machine
        // without a GPU falls back to the CPU, and the user should see that).
        let gpu_status = format!(
            "{gpu_status} · model on {}",
            crate::model::device_name(&crate::model::default_device())
        );
        let playing = options.screenshot.is_some();
        if playing {
            pipeline.send(Command::Play(true));
        }
        let open = options.open.clone();
        let c = scene.volume.dims();
        let models: Vec<(String, ModelRef)> = Shipped::ALL
            .into_iter()
            .filter(|w| w.available())
            .map(|w| (w.label().to_string(), ModelRef::Shipped(w)))
            .collect();
        let train_form = TrainForm {
            denoise: settings.denoise,
            ..TrainForm::default()
        };
        let mut app = Self {
            settings,
            tab: options.tab.unwrap_or(Tab::Live),
            pipeline,
            latest: None,
            shown_latency_ms: 0.0,
            fps_meter: Vec::new(),
            shown_span: None,
            playing,
            manual: false,
            manual_pose: [0.0, 0.0, 0.0, 0.0, 0.0, 800.0],
            gpu,
            drr_pose: None,
            drr_ms: 0.0,
            frame_tex: None,
            frame_tex_index: None,
            toasts,
            model_index: models
                .iter()
                .position(|m| m.1 == ModelRef::Shipped(shipped))
                .unwrap_or(0),
            models,
            ct_loading: None,
            slices: [c[0] / 2, c[1] / 2, c[2] / 2],
            hu_window: (-400.0, 1200.0),
            selected_landmark: 0,
            slice_tex: [None, None, None],
            slice_key: [None, None, None],
            annotation: Annotation::default(),
            train_form,
            training: None,
            scene,
            options,
            shown: (0, [0.0; 4], std::collections::VecDeque::new()),
            ui_cpu: (0, 0.0),
            frames_drawn: 0,
            screenshot_requested: false,
            gpu_status,
            gpu_refines,
            shifts_fit,
        };
        if let Some(path) = open {
            app.open_frames(path);
        }
        app
    }

    /// Shows a message.
    pub fn toast(&mut self, text: impl Into<String>, error: bool) {
        let text = text.into();
        if error {
            log::error!("{text}");
        }
        self.toasts.push(Toast {
            text,
            error,
            at: Instant::now(),
        });
    }

    /// Starts or stops the stream.
    pub fn set_playing(&mut self, p: bool) {
        self.playing = p;
        self.pipeline.send(Command::Play(p));
    }

    /// Sends a command to the pipeline.
    pub fn send(&self, c: Command) {
        self.pipeline.send(c);
    }

    /// Replaces the scene (after a CT load) and tells the pipeline and the DRR.
    pub fn set_scene(&mut self, scene: Scene) {
        if let Some(g) = &mut self.gpu
            && let Err(e) = g.renderer.set_volume(scene.density.clone())
        {
            self.toasts.push(Toast {
                text: format!("DRR: {e}"),
                error: true,
                at: Instant::now(),
            });
        }
        if let Some(g) = &mut self.gpu {
            g.window = None;
        }
        self.pipeline
            .send(Command::Landmarks(scene.landmarks.clone()));
        if self.settings.refine {
            self.pipeline
                .send(Command::Refine(Some(scene.density.clone())));
        }
        if matches!(self.source_kind(), SourceKind::Simulated) {
            self.pipeline.send(Command::Source(Source::Simulated {
                density: scene.density.clone(),
                isocenter: scene.volume.center_mm(),
                size: 256,
                photons: self.settings.photons,
                motion: 1.0,
            }));
        }
        let d = scene.volume.dims();
        self.slices = [d[0] / 2, d[1] / 2, d[2] / 2];
        self.slice_key = [None, None, None];
        self.drr_pose = None;
        self.scene = scene;
    }

    fn source_kind(&self) -> SourceKind {
        match self.latest.as_ref().map(|p| p.truth.is_some()) {
            Some(false) => SourceKind::Frames,
            _ => SourceKind::Simulated,
        }
    }

    /// Loads a CT (and landmarks beside it, if any) in the background.
    pub fn load_ct(&mut self, path: PathBuf) {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = path.display().to_string();
        std::thread::spawn(move || {
            let r = crate::io::catch_panic(|| {
                let v = crate::volume::read_volume(&path, None).map_err(|e| format!("{e}"))?;
                let lm = landmarks_beside(&path).unwrap_or_default();
                Ok(Scene::new(path.display().to_string(), v, lm))
            })
            .unwrap_or_else(|e| Err(format!("loading crashed: {e}")));
            let _ = tx.send(r);
        });
        self.ct_loading = Some((name, rx));
    }

    /// Whether a CT is loading.
    pub fn ct_loading(&self) -> Option<&str> {
        self.ct_loading.as_ref().map(|(n, _)| n.as_str())
    }

    fn poll_background(&mut self) {
        if let Some((name, rx)) = &self.ct_loading {
            match rx.try_recv() {
                Ok(Ok(scene)) => {
                    let n = name.clone();
                    self.ct_loading = None;
                    self.set_scene(scene);
                    self.toast(format!("loaded {n}"), false);
                }
                Ok(Err(e)) => {
                    let n = name.clone();
                    self.ct_loading = None;
                    self.toast(format!("{n}: {e} (the previous CT stays loaded)"), true);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => self.ct_loading = None,
            }
        }
        let finished = self.training.as_ref().and_then(|t| t.done.try_recv().ok());
        if let Some(r) = finished {
            match r {
                Ok(paths) => {
                    let full = paths
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ");
                    for path in paths {
                        let label = checkpoint_label(&path, &self.models);
                        let entry = ModelRef::File(path);
                        if !self.models.iter().any(|(_, m)| *m == entry) {
                            self.models.push((label, entry));
                        }
                    }
                    self.toast(
                        format!("training finished: {full} (pick it in Live)"),
                        false,
                    );
                }
                Err(e) => self.toast(format!("training: {e}"), true),
            }
            if let Some(t) = &mut self.training {
                // Keep the curves; the receiver is spent.
                let (_tx, rx) = std::sync::mpsc::channel();
                t.done = rx;
            }
        }
        match self.pipeline.latest() {
            Some(Ok(p)) => {
                self.shown_latency_ms = p.produced.elapsed().as_secs_f64() * 1e3;
                let t = [
                    self.shown_latency_ms,
                    p.timings.source_ms,
                    p.timings.inference_ms,
                    p.timings.pose_ms,
                ];
                let (count, sums, recent) = &mut self.shown;
                *count += 1;
                for (s, v) in sums.iter_mut().zip(t) {
                    *s += v;
                }
                if recent.len() == RECENT_FRAMES {
                    recent.pop_front();
                }
                recent.push_back(t[0]);
                let now = Instant::now();
                self.fps_meter.push(now);
                self.shown_span = Some((self.shown_span.map_or(now, |s| s.0), now));
                self.fps_meter
                    .retain(|t| now.duration_since(*t).as_secs_f64() < 2.0);
                self.latest = Some(p);
            }
            Some(Err(e)) => self.toast(e, true),
            None => {}
        }
    }

    /// Frames per second shown over the last two seconds.
    pub fn fps(&self) -> f64 {
        if self.fps_meter.len() < 2 {
            return 0.0;
        }
        let span = self.fps_meter[self.fps_meter.len() - 1]
            .duration_since(self.fps_meter[0])
            .as_secs_f64();
        (self.fps_meter.len() - 1) as f64 / span.max(1e-9)
    }

    /// What the run measured, as JSON: frames shown, fps, mean and 95th-percentile (over the
    /// last [`RECENT_FRAMES`]) frame-to-overlay latency, mean stage times.
    pub fn measurements(&self) -> serde_json::Value {
        let (count, sums, recent) = &self.shown;
        let mean = |k: usize| sums[k] / (*count).max(1) as f64;
        let mut lat: Vec<f64> = recent.iter().copied().collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let p95 = lat
            .get(((lat.len() as f64 * 0.95) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN);
        serde_json::json!({
            "frames_shown": count, "fps": self.fps(),
            "mean_fps": self.shown_span.map_or(0.0, |(a, b)| {
                count.saturating_sub(1) as f64 / b.duration_since(a).as_secs_f64().max(1e-9)
            }),
            "frame_to_overlay_ms": {"mean": mean(0), "p95": p95},
            "source_ms": mean(1), "inference_ms": mean(2), "pose_ms": mean(3),
            "drr_ms": self.drr_ms,
            "ui_frames": self.ui_cpu.0,
            "ui_ms": self.ui_cpu.1 * 1e3 / self.ui_cpu.0.max(1) as f64,
            "devices": self.gpu_status,
            "network": self.network_name(),
        })
    }

    /// Frame-to-overlay latency of the newest frame, ms.
    pub fn latency_ms(&self) -> f64 {
        self.shown_latency_ms
    }

    /// DRR time of the last update, ms.
    pub fn drr_ms(&self) -> f64 {
        self.drr_ms
    }

    /// The name of the network the Live tab runs, as its picker lists it.
    pub fn network_name(&self) -> Option<&str> {
        self.models.get(self.model_index).map(|m| m.0.as_str())
    }

    /// Status of the GPU.
    pub fn gpu_status(&self) -> &str {
        &self.gpu_status
    }

    /// The refinement against the CT under way, if any ([`Pipeline::refining`]).
    pub fn refining(&self) -> Option<Refining> {
        self.pipeline.refining()
    }

    /// The pose the DRR shows: manual sliders, or the frame's best pose ([`Processed::shown_pose`]).
    pub fn display_pose(&self) -> Option<Pose> {
        if self.manual {
            let m = self.manual_pose;
            return Some(Pose::from_params(&[
                m[0].to_radians(),
                m[1].to_radians(),
                m[2].to_radians(),
                m[3],
                m[4],
                m[5],
            ]));
        }
        self.latest.as_ref()?.shown_pose()
    }

    /// Renders the DRR at `pose` into the GPU texture if it changed; returns its texture.
    pub fn drr_texture(&mut self, camera: &Camera) -> Option<(egui::TextureId, (u32, u32))> {
        let pose = self.display_pose()?;
        let g = self.gpu.as_mut()?;
        let g_renderer_ready = g.renderer.volume().is_some();
        if !g_renderer_ready {
            return None;
        }
        // The verification DRR at up to `max_px`: enough to compare, cheap.
        let scale = (g.max_px as f64 / camera.width_px.max(camera.height_px) as f64).min(1.0);
        let cam = camera.rescaled(scale);
        let size = (cam.width_px, cam.height_px);
        // The DRR takes the frame's polarity, so that blend and difference compare like with
        // like.
        let inverted = self
            .settings
            .bone
            .invert_drr(self.latest.as_ref().is_some_and(|p| p.inverted));
        let changed = self.drr_pose.as_ref() != Some(&(pose, cam, inverted));
        if changed {
            let t0 = Instant::now();
            if g.window.is_none() {
                // Window from one read-back render of this CT; then it stays on the GPU.
                match g.renderer.render(
                    &cam,
                    std::slice::from_ref(&pose),
                    crate::drr::cpu::Renderer::Siddon { full_line: false },
                ) {
                    Ok(imgs) => {
                        g.window = imgs.first().map(|i| Window::verification(i));
                    }
                    Err(e) => {
                        self.toasts.push(Toast {
                            text: format!("DRR: {e}"),
                            error: true,
                            at: Instant::now(),
                        });
                        self.gpu = None;
                        return None;
                    }
                }
            }
            let need_new = g.texture.as_ref().is_none_or(|t| t.3 != size);
            if need_new {
                let tex = crate::drr::gpu::display_texture(&g.device, size);
                let view = tex.create_view(&wgpu::TextureViewDescriptor::default());
                let mut er = g.egui_renderer.write();
                let id = match g.texture.take() {
                    Some((_, _, id, _)) => {
                        er.update_egui_texture_from_wgpu_texture(
                            &g.device,
                            &view,
                            wgpu::FilterMode::Linear,
                            id,
                        );
                        id
                    }
                    None => er.register_native_texture(&g.device, &view, wgpu::FilterMode::Linear),
                };
                drop(er);
                g.texture = Some((tex, view, id, size));
            }
            let (Some((_, view, _, _)), Some(mut window)) = (g.texture.as_ref(), g.window) else {
                return None;
            };
            window.invert = inverted;
            let mut enc = g
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("verification drr"),
                });
            match g.renderer.encode(
                &mut enc,
                &cam,
                std::slice::from_ref(&pose),
                crate::drr::cpu::Renderer::Siddon { full_line: false },
            ) {
                Ok(images) => {
                    g.renderer
                        .encode_window(&mut enc, &images, 0, &window, view);
                    g.queue.submit([enc.finish()]);
                }
                Err(e) => {
                    self.toasts.push(Toast {
                        text: format!("DRR: {e}"),
                        error: true,
                        at: Instant::now(),
                    });
                    return None;
                }
            }
            self.drr_pose = Some((pose, cam, inverted));
            self.drr_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        g.texture.as_ref().map(|t| (t.2, t.3))
    }

    /// The frame as an egui texture (uploaded when the frame changes).
    pub fn frame_texture(&mut self, ctx: &egui::Context) -> Option<egui::TextureId> {
        let p = self.latest.as_ref()?;
        let invert = self.settings.bone.invert_frame(p.inverted);
        if self.frame_tex_index != Some((p.index, invert)) || self.frame_tex.is_none() {
            let img = gray_image(
                &crate::detect::as_read(&p.pixels, invert),
                p.size.0,
                p.size.1,
            );
            match &mut self.frame_tex {
                Some(t) => t.set(img, egui::TextureOptions::LINEAR),
                None => {
                    self.frame_tex =
                        Some(ctx.load_texture("frame", img, egui::TextureOptions::LINEAR))
                }
            }
            self.frame_tex_index = Some((p.index, invert));
        }
        self.frame_tex.as_ref().map(|t| t.id())
    }

    /// Switches the live model to entry `i` of [`FluoroApp::models`].
    pub fn select_model(&mut self, i: usize) {
        let Some((name, source)) = self.models.get(i).cloned() else {
            return;
        };
        let r = match &source {
            ModelRef::Shipped(w) => w.predictor(&crate::model::default_device()),
            ModelRef::File(p) => Predictor::load(p, &crate::model::default_device()),
        };
        match r {
            Ok(p) => {
                self.model_index = i;
                self.pipeline.send(Command::Model(Arc::new(p)));
                self.toast(format!("model: {name}"), false);
            }
            Err(e) => self.toast(format!("{name}: {e}"), true),
        }
    }

    /// Opens frames (a DICOM file or cine, an image, or a folder of images) as the source.
    pub fn open_frames(&mut self, path: PathBuf) {
        let r = (|| -> Result<(Source, Option<f64>), String> {
            let files = crate::stream::frame_files(&path).map_err(|e| e.to_string())?;
            let mut frames = Vec::new();
            let mut size = None;
            let mut header = None;
            let mut frame_time_ms = None;
            for f in &files {
                let x = crate::stream::read_image_file(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
                if *size.get_or_insert((x.width, x.height)) != (x.width, x.height) {
                    return Err(format!("{}: frames of different sizes", f.display()));
                }
                header.get_or_insert(x.geometry.clone());
                frame_time_ms = frame_time_ms.or(x.frame_time_ms);
                frames.extend(x.frames);
            }
            let (w, h) = size.ok_or("no frames found")?;
            let header = header.unwrap_or_default();
            log::info!("C-arm header of {}: {header:?}", path.display());
            // A stream recorded by `fluoropose simulate` says its geometry in camera.json.
            let recorded = path
                .is_dir()
                .then(|| std::fs::read_to_string(path.join("camera.json")).ok())
                .flatten()
                .and_then(|t| serde_json::from_str::<crate::geometry::Camera>(&t).ok())
                .filter(|c| (c.width_px as usize, c.height_px as usize) == (w, h));
            let camera = recorded.unwrap_or_else(|| header.camera(w as u32, h as u32));
            Ok((
                Source::Frames {
                    origin: path.clone(),
                    size: (w, h),
                    frames: Arc::new(frames),
                    camera,
                },
                frame_time_ms.filter(|t| t.is_finite() && *t > 0.0),
            ))
        })();
        match r {
            Ok((s, frame_time_ms)) => {
                let what = match &s {
                    Source::Frames { frames, camera, .. } => format!(
                        "{} frames from {} (SDD {:.0} mm, pixel {:.3} mm)",
                        frames.len(),
                        path.display(),
                        camera.sdd_mm,
                        camera.delx_mm
                    ),
                    Source::Simulated { .. } => String::new(),
                };
                self.pipeline.send(Command::Source(s));
                // A cine plays at its recorded rate (FrameTime), which also makes the pose
                // tracker's clock real time; frames the pipeline cannot keep up with are dropped.
                let what = match frame_time_ms {
                    Some(ms) => {
                        self.settings.fps = (1000.0 / ms).clamp(0.1, 120.0);
                        self.pipeline.send(Command::Fps(self.settings.fps));
                        format!("{what} at {:.1} fps (its FrameTime)", self.settings.fps)
                    }
                    None => what,
                };
                self.toast(what, false);
            }
            Err(e) => self.toast(e, true),
        }
    }

    /// Back to the simulated stream of the current CT.
    pub fn open_simulated(&mut self) {
        self.pipeline.send(Command::Source(Source::Simulated {
            density: self.scene.density.clone(),
            isocenter: self.scene.volume.center_mm(),
            size: 256,
            photons: self.settings.photons,
            motion: 1.0,
        }));
    }
}

enum SourceKind {
    Simulated,
    Frames,
}

/// Finds `NAME.mrk.json`, `NAME.fcsv` or `NAME.csv` beside a CT (file or folder).
pub fn landmarks_beside(ct: &std::path::Path) -> Option<Landmarks3d> {
    let s = ct.to_string_lossy();
    let base = s
        .trim_end_matches('/')
        .trim_end_matches(".gz")
        .trim_end_matches(".nii");
    [".mrk.json", ".fcsv", ".csv"]
        .iter()
        .map(|e| PathBuf::from(format!("{base}{e}")))
        .find(|p| p.exists())
        .and_then(|p| Landmarks3d::read(&p).ok())
}

/// Grey image windowed from the 20th to the 99.8th percentile: the air around the patient
/// (the darkest fifth of a C-arm frame) is let go black so that the bone inside the body gets
/// the grey levels.
/// Quantum noise is smoothed for display only (a 1-pixel Gaussian): the model sees the raw frame.
pub fn gray_image(pixels: &[f32], w: usize, h: usize) -> egui::ColorImage {
    let mut smooth: Vec<f32> = pixels
        .iter()
        .map(|x| if x.is_finite() { *x } else { 0.0 })
        .collect();
    crate::model::noise::gaussian_blur(&mut smooth, w, h, 1.0);
    let pixels = &smooth;
    let mut v: Vec<f32> = pixels.clone();
    let mut q = |f: f64| -> f32 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() - 1) as f64 * f) as usize;
        *v.select_nth_unstable_by(i, |a, b| a.total_cmp(b)).1
    };
    let (lo, hi) = (q(0.2), q(0.998));
    let span = (hi - lo).max(1e-12);
    let bytes: Vec<u8> = pixels
        .iter()
        .map(|v| {
            if v.is_finite() {
                (((v - lo) / span).clamp(0.0, 1.0) * 255.0) as u8
            } else {
                0
            }
        })
        .collect();
    egui::ColorImage::from_gray([w, h], &bytes)
}

impl eframe::App for FluoroApp {
    /// The panels' colour, painted by the render pass's clear instead of by the panels: see
    /// [`FluoroApp::new`].
    fn clear_color(&self, visuals: &egui::Visuals) -> [f32; 4] {
        let v = if visuals.dark_mode {
            egui::Visuals::dark()
        } else {
            egui::Visuals::light()
        };
        v.panel_fill.to_normalized_gamma_f32()
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        if let Some(s) = frame.info().cpu_usage {
            self.ui_cpu = (self.ui_cpu.0 + 1, self.ui_cpu.1 + f64::from(s));
        }
        self.poll_background();
        let ctx = ui.ctx().clone();
        // Dropped files: CTs go to the CT tab, images and DICOM frames to the live source.
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        for p in dropped {
            let n = p.to_string_lossy().to_ascii_lowercase();
            if n.ends_with(".nii") || n.ends_with(".nii.gz") || p.is_dir() && self.tab == Tab::Ct {
                self.load_ct(p);
            } else {
                self.open_frames(p);
            }
        }
        views::top_bar(self, ui);
        views::status_bar(self, ui);
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Live => views::live(self, ui),
            Tab::Ct => views::ct(self, ui),
            Tab::Annotate => views::annotate(self, ui),
            Tab::Train => views::train(self, ui),
        });
        views::toasts(self, &ctx);
        self.frames_drawn += 1;
        if let Some(path) = self.options.screenshot.clone()
            && self.frames_drawn >= self.options.frames.max(1)
            && self.latest.is_some()
            && !self.screenshot_requested
        {
            self.screenshot_requested = true;
            println!("{}", self.measurements());
            let c2 = ctx.clone();
            ctx.request_screenshot(move |img| {
                let [w, h] = img.size;
                let bytes: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
                match image::RgbaImage::from_raw(w as u32, h as u32, bytes) {
                    Some(buf) => {
                        let r = crate::io::atomic_write_with(&path, |tmp| {
                            buf.save_with_format(tmp, image::ImageFormat::Png)
                                .map_err(std::io::Error::other)
                        });
                        match r {
                            Ok(()) => println!("screenshot: {}", path.display()),
                            Err(e) => eprintln!("screenshot {}: {e}", path.display()),
                        }
                    }
                    None => eprintln!("screenshot: bad image size"),
                }
                c2.send_viewport_cmd(egui::ViewportCommand::Close);
            });
        }
        // New frames ask for a repaint themselves (the pipeline's callback), so a playing
        // stream costs one UI frame per video frame; progress of training or a CT load is
        // polled at 10 Hz.
        if self.training.is_some() || self.ct_loading.is_some() {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }
}

/// Opens the window.
pub fn run(options: AppOptions) -> anyhow::Result<()> {
    use eframe::egui_wgpu::{WgpuConfiguration, WgpuSetup};
    let mut wgpu_options = WgpuConfiguration::default();
    if options.no_vsync {
        wgpu_options.surface.present_mode = wgpu::PresentMode::AutoNoVsync;
    }
    if let WgpuSetup::CreateNew(setup) = &mut wgpu_options.wgpu_setup {
        // egui asks for WebGPU's default limits; the DRR shares this device and wants the
        // adapter's storage and 3D texture limits, so that a large CT can go into a storage
        // buffer (the faster path) or a texture above 2048 voxels per side.
        let egui_default = setup.device_descriptor.clone();
        setup.device_descriptor = Arc::new(move |adapter| {
            let mut desc = egui_default(adapter);
            if adapter.get_info().backend != wgpu::Backend::Gl {
                let a = adapter.limits();
                let l = &mut desc.required_limits;
                l.max_storage_buffer_binding_size = a.max_storage_buffer_binding_size;
                l.max_buffer_size = a.max_buffer_size;
                l.max_texture_dimension_3d = a.max_texture_dimension_3d;
            }
            desc
        });
    }
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        wgpu_options,
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 800.0])
            .with_title("fluoropose")
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "fluoropose",
        native,
        Box::new(move |cc| Ok(Box::new(FluoroApp::new(cc, options)))),
    )
    .map_err(|e| anyhow::anyhow!("the window could not open: {e}"))
}

/// Colours of the 8 landmarks (distinct on grey).
pub const COLOURS: [egui::Color32; N_LANDMARKS] = [
    egui::Color32::from_rgb(230, 25, 75),
    egui::Color32::from_rgb(60, 180, 75),
    egui::Color32::from_rgb(255, 225, 25),
    egui::Color32::from_rgb(0, 130, 200),
    egui::Color32::from_rgb(245, 130, 48),
    egui::Color32::from_rgb(145, 30, 180),
    egui::Color32::from_rgb(70, 240, 240),
    egui::Color32::from_rgb(240, 50, 230),
];

#[cfg(test)]
mod tests {
    use super::{BoneShown, Settings};
    use eframe::wgpu;

    /// `s` as the app saves it and loads it back.
    fn saved_and_loaded(s: &Settings) -> Settings {
        serde_json::from_str(&serde_json::to_string(s).expect("settings serialise"))
            .expect("settings load")
    }

    /// The moved views follow the network's device until the user chooses; settings saved
    /// before they existed load with the device's default, and a choice survives a save.
    #[test]
    fn shift_views_follow_the_device_until_chosen() {
        use crate::model::Views;
        let fresh = Settings::default();
        assert_eq!(fresh.decode(true).views, Views::recommended());
        assert_eq!(
            fresh.decode(false).views,
            Views {
                denoise: true,
                ..Views::MIRROR
            }
        );
        let old: Settings = serde_json::from_str(r#"{"mirror": true, "consistent": true}"#)
            .expect("an earlier run's settings load");
        assert_eq!(old.shift, None);
        // Smoothing noisy frames came later: earlier runs' settings load with it on.
        assert!(old.denoise && old.decode(false).views.denoise);
        for choice in [false, true] {
            let chosen = Settings {
                shift: Some(choice),
                ..Settings::default()
            };
            let back = saved_and_loaded(&chosen);
            for fits in [false, true] {
                assert_eq!(back.shift_views(fits), choice);
                assert_eq!(back.decode(fits).views.shift_px > 0, choice);
            }
        }
    }

    /// Refining while playing follows the DRR's device until the user chooses; settings saved
    /// before the choice could be left to the device (every one of them says `false`) start
    /// from the device's default, and a choice is kept through a save and a load.
    #[test]
    fn refining_while_playing_follows_the_device_until_chosen() {
        let adapter = |device_type| wgpu::AdapterInfo::new(device_type, wgpu::Backend::Vulkan);
        use crate::drr::gpu::refines_while_playing as by_device;
        assert!(by_device(&adapter(wgpu::DeviceType::DiscreteGpu)));
        for shared in [
            wgpu::DeviceType::Cpu,
            wgpu::DeviceType::IntegratedGpu,
            wgpu::DeviceType::Other,
        ] {
            assert!(!by_device(&adapter(shared)), "{shared:?}");
        }
        let fresh = Settings::default();
        assert!(fresh.refine_while_playing(true) && !fresh.refine_while_playing(false));
        let old: Settings =
            serde_json::from_str(r#"{"refine": true, "refine_while_playing": false}"#)
                .expect("an earlier run's settings load");
        assert!(old.refine && old.refine_while_playing(true));
        for choice in [false, true] {
            let chosen = Settings {
                refine_playing: Some(choice),
                ..Settings::default()
            };
            let back = saved_and_loaded(&chosen);
            for gpu in [false, true] {
                assert_eq!(back.refine_while_playing(gpu), choice);
            }
        }
    }

    /// Whatever the setting, the frame and the DRR are drawn the same way round: bone dark on
    /// screen in both or in neither; bright and dark settings force it, whatever the source.
    #[test]
    fn frame_and_drr_are_drawn_the_same_way_round() {
        for bone in [BoneShown::AsSource, BoneShown::Bright, BoneShown::Dark] {
            for read_inverted in [false, true] {
                let frame_dark = read_inverted != bone.invert_frame(read_inverted);
                let drr_dark = bone.invert_drr(read_inverted);
                assert_eq!(
                    frame_dark, drr_dark,
                    "{bone:?}, read inverted {read_inverted}"
                );
                match bone {
                    BoneShown::Bright => assert!(!frame_dark),
                    BoneShown::Dark => assert!(frame_dark),
                    BoneShown::AsSource => assert_eq!(frame_dark, read_inverted),
                }
            }
        }
    }
}
