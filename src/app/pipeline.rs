//! The live pipeline on worker threads: source -> model -> landmarks -> pose, one way.
//! The UI sends [`Command`]s and takes the newest [`Processed`] frame; results the UI has not
//! taken are dropped (channel of one), so the overlay never lags behind the stream.
//!
//! The simulated C-arm renders on a thread of its own, one frame ahead: while the model looks at
//! frame N, frame N+1 is being rendered, as a real C-arm acquires the next frame while the last
//! one is processed. Latency is counted from the moment a frame exists (rendered, or read) to
//! the moment the UI takes its overlay, so a frame that waits for the model counts its wait.

use crate::detect::{Decode, detect};
use crate::geometry::{Camera, Pose};
use crate::landmarks::Landmarks3d;
use crate::model::{Detection, Predictor};
use crate::registration::Solution;
use crate::registration::intensity::IntensityError;
use crate::registration::tracking::{PoseTracker, Tracked, TrackerOptions};
use crate::stream::simulated::{CpuDrr, Detector, DrrSource, SimulatedStream, Trajectory};
use crate::task::Task;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

/// Where frames come from.
#[derive(Clone)]
pub enum Source {
    /// DRRs of the scene's CT along a smooth trajectory with quantum noise.
    Simulated {
        /// Attenuation volume to render.
        density: Arc<crate::drr::DensityVolume>,
        /// Trajectory centre.
        isocenter: nalgebra::Point3<f64>,
        /// Detector size, pixels.
        size: u32,
        /// Photons per pixel (0: clean).
        photons: f64,
        /// How far the C-arm moves: 1 the default trajectory (±15°, ±40 mm over 20 s), 0 still.
        motion: f64,
    },
    /// Pre-decoded frames (a folder of images, a DICOM file or cine).
    Frames {
        /// What they were read from.
        origin: PathBuf,
        /// Width, height.
        size: (usize, usize),
        /// The frames.
        frames: Arc<Vec<Vec<f32>>>,
        /// The camera from the header (or the default).
        camera: Camera,
    },
}

/// What the UI asks of the worker.
pub enum Command {
    /// Start or stop the frame clock.
    Play(bool),
    /// Process the next frame once.
    Step,
    /// Go to frame N.
    Seek(u64),
    /// Frames per second of the clock.
    Fps(f64),
    /// Wrap at the end of a finite source.
    Loop(bool),
    /// Replace the source.
    Source(Source),
    /// Replace the model (hot swap).
    Model(Arc<Predictor>),
    /// Replace the CT's 3D landmarks the pose is solved with.
    Landmarks(Landmarks3d),
    /// Override the camera of recorded frames (the header's geometry, corrected by the user).
    Camera(Camera),
    /// How heatmaps become landmarks (mirror averaging, pose-consistent peaks).
    Decode(Decode),
    /// Filter the pose over frames ([`PoseTracker`]).
    Track(bool),
    /// Refine solved poses against their frames with DRRs of this CT, on a thread of its own
    /// ([`crate::registration::intensity`]); `None` stops refining.
    Refine(Option<Arc<crate::drr::DensityVolume>>),
    /// Refine while the stream plays too (else only paused or stepped frames, and the playing
    /// stream while the C-arm holds still; on by default).
    RefineWhilePlaying(bool),
    /// A refinement finished (sent by the refinement thread).
    Refined(Result<RefinedPose, String>),
    /// The refinement of this frame was cancelled before it finished (sent by the refinement
    /// thread).
    RefineCancelled(u64),
    /// Stop the thread.
    Quit,
}

/// Per-stage latency, milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Producing the frame (rendering for the simulated source).
    pub source_ms: f64,
    /// U-Net inference.
    pub inference_ms: f64,
    /// Registration.
    pub pose_ms: f64,
}

/// How old (stream seconds) a refinement may be for its correction to carry over to later
/// frames: the turn below is checked, a slow slide of the C-arm is not. Longer than a
/// refinement takes on a CPU (2-3 s with the network sharing two cores), else none carries
/// over: at 2 s, 7% of a still C-arm's frames were corrected, at 5 s 96% (live TRE 7.45 ->
/// 1.39 mm), and 88% of a slowly drifting one's (4.80 -> 3.46 mm); `bench pipeline --refine`.
const CORRECTION_MAX_AGE_S: f64 = 5.0;
/// How far (degrees) the C-arm may have turned since the refined frame for the same.
const CORRECTION_MAX_TURN_DEG: f64 = 4.0;
/// A C-arm whose live pose has turned under this (degrees) for [`STILL_FOR_S`] holds still: a
/// refinement started now will still apply when it ends (half of [`CORRECTION_MAX_TURN_DEG`],
/// so that the rest is left for the seconds the refinement takes).
const STILL_TURN_DEG: f64 = 0.5 * CORRECTION_MAX_TURN_DEG;
/// How long (stream seconds) a C-arm must hold still before the playing stream is refined
/// without "also while playing".
const STILL_FOR_S: f64 = 1.0;

/// Whether the C-arm holds still, followed frame by frame from the live poses: still since the
/// first frame of a run whose live poses all turned under [`STILL_TURN_DEG`] from it (so a
/// slow drift ends a run too), broken by a frame without a pose.
#[derive(Clone, Copy, Debug, Default)]
struct Stillness {
    /// The run's first frame and its live pose.
    since: Option<(u64, Pose)>,
}

impl Stillness {
    /// Follows frame `index`, whose live pose is `live` (`None`: not solved).
    fn follow(&mut self, index: u64, live: Option<Pose>) {
        let Some(live) = live else {
            self.since = None;
            return;
        };
        match self.since {
            Some((_, from))
                if crate::registration::metrics::rotation_error_deg(&from, &live)
                    <= STILL_TURN_DEG => {}
            _ => self.since = Some((index, live)),
        }
    }

    /// Whether the C-arm has held still for [`STILL_FOR_S`] up to frame `index` (the newest
    /// followed), frames `1 / fps` apart.
    fn held(&self, index: u64, fps: f64) -> bool {
        self.since
            .is_some_and(|(from, _)| index.saturating_sub(from) as f64 >= STILL_FOR_S * fps)
    }
}

/// A solved pose refined against the frame it was solved on.
#[derive(Clone, Copy, Debug)]
pub struct RefinedPose {
    /// The frame.
    pub index: u64,
    /// The refined pose.
    pub pose: Pose,
    /// The landmark pose it started from.
    pub from: Pose,
    /// The pose the frame was shown with (tracked, else solved): what [`Processed::corrected`]
    /// carries the correction from.
    pub live: Pose,
    /// The frame's true pose (simulated source).
    pub truth: Option<Pose>,
    /// Gradient correlation of the DRR with the frame, before and after.
    pub similarity: (f64, f64),
    /// How long it took, ms.
    pub ms: f64,
}

/// A refinement under way, for the UI: its frame, when it started, and its task (the DRRs
/// rendered so far as progress, the run under way as message; [`Task::cancel`] stops it).
#[derive(Clone)]
pub struct Refining {
    /// The frame being refined.
    pub index: u64,
    /// When the refinement started.
    pub started: Instant,
    /// Its progress and cancellation.
    pub task: Task,
}

/// Where the refinement thread shows what it is doing, shared with the UI.
type RefiningSlot = Arc<std::sync::Mutex<Option<Refining>>>;

/// The refinement under way in `slot`, if any (a poisoned lock reads as none).
fn refining_in(slot: &RefiningSlot) -> Option<Refining> {
    slot.lock().ok().and_then(|r| r.clone())
}

impl RefinedPose {
    /// Whether the refined pose is shown and carried over to later frames: its DRR matches
    /// the frame at least as well as [`crate::registration::intensity::RESTART_BELOW`], under
    /// which every start of the refinement ended somewhere else than the frame's pose.
    pub fn trusted(&self) -> bool {
        self.similarity.1 >= crate::registration::intensity::RESTART_BELOW
    }
}

/// One processed frame.
#[derive(Clone)]
pub struct Processed {
    /// Frame number.
    pub index: u64,
    /// Number of frames of a finite source.
    pub count: Option<u64>,
    /// Width, height.
    pub size: (usize, usize),
    /// Pixels (row 0 at the top).
    pub pixels: Arc<Vec<f32>>,
    /// The camera of the frame.
    pub camera: Camera,
    /// Detected landmarks (empty without a model).
    pub detections: Vec<Detection>,
    /// The frame was read inverted (bone dark; [`crate::detect::Polarity`]).
    pub inverted: bool,
    /// How noisy the frame was to the network and how much it was smoothed (when it ran).
    pub noise: Option<crate::model::noise::InputNoise>,
    /// The solved pose.
    pub solution: Option<Solution>,
    /// The pose filtered over frames (when tracking is on and a pose was ever solved).
    pub tracked: Option<Tracked>,
    /// The newest refinement (of this frame or an earlier one; see its index), while
    /// refinement is on.
    pub refined: Option<RefinedPose>,
    /// This frame's pose (tracked, else solved) corrected as the newest refinement corrected
    /// its own frame's ([`crate::registration::intensity::transfer`]), while that refinement is
    /// recent and its view near.
    pub corrected: Option<Pose>,
    /// The true pose (simulated source).
    pub truth: Option<Pose>,
    /// Stage latencies.
    pub timings: Timings,
    /// When the frame was produced (for frame-to-overlay latency).
    pub produced: Instant,
    /// Frames skipped because the worker was behind, so far.
    pub skipped: u64,
}

impl Processed {
    /// How well the network read the frame ([`crate::detect::polarity_score`]), when it ran.
    pub fn score(&self) -> Option<f64> {
        (!self.detections.is_empty())
            .then(|| crate::detect::polarity_score(self.detections.iter().map(|d| d.confidence)))
    }

    /// The frame's score when the network is unsure of it ([`crate::detect::UNSURE_BELOW`]).
    pub fn unsure_score(&self) -> Option<f64> {
        self.score().filter(|s| *s < crate::detect::UNSURE_BELOW)
    }

    /// Whether the network is unsure of the frame.
    pub fn unsure(&self) -> bool {
        self.unsure_score().is_some()
    }

    /// The live pose: tracked over frames, else this frame's own solve when it succeeded.
    pub fn live_pose(&self) -> Option<Pose> {
        self.tracked.map(|t| t.pose).or(self
            .solution
            .as_ref()
            .filter(|s| s.status.ok())
            .map(|s| s.pose))
    }

    /// The best pose there is for this frame, the one the DRR shows: its own refinement, else
    /// the live pose corrected by the newest refinement, else the live pose (refinements that
    /// are not [`RefinedPose::trusted`] count for neither).
    pub fn shown_pose(&self) -> Option<Pose> {
        self.refined
            .filter(|r| r.index == self.index && r.trusted())
            .map(|r| r.pose)
            .or(self.corrected)
            .or_else(|| self.live_pose())
    }
}

/// The worker's handle.
pub struct Pipeline {
    commands: std::sync::mpsc::Sender<Command>,
    results: Receiver<Result<Processed, String>>,
    refining: RefiningSlot,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the worker (paused) on `source`, reading frames as `decode` says (the first
    /// frame is read before any command arrives).
    /// `on_frame` runs after each result is sent (the app asks egui for a repaint there, so
    /// that the UI draws when a frame arrives instead of polling).
    pub fn start(
        source: Source,
        model: Option<Arc<Predictor>>,
        landmarks: Landmarks3d,
        decode: Decode,
        on_frame: Box<dyn Fn() + Send>,
    ) -> Self {
        let (ctx, crx) = std::sync::mpsc::channel();
        let (rtx, rrx) = sync_channel(1);
        let to_self = ctx.clone();
        let refining = RefiningSlot::default();
        let slot = refining.clone();
        let thread = std::thread::Builder::new()
            .name("fluoropose-pipeline".into())
            .spawn(move || {
                let out = Outlet {
                    results: rtx,
                    on_frame,
                    to_self,
                    refining: slot,
                };
                Worker::new(source, model, landmarks, decode, out).run(crx)
            })
            .ok();
        Self {
            commands: ctx,
            results: rrx,
            refining,
            thread,
        }
    }

    /// Sends a command (ignored if the worker is gone).
    pub fn send(&self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// The refinement under way, if any: what the Pose panel shows while it runs (seconds on a
    /// CPU's software renderer) and what its Cancel button stops.
    pub fn refining(&self) -> Option<Refining> {
        refining_in(&self.refining)
    }

    /// The newest result, if any arrived.
    pub fn latest(&self) -> Option<Result<Processed, String>> {
        let mut last = None;
        loop {
            match self.results.try_recv() {
                Ok(r) => last = Some(r),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return last,
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A rendered simulated frame: pixels, camera, true pose, render ms, when it was done.
struct Rendered {
    pixels: Vec<f32>,
    camera: Camera,
    pose: Pose,
    render_ms: f64,
    done: Instant,
}

enum SimRequest {
    Render(u64),
    Fps(f64),
}

/// The simulated C-arm on its own thread: renders the frames it is asked for, one at a time.
struct SimThread {
    requests: Sender<SimRequest>,
    frames: Receiver<Result<Rendered, String>>,
    /// The index asked for and not yet taken.
    pending: Option<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimThread {
    fn start(
        density: Arc<crate::drr::DensityVolume>,
        isocenter: nalgebra::Point3<f64>,
        size: u32,
        photons: f64,
        motion: f64,
        fps: f64,
    ) -> Self {
        let (qtx, qrx) = std::sync::mpsc::channel::<SimRequest>();
        let (ftx, frx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fluoropose-carm".into())
            .spawn(move || {
                // Frames are rendered on a headless device of their own (the GPU path), else on
                // the CPU reference: the UI's device stays free for the verification DRR.
                let renderer: Box<dyn DrrSource> = match crate::drr::gpu::headless_device(false)
                    .map_err(|e| e.to_string())
                    .and_then(|(d, q, _)| {
                        let mut r = crate::drr::gpu::DrrRenderer::new(&d, &q);
                        r.set_volume(density.clone()).map_err(|e| e.to_string())?;
                        Ok(r)
                    }) {
                    Ok(r) => Box::new(r),
                    Err(e) => {
                        log::warn!("simulated stream on the CPU reference: {e}");
                        Box::new(CpuDrr {
                            volume: density.clone(),
                            renderer: crate::drr::cpu::Renderer::Siddon { full_line: false },
                        })
                    }
                };
                let detector = (photons > 0.0).then(|| Detector::at_dose(photons));
                let mut trajectory = Trajectory::around(isocenter);
                let motion = if motion.is_finite() {
                    motion.max(0.0)
                } else {
                    1.0
                };
                trajectory.rotation_amplitude_rad *= motion;
                trajectory.translation_amplitude_mm *= motion;
                let mut sim = SimulatedStream::new(
                    trajectory,
                    Camera::paper(size),
                    renderer,
                    fps,
                    detector,
                    42,
                );
                for req in qrx {
                    match req {
                        SimRequest::Fps(f) => sim.fps = f,
                        SimRequest::Render(index) => {
                            let t = Instant::now();
                            sim.seek(index);
                            let r = sim.next_frame().map(|f| Rendered {
                                pixels: f.pixels,
                                camera: sim.camera,
                                pose: f.pose,
                                render_ms: t.elapsed().as_secs_f64() * 1e3,
                                done: Instant::now(),
                            });
                            if ftx.send(r).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .ok();
        Self {
            requests: qtx,
            frames: frx,
            pending: None,
            thread,
        }
    }

    fn request(&mut self, index: u64) {
        if self.pending.is_none() && self.requests.send(SimRequest::Render(index)).is_ok() {
            self.pending = Some(index);
        }
    }

    /// Frame `index`: the one rendered ahead if it is that one, else rendered now. Then the
    /// next one is asked for, to render while this one is processed.
    fn take(&mut self, index: u64) -> Result<Rendered, String> {
        let gone = || "the simulated C-arm stopped".to_string();
        loop {
            if self.pending.is_none() {
                self.request(index);
            }
            let Some(p) = self.pending.take() else {
                return Err(gone());
            };
            let r = self.frames.recv().map_err(|_| gone())?;
            if p == index {
                self.request(index + 1);
                return r;
            }
            // A frame that was asked for before a seek: dropped.
        }
    }
}

impl Drop for SimThread {
    fn drop(&mut self) {
        // Closing the request channel ends the thread after the frame in hand.
        let (dead, _) = std::sync::mpsc::channel();
        self.requests = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One frame for the refinement thread.
struct RefineJob {
    index: u64,
    pixels: Arc<Vec<f32>>,
    camera: Camera,
    pose: Pose,
    live: Pose,
    truth: Option<Pose>,
    pivot: nalgebra::Point3<f64>,
}

/// What the refinement thread is asked.
enum RefineRequest {
    Volume(Arc<crate::drr::DensityVolume>),
    Job(Box<RefineJob>),
}

/// Intensity-based refinement on its own thread (and GPU device), one frame at a time: the
/// worker hands it the newest solved frame whenever it is idle, so that the live overlay never
/// waits for it; each result comes back to the worker as [`Command::Refined`].
struct RefineThread {
    requests: Sender<RefineRequest>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    refining: RefiningSlot,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RefineThread {
    fn start(
        volume: Arc<crate::drr::DensityVolume>,
        back: Sender<Command>,
        refining: RefiningSlot,
    ) -> Self {
        let slot = refining.clone();
        let (tx, rx) = std::sync::mpsc::channel::<RefineRequest>();
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = busy.clone();
        let _ = tx.send(RefineRequest::Volume(volume));
        let thread = std::thread::Builder::new()
            .name("fluoropose-refine".into())
            .spawn(move || {
                // Before the device exists, so that its driver's threads inherit it too.
                crate::lower_thread_priority();
                let mut source = crate::drr::AnyDrr::new(false);
                let opts = crate::registration::intensity::IntensityOptions::default();
                for req in rx {
                    match req {
                        RefineRequest::Volume(v) => source.set_volume(v),
                        RefineRequest::Job(job) => {
                            let RefineJob {
                                index,
                                pixels,
                                camera,
                                pose,
                                live,
                                truth,
                                pivot,
                            } = *job;
                            let t0 = Instant::now();
                            let task = Task::new();
                            let show = |r: Option<Refining>| {
                                if let Ok(mut slot) = slot.lock() {
                                    *slot = r;
                                }
                            };
                            show(Some(Refining {
                                index,
                                started: t0,
                                task: task.clone(),
                            }));
                            let r = crate::registration::intensity::refine_watched(
                                &pixels,
                                &camera,
                                &pivot,
                                &pose,
                                &mut source,
                                &opts,
                                &task,
                            );
                            show(None);
                            flag.store(false, std::sync::atomic::Ordering::Release);
                            if matches!(r, Err(IntensityError::Cancelled)) {
                                log::debug!("refinement of frame {index} cancelled");
                                if back.send(Command::RefineCancelled(index)).is_err() {
                                    return;
                                }
                                continue;
                            }
                            let r = r
                                .map(|r| RefinedPose {
                                    index,
                                    pose: r.pose,
                                    from: pose,
                                    live,
                                    truth,
                                    similarity: (r.similarity_before, r.similarity),
                                    ms: t0.elapsed().as_secs_f64() * 1e3,
                                })
                                .map_err(|e| e.to_string());
                            if let Ok(r) = &r {
                                log::debug!("refined frame {} in {:.0} ms", r.index, r.ms);
                            }
                            if back.send(Command::Refined(r)).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .ok();
        Self {
            requests: tx,
            busy,
            refining,
            thread,
        }
    }

    /// Hands over a frame unless one is in hand (then the frame is dropped).
    fn offer(&self, job: RefineRequest) {
        use std::sync::atomic::Ordering;
        if !self.busy.swap(true, Ordering::AcqRel) && self.requests.send(job).is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }
}

impl Drop for RefineThread {
    fn drop(&mut self) {
        // Closing the request channel ends the thread after the refinement in hand, which is
        // cancelled first: on a software renderer it could hold the app's exit for seconds.
        if let Some(now) = refining_in(&self.refining) {
            now.task.cancel();
        }
        let (dead, _) = std::sync::mpsc::channel();
        self.requests = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A frame before inference: pixels, (width, height), camera, true pose, index, the time it took
/// to produce (ms) and when it was there.
type RawFrame = (
    Vec<f32>,
    (usize, usize),
    Camera,
    Option<Pose>,
    u64,
    f64,
    Instant,
);

struct Worker {
    source: Source,
    sim: Option<SimThread>,
    model: Option<Arc<Predictor>>,
    landmarks: Landmarks3d,
    out: SyncSender<Result<Processed, String>>,
    on_frame: Box<dyn Fn() + Send>,
    playing: bool,
    fps: f64,
    looping: bool,
    next: u64,
    last_pose: Option<Pose>,
    skipped: u64,
    decode: Decode,
    tracker: PoseTracker,
    track: bool,
    refiner: Option<RefineThread>,
    refine_while_playing: bool,
    refined: Option<RefinedPose>,
    /// The refinement under way (the refinement thread fills it, the UI reads it).
    refining: RefiningSlot,
    /// A frame whose refinement this worker cancelled for a newer one (not the user).
    superseded: Option<u64>,
    /// A frame whose refinement the user cancelled: not offered again.
    declined: Option<u64>,
    /// Whether the C-arm holds still.
    still: Stillness,
    /// The last frame sent, to send again when its refinement arrives.
    last: Option<Processed>,
    to_self: Sender<Command>,
}

/// Where the worker's results go: the UI's channel and repaint, itself (the refinement
/// thread's answers), and the UI's view of the refinement under way.
struct Outlet {
    results: SyncSender<Result<Processed, String>>,
    on_frame: Box<dyn Fn() + Send>,
    to_self: Sender<Command>,
    refining: RefiningSlot,
}

impl Worker {
    fn new(
        source: Source,
        model: Option<Arc<Predictor>>,
        landmarks: Landmarks3d,
        decode: Decode,
        outlet: Outlet,
    ) -> Self {
        let Outlet {
            results: out,
            on_frame,
            to_self,
            refining,
        } = outlet;
        let mut w = Self {
            source: source.clone(),
            sim: None,
            model,
            landmarks,
            out,
            on_frame,
            playing: false,
            fps: 10.0,
            looping: true,
            next: 0,
            last_pose: None,
            skipped: 0,
            decode,
            tracker: PoseTracker::new(TrackerOptions::default()),
            track: true,
            refiner: None,
            refine_while_playing: true,
            refined: None,
            refining,
            superseded: None,
            declined: None,
            still: Stillness::default(),
            last: None,
            to_self,
        };
        w.set_source(source);
        w
    }

    /// The pose so far no longer describes what comes next (new source, CT, camera, seek).
    fn forget_pose(&mut self) {
        self.last_pose = None;
        self.tracker.reset();
        self.refined = None;
        // Frame numbers start again or jump: a cancelled one's number may be another frame.
        self.declined = None;
        self.still = Stillness::default();
    }

    fn set_source(&mut self, source: Source) {
        // The old C-arm thread (if any) is stopped before the new one starts.
        self.sim = None;
        self.sim = match &source {
            Source::Simulated {
                density,
                isocenter,
                size,
                photons,
                motion,
            } => Some(SimThread::start(
                density.clone(),
                *isocenter,
                *size,
                *photons,
                *motion,
                self.fps,
            )),
            Source::Frames { .. } => None,
        };
        self.source = source;
        self.next = 0;
        self.forget_pose();
    }

    fn count(&self) -> Option<u64> {
        match &self.source {
            Source::Frames { frames, .. } => Some(frames.len() as u64),
            Source::Simulated { .. } => None,
        }
    }

    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Play(p) => {
                self.playing = p;
                // Paused: the frame in hand is the one to refine now.
                if !p && let Some(last) = self.last.clone() {
                    self.offer_refinement(&last);
                }
            }
            Command::Step => {
                self.process();
            }
            Command::Seek(i) => {
                self.next = i;
                self.forget_pose();
                self.process();
            }
            Command::Fps(f) => {
                self.fps = f.clamp(0.1, 120.0);
                // The tracker's clock is frame index / fps.
                self.tracker.reset();
                if let Some(s) = &self.sim {
                    let _ = s.requests.send(SimRequest::Fps(self.fps));
                }
            }
            Command::Loop(l) => self.looping = l,
            Command::Source(s) => {
                self.set_source(s);
                self.process();
            }
            Command::Model(m) => {
                self.model = Some(m);
                self.forget_pose();
            }
            Command::Landmarks(l) => {
                self.landmarks = l;
                self.forget_pose();
            }
            Command::Camera(c) => {
                if let Source::Frames { camera, .. } = &mut self.source {
                    *camera = c;
                    self.forget_pose();
                    if !self.playing {
                        self.next = self.next.saturating_sub(1);
                        self.process();
                    }
                }
            }
            Command::Track(on) => {
                self.track = on;
                self.tracker.reset();
            }
            Command::Decode(d) => {
                self.decode = Decode {
                    inverted_first: self.decode.inverted_first,
                    ..d
                };
                if !self.playing {
                    self.next = self.next.saturating_sub(1);
                    self.process();
                }
            }
            Command::Refine(volume) => match volume {
                Some(v) => match &self.refiner {
                    Some(r) => {
                        // The refinement under way matches DRRs of the CT that was.
                        if let Some(now) = refining_in(&self.refining) {
                            self.superseded = Some(now.index);
                            now.task.cancel();
                        }
                        let _ = r.requests.send(RefineRequest::Volume(v));
                        self.refined = None;
                    }
                    None => {
                        self.refiner = Some(RefineThread::start(
                            v,
                            self.to_self.clone(),
                            self.refining.clone(),
                        ))
                    }
                },
                None => {
                    // Dropping the thread cancels the refinement under way: not the user's.
                    self.superseded = refining_in(&self.refining).map(|r| r.index);
                    self.refiner = None;
                    self.refined = None;
                }
            },
            Command::RefineWhilePlaying(on) => self.refine_while_playing = on,
            Command::Refined(r) => {
                if self.refiner.is_none() {
                    return true;
                }
                match r {
                    Ok(r) => {
                        self.refined = Some(r);
                        // Shown at once on the frame it belongs to when that is still the
                        // newest (a paused stream); else with the next frame.
                        if let Some(p) = self.last.as_mut().filter(|p| p.index == r.index) {
                            p.refined = Some(r);
                            let _ = self.out.try_send(Ok(p.clone()));
                            (self.on_frame)();
                        }
                    }
                    Err(e) => {
                        let _ = self.out.try_send(Err(format!("refinement: {e}")));
                        (self.on_frame)();
                    }
                }
                // The frame in hand may be waiting: offer it.
                if let Some(p) = self.last.clone() {
                    self.offer_refinement(&p);
                }
            }
            Command::RefineCancelled(index) => {
                // Cancelled by the worker for a newer frame, or by the user: that frame is
                // then left alone.
                if self.superseded.take() != Some(index) {
                    self.declined = Some(index);
                }
                if let Some(p) = self.last.clone() {
                    self.offer_refinement(&p);
                }
            }
            Command::Quit => return false,
        }
        true
    }

    fn run(mut self, commands: Receiver<Command>) {
        // The first frame at once, so that the app shows something before Play.
        self.process();
        let mut clock = Instant::now();
        loop {
            let period = Duration::from_secs_f64(1.0 / self.fps);
            let wait = if self.playing {
                period.saturating_sub(clock.elapsed())
            } else {
                Duration::from_millis(200)
            };
            match commands.recv_timeout(wait) {
                Ok(c) => {
                    if !self.handle(c) {
                        return;
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !self.playing {
                continue;
            }
            // Behind the clock: the ticks that passed without a frame are counted as skipped
            // (the C-arm's frames in that time were not shown). The simulated C-arm then goes
            // on from the frame it has ready rather than jumping ahead and throwing it away.
            let late = (clock.elapsed().as_secs_f64() / period.as_secs_f64()).floor() as u64;
            if late > 1 {
                self.skipped += late - 1;
            }
            clock = Instant::now();
            self.process();
        }
    }

    fn frame(&mut self) -> Result<RawFrame, String> {
        let index = self.next;
        let t0 = Instant::now();
        match (&mut self.sim, &self.source) {
            (Some(sim), _) => {
                let f = sim.take(index)?;
                let c = f.camera;
                Ok((
                    f.pixels,
                    (c.width_px as usize, c.height_px as usize),
                    c,
                    Some(f.pose),
                    index,
                    f.render_ms,
                    f.done,
                ))
            }
            (
                None,
                Source::Frames {
                    size,
                    frames,
                    camera,
                    ..
                },
            ) => {
                let n = frames.len() as u64;
                if n == 0 {
                    return Err("the source has no frames".into());
                }
                let i = if index >= n {
                    if self.looping {
                        index % n
                    } else {
                        self.playing = false;
                        n - 1
                    }
                } else {
                    index
                };
                self.next = i;
                let pixels = frames[i as usize].clone();
                Ok((
                    pixels,
                    *size,
                    *camera,
                    None,
                    i,
                    t0.elapsed().as_secs_f64() * 1e3,
                    Instant::now(),
                ))
            }
            (None, Source::Simulated { .. }) => Err("the simulated stream did not start".into()),
        }
    }

    fn process(&mut self) {
        let r = self.frame();
        let (pixels, size, camera, truth, index, source_ms, produced) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = self.out.try_send(Err(e));
                (self.on_frame)();
                self.playing = false;
                return;
            }
        };
        self.next = index + 1;
        let found = match &self.model {
            Some(m) => match detect(
                m,
                &pixels,
                size.0,
                size.1,
                &camera,
                Some(&self.landmarks.points),
                self.last_pose.as_ref(),
                &self.decode,
            ) {
                Ok(f) => {
                    // The C-arm moves little between frames: the next solve starts here.
                    self.last_pose = f
                        .solution
                        .as_ref()
                        .filter(|s| s.status.ok())
                        .map(|s| s.pose);
                    // A stream keeps its polarity: the next frame is read this way first.
                    self.decode.inverted_first = f.inverted;
                    Some(f)
                }
                Err(e) => {
                    let _ = self.out.try_send(Err(format!("inference: {e}")));
                    None
                }
            },
            None => None,
        };
        let (inference_ms, pose_ms) = found
            .as_ref()
            .map_or((0.0, 0.0), |f| (f.inference_ms, f.pose_ms));
        let noise = found.as_ref().map(|f| f.noise);
        let (detections, solution, inverted) = found.map_or((Vec::new(), None, false), |f| {
            (f.detections, f.solution, f.inverted)
        });
        let mut p = Processed {
            index,
            count: self.count(),
            size,
            pixels: Arc::new(pixels),
            camera,
            detections,
            inverted,
            noise,
            solution,
            tracked: None,
            refined: self.refined,
            corrected: None,
            truth,
            timings: Timings {
                source_ms,
                inference_ms,
                pose_ms,
            },
            produced,
            skipped: self.skipped,
        };
        // Frames are `1 / fps` apart on the stream's clock (dropped ones included). A frame the
        // network is unsure of is not a measurement: its solve is as often a restart of the
        // filter at a wrong pose as a noisy right one, and the prediction is the better guess.
        if self.track {
            let measurement = p.solution.as_ref().filter(|_| !p.unsure());
            p.tracked = self.tracker.update(index as f64 / self.fps, measurement);
        }
        p.corrected = match (self.refined, p.live_pose()) {
            (Some(r), Some(live))
                if r.trusted()
                    && index.abs_diff(r.index) as f64 <= CORRECTION_MAX_AGE_S * self.fps
                    && crate::registration::metrics::rotation_error_deg(&r.live, &live)
                        <= CORRECTION_MAX_TURN_DEG =>
            {
                Some(crate::registration::intensity::transfer(
                    &r.live, &r.pose, &live,
                ))
            }
            _ => None,
        };
        self.still.follow(index, p.live_pose());
        self.offer_refinement(&p);
        self.last = Some(p.clone());
        // A full channel means the UI has not taken the last frame: drop this one (no lag).
        let _ = self.out.try_send(Ok(p));
        (self.on_frame)();
    }

    /// Hands `p` to the refinement thread if it is on and idle (and the stream paused, unless
    /// refining while playing or the C-arm holds still), `p` has a pose, and `p` has not been
    /// refined yet.
    fn offer_refinement(&mut self, p: &Processed) {
        let (Some(r), Some(s)) = (&self.refiner, &p.solution) else {
            return;
        };
        // Without "also while playing", a playing stream is refined only while the C-arm holds
        // still: then a refinement's correction carries over to the frames that follow (a CPU
        // takes seconds for one), where on a moving C-arm it would lapse unused.
        if self.playing && !self.refine_while_playing && !self.still.held(p.index, self.fps) {
            return;
        }
        if !s.status.ok()
            || self.refined.is_some_and(|r| r.index == p.index)
            || self.declined == Some(p.index)
        {
            return;
        }
        // A paused stream refines the frame on screen: one stepped past while it was being
        // refined is not worth the seconds a software renderer still needs for it.
        if !self.playing
            && let Some(now) = refining_in(&self.refining)
            && now.index != p.index
            && !now.task.is_cancelled()
        {
            self.superseded = Some(now.index);
            now.task.cancel();
        }
        r.offer(RefineRequest::Job(Box::new(RefineJob {
            index: p.index,
            pixels: p.pixels.clone(),
            camera: p.camera,
            pose: s.pose,
            live: p.live_pose().unwrap_or(s.pose),
            truth: p.truth,
            pivot: crate::registration::intensity::centroid(&self.landmarks.present()),
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A C-arm holds still after a second of live poses within 2° of the run's first, whatever
    /// their jitter below that; a turn past it, a slow drift that adds up to it, or a frame
    /// without a pose starts the count again.
    #[test]
    fn a_c_arm_holds_still_after_a_second_within_two_degrees() {
        let deg = |a: f64| Pose::from_params(&[a.to_radians(), 0.0, 0.0, 0.0, 0.0, 800.0]);
        let fps = 10.0;
        let mut s = Stillness::default();
        for i in 0..10 {
            s.follow(i, Some(deg(if i % 2 == 0 { 0.8 } else { -0.8 })));
            assert!(!s.held(i, fps), "frame {i}: not yet a second");
        }
        s.follow(10, Some(deg(1.5)));
        assert!(s.held(10, fps), "a second of jitter under 2°");
        s.follow(11, Some(deg(3.5)));
        assert!(
            !s.held(11, fps),
            "a turn of 2.7° from the run's first pose starts again"
        );
        for i in 12..=21 {
            s.follow(i, Some(deg(3.5)));
        }
        assert!(s.held(21, fps));
        // A drift of 0.3° a frame: once it has left the still run, never a second within 2°
        // of where a run starts.
        for i in 22..60 {
            s.follow(i, Some(deg(3.5 + 0.3 * (i - 21) as f64)));
            assert!(i < 30 || !s.held(i, fps), "frame {i} drifts");
        }
        for i in 60..=70 {
            s.follow(i, Some(deg(20.0)));
        }
        assert!(s.held(70, fps));
        s.follow(71, None);
        assert!(!s.held(71, fps), "a frame without a pose");
        // At 2 fps a second is 2 frames.
        let mut slow = Stillness::default();
        for i in 0..3 {
            slow.follow(i, Some(deg(0.0)));
        }
        assert!(slow.held(2, 2.0));
    }

    /// A frame's own refinement is the pose it shows, unless its DRR did not match the frame.
    #[test]
    fn an_untrusted_refinement_is_not_shown() {
        let pose = |z: f64| Pose::from_params(&[1.5, 0.0, 0.0, 0.0, 0.0, z]);
        let refined = |similarity: f64| RefinedPose {
            index: 3,
            pose: pose(800.0),
            from: pose(760.0),
            live: pose(760.0),
            truth: None,
            similarity: (0.5, similarity),
            ms: 1.0,
        };
        let mut p = Processed {
            index: 3,
            count: None,
            size: (8, 8),
            pixels: Arc::new(vec![0.0; 64]),
            camera: Camera::paper(8),
            detections: Vec::new(),
            inverted: false,
            noise: None,
            solution: None,
            tracked: None,
            refined: Some(refined(0.95)),
            corrected: Some(pose(790.0)),
            truth: None,
            timings: Timings::default(),
            produced: Instant::now(),
            skipped: 0,
        };
        assert!(p.refined.unwrap().trusted());
        assert_eq!(p.shown_pose(), Some(pose(800.0)));
        p.refined = Some(refined(0.6));
        assert!(!p.refined.unwrap().trusted());
        assert_eq!(
            p.shown_pose(),
            Some(pose(790.0)),
            "the corrected pose instead"
        );
        p.index = 4;
        p.refined = Some(refined(0.95));
        assert_eq!(
            p.shown_pose(),
            Some(pose(790.0)),
            "another frame's refinement"
        );
    }
}
