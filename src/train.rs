//! Training the U-Net (paper section 2.4 and 3.2): BCE on heatmap masks (baseline), BCE plus
//! λ·L_pose (composite, eq. 9), L_pose alone (pel-only), or a baseline checkpoint fine-tuned
//! with L_pose alone (finetune; the paper: one epoch). L_pose (eq. 10) compares the pose that
//! the registration layer solves from the soft-argmax points with the image's true pose; its
//! gradient reaches the network through the implicit-function-theorem backward pass.
//!
//! Checkpoints are written atomically after every epoch with a small state file, so an
//! interrupted run resumes at the next epoch; a loss that stops being finite or explodes is
//! reported as divergence ("DIV" in the paper's table) and never written as weights.

use crate::dataset::{Dataset, Sample, Split};
use crate::model::{ModelConfig, UNet, heatmap};
use crate::registration::layer::RegistrationLayer;
use crate::task::{Cancelled, Task};
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use nalgebra::Point2;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How the network is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// BCE with logits on the heatmap masks.
    Baseline,
    /// BCE + λ L_pose (eq. 9).
    Composite,
    /// L_pose alone from scratch.
    PelOnly,
    /// L_pose alone, from a baseline checkpoint.
    Finetune,
}

impl Mode {
    /// Parses `baseline|composite|pel-only|finetune`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "baseline" => Some(Self::Baseline),
            "composite" => Some(Self::Composite),
            "pel-only" => Some(Self::PelOnly),
            "finetune" => Some(Self::Finetune),
            _ => None,
        }
    }
    fn uses_seg(self) -> bool {
        matches!(self, Self::Baseline | Self::Composite)
    }
    /// Whether the pose loss (eq. 10) is part of the loss: every mode but baseline. Mirrored
    /// images are refused then, since a mirror image has no pose of the CT.
    pub fn uses_pose(self) -> bool {
        !matches!(self, Self::Baseline)
    }
}

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad settings or data.
    #[error("{0}")]
    Invalid(String),
    /// The loss diverged; no weights were written for the diverged state.
    #[error("diverged at epoch {epoch}, step {step}: loss {loss}")]
    Diverged {
        /// Epoch (1-based).
        epoch: usize,
        /// Step within the run.
        step: usize,
        /// The offending loss.
        loss: f64,
    },
    /// Cancelled; the last finished epoch's checkpoint is kept.
    #[error(transparent)]
    Cancelled(#[from] Cancelled),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Dataset errors.
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    /// candle errors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing logs and state.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Training settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Loss.
    pub mode: Mode,
    /// Epochs over the training split.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// AdamW learning rate (the paper: 1e-4).
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// λ of eq. 9.
    pub lambda: f64,
    /// Seed of initialisation and shuffling (the paper: 42).
    pub seed: u64,
    /// Stop after this many steps in total (for tests and quick looks).
    pub max_steps: Option<usize>,
    /// Start from these weights (required for finetune).
    pub init: Option<PathBuf>,
    /// Where the weights go (`NAME.safetensors`, with `NAME.json`, `NAME.state.json` and
    /// `NAME.metrics.jsonl` beside it).
    pub out: PathBuf,
    /// The architecture for a fresh network.
    pub config: ModelConfig,
    /// A loss above this multiple of the first step's counts as divergence.
    pub divergence_factor: f64,
    /// Decay the learning rate along a half cosine from `lr` to `lr / 100` over the run
    /// (`epochs`, or `max_steps` when that comes first); constant when false.
    #[serde(default)]
    pub cosine: bool,
    /// Mirror each training image left-right with this probability, its landmarks swapped
    /// left for right ([`crate::landmarks::MIRROR`]): the mirror image of a pelvis is another
    /// plausible pelvis. For the heatmap loss only: a mirrored image has no rigid pose of the
    /// CT, so the pose loss cannot use it (baseline mode only).
    #[serde(default)]
    pub mirror: f64,
    /// Widen the `init` network to this many base channels before training, computing the
    /// same heatmaps ([`crate::model::widen`]): more capacity without starting over.
    #[serde(default)]
    pub widen: Option<usize>,
    /// Keep an exponential moving average of the weights with this decay per step ([`Ema`];
    /// 0.99 averages about the last 100 steps) and checkpoint it beside the weights as
    /// `NAME.ema.safetensors` ([`ema_path`]).
    #[serde(default)]
    pub ema: Option<f64>,
    /// Prepare each image as the app reads a frame with smoothing on
    /// ([`crate::model::normalised_input`]): one noisier than the shipped networks' training data
    /// is blurred before the network sees it. A network trained on low-dose images this way
    /// learns the smoothed images the app will give it, not raw noise it will never be shown.
    #[serde(default)]
    pub denoise: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Baseline,
            epochs: 1,
            batch: 4,
            lr: 1e-4,
            weight_decay: 0.0,
            lambda: 0.01,
            seed: 42,
            max_steps: None,
            init: None,
            out: PathBuf::from("model.safetensors"),
            config: ModelConfig::default(),
            divergence_factor: 1e3,
            cosine: false,
            mirror: 0.0,
            widen: None,
            ema: None,
            denoise: false,
        }
    }
}

/// Where a run that keeps an [`Ema`] writes it: `NAME.safetensors` -> `NAME.ema.safetensors`
/// (and its card `NAME.ema.json`), a network that loads like any other.
pub fn ema_path(out: &Path) -> PathBuf {
    out.with_extension("ema.safetensors")
}

/// An exponential moving average of every tensor of a network, batch-norm statistics
/// included (Polyak averaging): after each step `avg <- d avg + (1 - d) w`. Checkpoints a few
/// hundred steps apart in one run differ on held-out data by as much as the recipe's steps do
/// (the model card's checkpoint noise); the average of the last ~1/(1 - d) steps does not
/// depend on where the run happens to stop.
pub struct Ema {
    decay: f64,
    avg: UNet,
}

impl Ema {
    /// Starts the average at `net`'s weights.
    pub fn new(net: &UNet, decay: f64) -> Result<Self, TrainError> {
        Self::check_decay(decay)?;
        Ok(Self {
            decay,
            avg: net.duplicate()?,
        })
    }

    /// A decay in (0, 1): 0 would keep only the last weights, 1 only the first.
    fn check_decay(decay: f64) -> Result<(), TrainError> {
        if decay > 0.0 && decay < 1.0 {
            Ok(())
        } else {
            Err(TrainError::Invalid(format!(
                "the EMA decay must be between 0 and 1 (exclusive), not {decay}"
            )))
        }
    }

    /// Continues the average saved at `path` when it was written with the checkpoint being
    /// resumed (its card's step count is `steps`); otherwise (none, a stale one of another
    /// run, or one written just before a crash cut the checkpoint off) starts one at `net`'s
    /// weights.
    pub fn resume(path: &Path, net: &UNet, decay: f64, steps: usize) -> Result<Self, TrainError> {
        let mut ema = Self::new(net, decay)?;
        if path.exists() {
            let saved = UNet::load(path, net.device())?;
            if saved.config.card["training"]["steps"].as_u64() == Some(steps as u64) {
                ema.avg = saved;
            } else {
                log::warn!(
                    "{} is not from step {steps}, where training resumes: the average starts again",
                    path.display()
                );
            }
        }
        Ok(ema)
    }

    /// Folds `net`'s current weights into the average.
    pub fn update(&self, net: &UNet) -> Result<(), TrainError> {
        let current = net.tensors();
        self.avg.set_vars(|name, avg| {
            let w = current.get(name).ok_or_else(|| {
                TrainError::Invalid(format!("{name} is not in the network being averaged"))
            })?;
            Ok((avg.as_tensor().affine(self.decay, 0.0)?
                + w.detach().affine(1.0 - self.decay, 0.0)?)?)
        })
    }

    /// The averaged network.
    pub fn network(&self) -> &UNet {
        &self.avg
    }
}

/// One line of the metrics log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metric {
    /// 1-based epoch.
    pub epoch: usize,
    /// Global step.
    pub step: usize,
    /// Total loss of the step.
    pub loss: f64,
    /// BCE part (0 when unused).
    pub seg_loss: f64,
    /// L_pose part (0 when unused).
    pub pose_loss: f64,
    /// Training throughput, images per second.
    pub images_per_s: f64,
    /// Items whose registration failed in this step.
    pub registration_failures: usize,
    /// Learning rate of the step.
    #[serde(default)]
    pub lr: f64,
}

/// Resume state beside the weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    epochs_done: usize,
    steps_done: usize,
    mode: Mode,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Epochs finished in total (including resumed ones).
    pub epochs_done: usize,
    /// Steps taken in total.
    pub steps: usize,
    /// Mean loss of the last epoch.
    pub last_epoch_loss: f64,
    /// Images per second over this run.
    pub images_per_s: f64,
}

fn sidecar(out: &Path, ext: &str) -> PathBuf {
    out.with_extension(ext)
}

/// Loads a batch: inputs `(B, 1, S, S)` prepared as the model reads a frame (normalised, and
/// with `denoise` smoothed when noisy).
fn batch_tensor(
    cfg: &ModelConfig,
    images: Vec<Vec<f32>>,
    denoise: bool,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let s = cfg.input_size;
    let n = images.len();
    let mut v = Vec::with_capacity(n * s * s);
    for img in images {
        v.extend(crate::model::normalised_input(&cfg.normalisation, img, s, denoise).0);
    }
    Ok(Tensor::from_vec(v, (n, 1, s, s), device)?)
}

/// The pose estimation loss of eq. 10 for a batch: mean over items whose solve succeeded.
fn pose_loss(
    logits: &Tensor,
    samples: &[Item],
    data: &[Dataset],
    tau: f64,
) -> Result<(Tensor, usize), TrainError> {
    let pts = heatmap::soft_argmax(logits, tau)?;
    let points3d = samples
        .iter()
        .map(|&(d, s)| {
            data[d].manifest.subjects[s.subject]
                .all3d()
                .ok_or_else(|| TrainError::Invalid("a subject lacks 3D landmarks".into()))
        })
        .collect::<Result<_, _>>()?;
    // `train` checked that every dataset of a pose-loss run shares this camera.
    let mut layer = RegistrationLayer::new(data[0].manifest.camera, points3d);
    // Landmarks outside the image cannot be found on it: they do not take part.
    layer.weights = Some(
        samples
            .iter()
            .map(|(_, s)| {
                s.landmarks
                    .iter()
                    .map(|l| f64::from(u8::from(l.is_some())))
                    .collect()
            })
            .collect(),
    );
    let poses = layer.forward(&pts)?;
    let failures = layer.failures.load(std::sync::atomic::Ordering::Relaxed);
    let truth: Vec<f32> = samples
        .iter()
        .flat_map(|(_, s)| s.pose.map(|v| v as f32))
        .collect();
    let b = samples.len();
    let truth = Tensor::from_vec(truth, (b, 6), logits.device())?;
    // A failed solve returns zeros: mask it out of the mean (it has no gradient either).
    let ok = poses.abs()?.sum_keepdim(1)?.gt(0.0)?.to_dtype(DType::F32)?;
    let n_ok = ok.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let per_item = ((poses - truth)?.sqr()?.mean_keepdim(1)? + 1e-8)?.sqrt()?;
    Ok((((per_item * ok)?.sum_all()? / n_ok)?, failures))
}

/// The learning rate of step `step` (0-based) of `total`: `opts.lr`, or with `opts.cosine`
/// `lr_min + (lr - lr_min) (1 + cos(pi step / total)) / 2` with `lr_min = lr / 100`. A function
/// of the global step, so a resumed run continues the same curve.
pub fn learning_rate(opts: &TrainOptions, step: usize, total: usize) -> f64 {
    if !opts.cosine || total == 0 {
        return opts.lr;
    }
    let lr_min = opts.lr / 100.0;
    let x = (step.min(total) as f64 / total as f64) * std::f64::consts::PI;
    lr_min + (opts.lr - lr_min) * (1.0 + x.cos()) / 2.0
}

/// A training image: the index of its dataset and its sample.
type Item<'a> = (usize, &'a Sample);

/// Trains on the `train` split of every dataset in `data` together (generated DRRs of several
/// draws, annotated frames beside DRRs). `on_metric` sees every step (the GUI's curves).
pub fn train(
    data: &[Dataset],
    opts: &TrainOptions,
    device: &Device,
    task: &Task,
    on_metric: &mut dyn FnMut(&Metric),
) -> Result<Summary, TrainError> {
    if opts.batch == 0 || opts.epochs == 0 || !(opts.lr.is_finite() && opts.lr > 0.0) {
        return Err(TrainError::Invalid(
            "batch and epochs must be positive and lr a positive number".into(),
        ));
    }
    if !(0.0..=1.0).contains(&opts.mirror) {
        return Err(TrainError::Invalid(format!(
            "the mirror probability must be between 0 and 1, not {}",
            opts.mirror
        )));
    }
    if let Some(d) = opts.ema {
        Ema::check_decay(d)?;
    }
    if opts.mirror > 0.0 && opts.mode.uses_pose() {
        return Err(TrainError::Invalid(
            "mirroring is for the heatmap loss alone (baseline mode): a mirrored image has no \
             rigid pose of the CT for the pose loss"
                .into(),
        ));
    }
    let state_path = sidecar(&opts.out, "state.json");
    let resume: Option<State> = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|s: &State| s.mode == opts.mode && opts.out.exists());
    let net = match (&resume, &opts.init) {
        (Some(_), _) => UNet::load(&opts.out, device)?,
        (None, Some(init)) => {
            let net = UNet::load(init, device)?;
            match opts.widen {
                Some(base) if base != net.config.base_channels => {
                    crate::model::widen::widen(&net, base, opts.seed)?
                }
                _ => net,
            }
        }
        (None, None) if opts.widen.is_some() => {
            return Err(TrainError::Invalid(
                "widening needs --init with the network to widen".into(),
            ));
        }
        (None, None) if opts.mode == Mode::Finetune => {
            return Err(TrainError::Invalid(
                "finetune needs --init with a baseline checkpoint".into(),
            ));
        }
        (None, None) => UNet::with_seed(opts.config.clone(), device, opts.seed)?,
    };
    let cfg = net.config.clone();
    check_datasets(data, &cfg, opts.mode)?;
    let ema = match opts.ema {
        // A resumed run continues its average; a fresh one starts it at the first weights.
        Some(d) => match &resume {
            Some(r) => Some(Ema::resume(&ema_path(&opts.out), &net, d, r.steps_done)?),
            None => Some(Ema::new(&net, d)?),
        },
        None => None,
    };
    let train_set: Vec<Item> = data
        .iter()
        .enumerate()
        .flat_map(|(d, ds)| {
            ds.split(Some(Split::Train))
                .into_iter()
                .map(move |s| (d, s))
        })
        .collect();
    if train_set.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no training images",
            dirs(data)
        )));
    }
    task.set_message("loading images");
    let images: Vec<Vec<f32>> = train_set
        .iter()
        .map(|&(d, s)| data[d].image(s))
        .collect::<Result<_, _>>()?;
    let mut opt = candle_nn::AdamW::new(
        net.trainable_vars(),
        candle_nn::ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let (mut epochs_done, mut step) = resume
        .as_ref()
        .map_or((0, 0), |s| (s.epochs_done, s.steps_done));
    let steps_per_epoch = train_set.len().div_ceil(opts.batch);
    let total_steps = opts
        .max_steps
        .unwrap_or(usize::MAX)
        .min(steps_per_epoch * opts.epochs);
    task.set_total(total_steps as u64);
    task.set_done(step.min(total_steps) as u64);
    let log_path = sidecar(&opts.out, "metrics.jsonl");
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
            path: dir.into(),
            source,
        })?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| TrainError::Io {
            path: log_path.clone(),
            source,
        })?;
    let started = Instant::now();
    let mut seen = 0usize;
    let mut first_loss: Option<f64> = None;
    let mut last_epoch_loss = f64::NAN;
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    while epochs_done < opts.epochs && step < total_steps {
        let epoch = epochs_done + 1;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(epoch as u64));
        order.sort_unstable();
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        let mut n = 0usize;
        for chunk in order.chunks(opts.batch) {
            if step >= total_steps {
                break;
            }
            if task.is_cancelled() {
                return Err(Cancelled.into());
            }
            let t0 = Instant::now();
            let samples: Vec<Item> = chunk.iter().map(|&i| train_set[i]).collect();
            let flips: Vec<bool> = chunk
                .iter()
                .map(|_| opts.mirror > 0.0 && rng.random_bool(opts.mirror))
                .collect();
            let size = cfg.input_size;
            let imgs: Vec<Vec<f32>> = chunk
                .iter()
                .zip(&flips)
                .map(|(&i, &f)| {
                    if f {
                        mirror_image(&images[i], size)
                    } else {
                        images[i].clone()
                    }
                })
                .collect();
            let x = batch_tensor(&cfg, imgs, opts.denoise, device)?;
            let logits = net.forward(&x, true)?;
            let mut loss = Tensor::zeros((), DType::F32, device)?;
            let (mut seg_v, mut pose_v, mut failures) = (0.0, 0.0, 0);
            if opts.mode.uses_seg() {
                let pts: Vec<_> = samples
                    .iter()
                    .zip(&flips)
                    .map(|((_, s), &f)| {
                        let p = s.points();
                        if f { mirror_points(&p, size) } else { p }
                    })
                    .collect();
                let tgt = heatmap::targets(&pts, cfg.input_size, cfg.target_sigma_px, device)?;
                let seg = heatmap::bce_with_logits_weighted(&logits, &tgt, cfg.pos_weight)?;
                seg_v = seg.to_scalar::<f32>()? as f64;
                loss = (loss + seg)?;
            }
            if opts.mode.uses_pose() {
                let (pl, f) = pose_loss(&logits, &samples, data, cfg.tau)?;
                pose_v = pl.to_scalar::<f32>()? as f64;
                failures = f;
                let w = if opts.mode == Mode::Composite {
                    opts.lambda
                } else {
                    1.0
                };
                loss = (loss + (pl * w)?)?;
            }
            let lv = loss.to_scalar::<f32>()? as f64;
            let reference = *first_loss.get_or_insert(lv);
            if !lv.is_finite() || lv > opts.divergence_factor * reference.max(1e-6) {
                return Err(TrainError::Diverged {
                    epoch,
                    step,
                    loss: lv,
                });
            }
            let lr = learning_rate(opts, step, total_steps);
            opt.set_learning_rate(lr);
            opt.backward_step(&loss)?;
            if let Some(e) = &ema {
                e.update(&net)?;
            }
            step += 1;
            seen += samples.len();
            sum += lv;
            n += 1;
            let m = Metric {
                epoch,
                step,
                loss: lv,
                seg_loss: seg_v,
                pose_loss: pose_v,
                images_per_s: samples.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                registration_failures: failures,
                lr,
            };
            if let Ok(line) = serde_json::to_string(&m) {
                writeln!(log, "{line}").map_err(|source| TrainError::Io {
                    path: log_path.clone(),
                    source,
                })?;
            }
            task.inc(1);
            task.set_message(format!(
                "epoch {epoch} loss {lv:.4} ({:.1} img/s)",
                m.images_per_s
            ));
            on_metric(&m);
        }
        last_epoch_loss = sum / n.max(1) as f64;
        // A run cut short by max_steps still checkpoints what it learned.
        if step >= total_steps && step < steps_per_epoch * epoch {
            epochs_done = epoch - 1;
        } else {
            epochs_done = epoch;
        }
        let mut net_cfg = net.config.clone();
        net_cfg.card = serde_json::json!({
            "training": {
                "mode": opts.mode, "epochs_done": epochs_done, "steps": step,
                "batch": opts.batch, "lr": opts.lr, "cosine": opts.cosine, "lambda": opts.lambda, "seed": opts.seed,
                "mirror": opts.mirror, "widen": opts.widen, "ema": opts.ema, "denoise": opts.denoise,
                "init": opts.init.as_ref().map(|p| p.display().to_string()),
                "data": dirs(data),
                "subjects": data.iter().flat_map(|d| &d.manifest.subjects).filter(|s| !s.held_out).map(|s| s.ct.clone()).collect::<Vec<_>>(),
                "images": train_set.len(), "size": cfg.input_size,
                "realism": data.iter().map(|d| d.manifest.realism).collect::<Vec<_>>(),
                "last_epoch_loss": last_epoch_loss,
            }
        });
        if let Some(e) = &ema {
            // Written before the weights and the state file; a resumed run takes it only when
            // its step count is the state's (`Ema::resume`).
            let mut avg_cfg = net_cfg.clone();
            avg_cfg.card["training"]["averaged"] = serde_json::json!(true);
            save_with_card(e.network(), avg_cfg, &ema_path(&opts.out))?;
        }
        save_with_card(&net, net_cfg, &opts.out)?;
        let st = State {
            epochs_done,
            steps_done: step,
            mode: opts.mode,
        };
        let text = serde_json::to_string(&st).unwrap_or_default();
        crate::io::atomic_write(&state_path, text.as_bytes()).map_err(|source| TrainError::Io {
            path: state_path.clone(),
            source,
        })?;
    }
    Ok(Summary {
        epochs_done,
        steps: step,
        last_epoch_loss,
        images_per_s: seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

/// The datasets' folders, for messages and the model card.
fn dirs(data: &[Dataset]) -> String {
    data.iter()
        .map(|d| d.dir.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Every dataset holds images of the model's input size; the pose loss solves all of a batch
/// with one camera, so its datasets must share it.
fn check_datasets(data: &[Dataset], cfg: &ModelConfig, mode: Mode) -> Result<(), TrainError> {
    let Some(first) = data.first() else {
        return Err(TrainError::Invalid("no dataset to train on".into()));
    };
    for d in data {
        if d.manifest.size != cfg.input_size {
            return Err(TrainError::Invalid(format!(
                "the model takes {0}x{0} images but {1} holds {2}x{2}",
                cfg.input_size,
                d.dir.display(),
                d.manifest.size
            )));
        }
        if mode.uses_pose()
            && let Some(s) = d.manifest.subjects.iter().find(|s| s.all3d().is_none())
        {
            return Err(TrainError::Invalid(format!(
                "the pose loss needs all 8 landmarks in 3D: {} of {} lacks some (train it with \
                 --mode baseline)",
                s.ct,
                d.dir.display()
            )));
        }
        if mode.uses_pose() && d.manifest.camera != first.manifest.camera {
            return Err(TrainError::Invalid(format!(
                "the pose loss needs one camera: {} and {} were rendered with different ones",
                first.dir.display(),
                d.dir.display()
            )));
        }
    }
    Ok(())
}

/// A square `size`² image mirrored left-right.
fn mirror_image(img: &[f32], size: usize) -> Vec<f32> {
    img.chunks(size)
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

/// The landmarks of the mirror image of a `size`-wide image: x -> size - 1 - x (pixel centres
/// at integers), each in its mirror partner's slot.
fn mirror_points(p: &[Option<Point2<f64>>], size: usize) -> Vec<Option<Point2<f64>>> {
    (0..p.len())
        .map(|i| {
            let src = crate::landmarks::MIRROR.get(i).copied().unwrap_or(i);
            p.get(src)
                .copied()
                .flatten()
                .map(|q| Point2::new((size - 1) as f64 - q.x, q.y))
        })
        .collect()
}

/// Saves `net` with `config` as its JSON (keeping the card).
fn save_with_card(net: &UNet, config: ModelConfig, out: &Path) -> Result<(), TrainError> {
    // The weights are the network's; the JSON carries the card. Write both atomically.
    net.save(out)?;
    let json = crate::model::config_path(out);
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| TrainError::Invalid(e.to_string()))?;
    crate::io::atomic_write(&json, text.as_bytes())
        .map_err(|source| TrainError::Io { path: json, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `denoise` a batch is the app's input: a noisy image is smoothed, a clean one is as
    /// the plain normalisation leaves it.
    #[test]
    fn a_denoised_batch_smooths_only_its_noisy_images() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let cfg = ModelConfig {
            input_size: 32,
            ..ModelConfig::default()
        };
        let s = cfg.input_size;
        let clean: Vec<f32> = (0..s * s)
            .map(|i| ((i % s) as f32 / s as f32).powi(2))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let g = Normal::new(0.0f32, 0.05).expect("a valid normal");
        let noisy: Vec<f32> = clean.iter().map(|v| v + g.sample(&mut rng)).collect();
        let rows = |denoise| -> Vec<Vec<f32>> {
            batch_tensor(
                &cfg,
                vec![clean.clone(), noisy.clone()],
                denoise,
                &Device::Cpu,
            )
            .and_then(|t| Ok(t.flatten_from(1)?.to_vec2::<f32>()?))
            .expect("a batch")
        };
        let (plain, smoothed) = (rows(false), rows(true));
        assert_eq!(plain[0], cfg.normalisation.apply(&clean));
        assert_eq!(smoothed[0], plain[0]);
        assert_eq!(plain[1], cfg.normalisation.apply(&noisy));
        let est = |v: &[f32]| crate::model::noise::estimate(v, s, s);
        assert!(
            est(&smoothed[1]) < 0.3 * est(&plain[1]),
            "{} vs {}",
            est(&smoothed[1]),
            est(&plain[1])
        );
    }

    #[test]
    fn a_mirrored_image_keeps_each_landmark_on_its_anatomy() {
        // A 4x4 image with a bright pixel at each landmark: mirroring the image and the
        // landmarks together keeps the pixels bright, in the partner's slot.
        let size = 4;
        let pts: Vec<Option<Point2<f64>>> = (0..8)
            .map(|i| (i != 6).then(|| Point2::new((i % 4) as f64, (i / 4) as f64)))
            .collect();
        let mut img = vec![0.0f32; 16];
        img[0] = 1.0; // landmark 0 at (0, 0)
        let m = mirror_image(&img, size);
        assert_eq!(m[3], 1.0);
        assert_eq!(mirror_image(&m, size), img);
        let mp = mirror_points(&pts, size);
        // L-ASIS (0) at (0, 0) becomes R-ASIS (7) at (3, 0); the absent 6 (R-IOF) becomes an
        // absent L-IOF (1); the symphysis points (3, 4) stay in their slots, mirrored.
        assert_eq!(mp[7], Some(Point2::new(3.0, 0.0)));
        assert_eq!(mp[1], None);
        assert_eq!(mp[3], Some(Point2::new(0.0, 0.0)));
        assert_eq!(mp[4], Some(Point2::new(3.0, 1.0)));
        assert_eq!(mirror_points(&mp, size), pts);
    }

    #[test]
    fn cosine_schedule_decays_from_lr_to_a_hundredth() {
        let mut o = TrainOptions {
            lr: 1e-3,
            ..TrainOptions::default()
        };
        assert_eq!(
            learning_rate(&o, 50, 100),
            1e-3,
            "constant without --cosine"
        );
        o.cosine = true;
        assert!((learning_rate(&o, 0, 100) - 1e-3).abs() < 1e-15);
        assert!((learning_rate(&o, 50, 100) - (1e-3 + 1e-5) / 2.0).abs() < 1e-12);
        assert!((learning_rate(&o, 100, 100) - 1e-5).abs() < 1e-15);
        assert!((learning_rate(&o, 500, 100) - 1e-5).abs() < 1e-15);
        let lrs: Vec<f64> = (0..=100).map(|s| learning_rate(&o, s, 100)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "strictly decreasing");
    }
}
