//! The landmark U-Net (paper section 2.1, after Suh et al.): an X-ray frame in, one heatmap per
//! landmark out; soft-argmax (eqs. 1-2) for training, argmax for evaluation.
//!
//! - [`ModelConfig`]: architecture, input size, τ, intensity normalisation; saved as JSON beside
//!   the safetensors weights and checked when they are loaded.
//! - [`UNet`]: encoder depth, base width configurable; 3x3 conv + batch norm + ReLU blocks,
//!   max-pool down, nearest-neighbour up, skip concatenation, a 1x1 head. Its convolutions run
//!   on the fast CPU kernels of [`conv`]; [`UNet::fused`] folds batch norm into the
//!   convolutions for inference.
//! - [`heatmap`]: targets, BCE, soft-argmax, argmax and confidence.
//! - [`Predictor`]: frame pixels -> 8 landmarks with confidences, the one call the app makes.

pub mod batchnorm;
pub mod conv;
pub mod heatmap;
pub mod noise;
pub mod resample;
pub mod shipped;
pub mod widen;

use crate::landmarks::N_LANDMARKS;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use nalgebra::Point2;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Errors of model construction, loading and inference.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration that cannot describe a network.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON configuration could not be parsed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The weights do not fit the configuration (missing tensors, wrong shapes).
    #[error("{path}: weights do not match the configuration: {message}")]
    Mismatch {
        /// The weights file.
        path: PathBuf,
        /// What does not match.
        message: String,
    },
    /// An input image of the wrong size or with non-finite values.
    #[error("bad input image: {0}")]
    Input(String),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn one() -> f64 {
    1.0
}

/// How frame intensities are mapped to the network's input range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalisation {
    /// Per image: the `lo` and `hi` quantiles map to 0 and 1 (clamped). Robust to the
    /// attenuation model, the detector and the dose.
    Quantile {
        /// Lower quantile, e.g. 0.01.
        lo: f32,
        /// Upper quantile, e.g. 0.99.
        hi: f32,
    },
}

impl Default for Normalisation {
    fn default() -> Self {
        Self::Quantile { lo: 0.01, hi: 0.99 }
    }
}

impl Normalisation {
    /// Applies the mapping (NaN pixels become 0).
    pub fn apply(&self, pixels: &[f32]) -> Vec<f32> {
        let Self::Quantile { lo, hi } = *self;
        let mut v: Vec<f32> = pixels.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return vec![0.0; pixels.len()];
        }
        let q = |f: f32, v: &mut Vec<f32>| {
            let i = ((v.len() - 1) as f32 * f.clamp(0.0, 1.0)).round() as usize;
            *v.select_nth_unstable_by(i, |a, b| a.total_cmp(b)).1
        };
        let a = q(lo, &mut v);
        let b = q(hi, &mut v);
        let scale = if b > a { 1.0 / (b - a) } else { 0.0 };
        pixels
            .iter()
            .map(|x| {
                if x.is_finite() {
                    ((x - a) * scale).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// What a model is and how it was made: saved as `NAME.json` beside `NAME.safetensors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Always "unet".
    pub architecture: String,
    /// Encoder levels (the paper: 5).
    pub depth: usize,
    /// Channels of the first level; level i has `base_channels * 2^i`.
    pub base_channels: usize,
    /// Square input size in pixels (the paper: 512).
    pub input_size: usize,
    /// Number of heatmaps.
    pub n_landmarks: usize,
    /// Soft-argmax temperature τ (eq. 2).
    pub tau: f64,
    /// Standard deviation of the Gaussian target masks, pixels at the input size.
    pub target_sigma_px: f64,
    /// Weight of the positive (mask) term of the BCE (PyTorch's `pos_weight`; 1 = plain BCE).
    #[serde(default = "one")]
    pub pos_weight: f64,
    /// Input intensity mapping.
    #[serde(default)]
    pub normalisation: Normalisation,
    /// Model card: training data, settings and measured metrics (free-form JSON).
    #[serde(default)]
    pub card: serde_json::Value,
}

impl Default for ModelConfig {
    /// A network trained from scratch: 5 levels of 8..128 channels at 256x256 (the shipped
    /// `models/compact`'s architecture; `models/default` is 12..192, widened with
    /// `train --widen`), sized for interactive inference on a laptop CPU (see the model card
    /// for measured speed and accuracy).
    fn default() -> Self {
        Self {
            architecture: "unet".into(),
            depth: 5,
            base_channels: 8,
            input_size: 256,
            n_landmarks: N_LANDMARKS,
            tau: 1.0,
            target_sigma_px: 3.0,
            pos_weight: 100.0,
            normalisation: Normalisation::default(),
            card: serde_json::Value::Null,
        }
    }
}

impl ModelConfig {
    /// Checks that the numbers describe a network this code can build.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.architecture != "unet" {
            return bad(format!("unknown architecture {:?}", self.architecture));
        }
        if !(1..=7).contains(&self.depth) {
            return bad(format!("depth {} not in 1..=7", self.depth));
        }
        if self.base_channels == 0 || self.base_channels > 256 {
            return bad(format!(
                "base_channels {} not in 1..=256",
                self.base_channels
            ));
        }
        let step = 1usize << (self.depth - 1);
        if self.input_size == 0 || !self.input_size.is_multiple_of(step) {
            return bad(format!(
                "input_size {} must be a positive multiple of 2^(depth-1) = {step}",
                self.input_size
            ));
        }
        if self.n_landmarks == 0 {
            return bad("n_landmarks must be positive".into());
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad(format!("tau {} must be positive", self.tau));
        }
        if !(self.target_sigma_px.is_finite() && self.target_sigma_px > 0.0) {
            return bad(format!(
                "target_sigma_px {} must be positive",
                self.target_sigma_px
            ));
        }
        Ok(())
    }

    /// Channels at level `i`.
    pub fn channels(&self, level: usize) -> usize {
        self.base_channels << level
    }

    /// Reads `path` (a `.json`).
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.into(),
            source,
        })?;
        let c: Self = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.into(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }
}

/// Batch norm whose running statistics live in the [`VarMap`], so that checkpoints carry them
/// (candle-nn's `BatchNorm` copies them out of the map and they would be lost on save).
struct Bn {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl Bn {
    fn new(c: usize, vb: VarBuilder, map: &VarMap) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        let var = |n: &str| -> candle_core::Result<Var> {
            let key = format!("{}.{n}", vb.prefix());
            map.data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("variable map poisoned".into()))?
                .get(&key)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("missing {key}")))
        };
        Ok(Self {
            weight,
            bias,
            running_mean: var("running_mean")?,
            running_var: var("running_var")?,
        })
    }

    /// `(scale, shift)` per channel for inference: `y = x * scale + shift`.
    fn affine(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (self.running_var.as_tensor() + BN_EPS)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    /// `relu(batch_norm(x))`: one fused op when training on the CPU.
    fn forward_relu(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let shape = (1, c, 1, 1);
        if !train {
            let (scale, shift) = self.affine()?;
            return x
                .broadcast_mul(&scale.reshape(shape)?)?
                .broadcast_add(&shift.reshape(shape)?)?
                .relu();
        }
        let n = (x.elem_count() / c) as f64;
        let (y, mean, var) = if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = batchnorm::BatchNormTrain::new(BN_EPS, true);
            let y = x
                .contiguous()?
                .apply_op3(&self.weight, &self.bias, op.clone())?;
            let (m, v) = op
                .batch_stats()
                .ok_or_else(|| candle_core::Error::Msg("batch norm: no statistics".into()))?;
            let dev = x.device();
            (
                y,
                Tensor::from_vec(m, c, dev)?,
                Tensor::from_vec(v, c, dev)?,
            )
        } else {
            let (b, _, h, w) = x.dims4()?;
            let stat = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.reshape((b, c, h * w))?
                    .mean_keepdim(2)?
                    .mean_keepdim(0)?
                    .reshape((1, c, 1, 1))
            };
            let mean = stat(x)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = stat(&centred.sqr()?)?;
            let y = centred
                .broadcast_div(&(&var + BN_EPS)?.sqrt()?)?
                .broadcast_mul(&self.weight.reshape(shape)?)?
                .broadcast_add(&self.bias.reshape(shape)?)?
                .relu()?;
            (y, mean.flatten_all()?, var.flatten_all()?)
        };
        // Running statistics (no gradient), unbiased variance as PyTorch keeps it.
        let m = mean.detach();
        let v = (var.detach() * (n / (n - 1.0).max(1.0)))?;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - BN_MOMENTUM))? + (m * BN_MOMENTUM)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - BN_MOMENTUM))? + (v * BN_MOMENTUM)?)?)?;
        Ok(y)
    }
}

/// One 3x3 convolution + batch norm + ReLU: trainable, or folded for inference.
enum ConvUnit {
    Train {
        weight: Tensor,
        bn: Bn,
    },
    Fused {
        weight: Tensor,
        bias: Tensor,
        host: std::sync::Arc<conv::HostKernel>,
    },
}

impl ConvUnit {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Self::Train { weight, bn } => bn.forward_relu(&conv::conv3x3_t(x, weight)?, train),
            Self::Fused { host, .. } if conv::fast_path(x) => x
                .contiguous()?
                .apply_op1_no_bwd(&conv::HostConv(host.clone())),
            Self::Fused { weight, bias, .. } => conv::conv3x3_bias_act(x, weight, bias, true),
        }
    }

    /// `forward(max_pool2d(x, 2))`: one fused pass for an inference unit on the CPU.
    fn forward_pooled(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let Self::Fused { host, .. } = self
            && conv::fast_path(x)
        {
            return x
                .contiguous()?
                .apply_op1_no_bwd(&conv::PoolConv(host.clone()));
        }
        self.forward(&resample::max_pool2(x)?, train)
    }

    /// `forward(concat([upsample(low), skip]))`: one fused pass for an inference unit on the
    /// CPU, the separate ops otherwise.
    fn forward_upcat(
        &self,
        low: &Tensor,
        skip: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        if let Self::Fused { host, .. } = self
            && conv::fast_path(low)
        {
            return low
                .contiguous()?
                .apply_op2_no_bwd(&skip.contiguous()?, &conv::UpCatConv(host.clone()));
        }
        self.forward(&resample::upsample_concat(low, skip)?, train)
    }

    fn fused(&self) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Train { weight, bn } => {
                let (scale, shift) = bn.affine()?;
                let cout = weight.dim(0)?;
                let weight = weight
                    .broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?
                    .detach();
                let bias = shift.detach();
                let host = std::sync::Arc::new(conv::HostKernel::new(
                    weight.flatten_all()?.to_vec1()?,
                    bias.to_vec1()?,
                    true,
                ));
                Self::Fused { weight, bias, host }
            }
            Self::Fused { weight, bias, host } => Self::Fused {
                weight: weight.clone(),
                bias: bias.clone(),
                host: host.clone(),
            },
        })
    }
}

/// The U-Net. Trainable through its [`VarMap`]; [`UNet::fused`] gives the inference network.
pub struct UNet {
    /// Architecture.
    pub config: ModelConfig,
    /// `[encoder level][2]` then `[decoder level][2]`.
    encoder: Vec<[ConvUnit; 2]>,
    decoder: Vec<[ConvUnit; 2]>,
    head_w: Tensor,
    head_b: Tensor,
    /// The parameters (and batch-norm statistics) by name; empty for a fused network.
    pub vars: VarMap,
    device: Device,
}

fn conv_unit(
    cin: usize,
    cout: usize,
    vb: VarBuilder,
    map: &VarMap,
) -> candle_core::Result<ConvUnit> {
    // Drawn from a seeded generator by `UNet::with_seed`.
    let weight = vb.get_with_hints((cout, cin, 3, 3), "conv.weight", Init::Const(0.0))?;
    Ok(ConvUnit::Train {
        weight,
        bn: Bn::new(cout, vb.pp("bn"), map)?,
    })
}

fn block(
    cin: usize,
    cout: usize,
    vb: VarBuilder,
    map: &VarMap,
) -> candle_core::Result<[ConvUnit; 2]> {
    Ok([
        conv_unit(cin, cout, vb.pp("0"), map)?,
        conv_unit(cout, cout, vb.pp("1"), map)?,
    ])
}

impl UNet {
    /// A freshly initialised network (seed 42, as the paper's).
    pub fn new(config: ModelConfig, device: &Device) -> Result<Self, ModelError> {
        Self::with_seed(config, device, 42)
    }

    /// A freshly initialised network; the same seed gives the same weights on every device
    /// (candle's CPU generator cannot be seeded, so the weights are drawn here).
    pub fn with_seed(config: ModelConfig, device: &Device, seed: u64) -> Result<Self, ModelError> {
        let net = Self::unseeded(config, device)?;
        let data = match net.vars.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let mut names: Vec<&String> = data.keys().filter(|k| k.ends_with(".weight")).collect();
        names.sort();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            if dims.len() < 2 {
                continue; // batch-norm scales stay 1
            }
            // Kaiming-normal for ReLU (fan_in = cin * kh * kw), as PyTorch U-Nets are usually
            // initialised; the 1x1 head gets unit gain.
            let fan_in: usize = dims[1..].iter().product();
            let gain = if name.starts_with("head") { 1.0 } else { 2.0 };
            let normal = rand_distr::Normal::new(0.0f32, (gain / fan_in as f64).sqrt() as f32)
                .map_err(|e| ModelError::Config(e.to_string()))?;
            let v: Vec<f32> = (0..var.elem_count()).map(|_| rng.sample(normal)).collect();
            var.set(&Tensor::from_vec(v, dims, device)?)?;
        }
        drop(data);
        Ok(net)
    }

    fn unseeded(config: ModelConfig, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
        let d = config.depth;
        let mut encoder = Vec::with_capacity(d);
        for i in 0..d {
            let cin = if i == 0 { 1 } else { config.channels(i - 1) };
            encoder.push(block(
                cin,
                config.channels(i),
                vb.pp(format!("enc{i}")),
                &vars,
            )?);
        }
        let mut decoder = Vec::with_capacity(d.saturating_sub(1));
        for j in 0..d - 1 {
            let cin = config.channels(j + 1) + config.channels(j);
            decoder.push(block(
                cin,
                config.channels(j),
                vb.pp(format!("dec{j}")),
                &vars,
            )?);
        }
        let c0 = config.channels(0);
        let head_w =
            vb.get_with_hints((config.n_landmarks, c0), "head.weight", Init::Const(0.0))?;
        // Start the heatmaps at a low probability everywhere (sigmoid(-4) ~ 0.018) so that BCE
        // on sparse masks does not spend its first epoch learning the background.
        let head_b = vb.get_with_hints(config.n_landmarks, "head.bias", Init::Const(-4.0))?;
        Ok(Self {
            config,
            encoder,
            decoder,
            head_w,
            head_b,
            vars,
            device: device.clone(),
        })
    }

    /// A copy with variables of its own (the same weights and statistics, the same card):
    /// training one leaves the other as it was.
    pub fn duplicate(&self) -> Result<UNet, ModelError> {
        let copy = Self::unseeded(self.config.clone(), &self.device)?;
        let src = self.tensors();
        copy.set_vars(|name, _| {
            src.get(name).cloned().ok_or_else(|| {
                ModelError::Config(format!("{name} is missing from the network to copy"))
            })
        })?;
        Ok(copy)
    }

    /// Sets every variable, batch-norm statistics included, to what `value` makes of its name
    /// and current value, under one lock of the variable map (values are copied in).
    pub(crate) fn set_vars<E: From<candle_core::Error>>(
        &self,
        mut value: impl FnMut(&str, &Var) -> Result<Tensor, E>,
    ) -> Result<(), E> {
        let data = match self.vars.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        for (name, var) in data.iter() {
            let t = value(name, var)?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The device the network lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Heatmap logits `(B, N, S, S)` for input `(B, 1, S, S)`; `train` uses batch statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut skips = Vec::with_capacity(self.encoder.len());
        let mut h = x.clone();
        for (i, [a, b]) in self.encoder.iter().enumerate() {
            let first = if i > 0 {
                a.forward_pooled(&h, train)?
            } else {
                a.forward(&h, train)?
            };
            h = b.forward(&first, train)?;
            skips.push(h.clone());
        }
        for (j, [a, b]) in self.decoder.iter().enumerate().rev() {
            h = b.forward(&a.forward_upcat(&h, &skips[j], train)?, train)?;
        }
        // 1x1 head as one GEMM: (N, C) x (B, C, HW).
        let (bsz, c, hh, ww) = h.dims4()?;
        let flat = h.reshape((bsz, c, hh * ww))?;
        let out = self
            .head_w
            .broadcast_left(bsz)?
            .matmul(&flat)?
            .broadcast_add(&self.head_b.reshape((1, self.config.n_landmarks, 1))?)?;
        out.reshape((bsz, self.config.n_landmarks, hh, ww))
    }

    /// Heatmap logits of `x` averaged over the [`Views`] of each image (test-time
    /// augmentation): all views in one batch through [`Self::forward`], each mapped back to the
    /// image ([`heatmap::unmirror`], [`heatmap::unshift`], [`heatmap::unzoom`]) before the logits
    /// are averaged.
    pub fn forward_views(&self, x: &Tensor, views: &Views) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let s = views.shift_px as isize;
        let shifts: &[isize] = if s > 0 { &[s, -s] } else { &[] };
        let mut batch = vec![x.clone()];
        if views.mirror {
            batch.push(heatmap::flip_x(x)?);
        }
        for &d in shifts {
            batch.push(heatmap::shift(x, d, d)?);
        }
        let zooms = views.zooms();
        for &z in &zooms {
            batch.push(heatmap::zoom(x, z)?);
        }
        if batch.len() == 1 {
            return self.forward(x, false);
        }
        let n = batch.len();
        let out = self.forward(&Tensor::cat(&batch, 0)?, false)?;
        let view = |k: usize| out.narrow(0, k * b, b);
        let plain = view(0)?;
        let mut sum = plain.clone();
        let mut k = 1;
        if views.mirror {
            sum = (sum + heatmap::unmirror(&view(k)?)?)?;
            k += 1;
        }
        for &d in shifts {
            sum = (sum + heatmap::unshift(&view(k)?, &plain, d, d)?)?;
            k += 1;
        }
        for &z in &zooms {
            sum = (sum + heatmap::unzoom(&view(k)?, &plain, z)?)?;
            k += 1;
        }
        sum.affine(1.0 / n as f64, 0.0)
    }

    /// The inference network: batch norm folded into each convolution, bias and ReLU fused.
    pub fn fused(&self) -> Result<UNet, ModelError> {
        let fuse = |v: &Vec<[ConvUnit; 2]>| -> candle_core::Result<Vec<[ConvUnit; 2]>> {
            v.iter()
                .map(|[a, b]| Ok([a.fused()?, b.fused()?]))
                .collect()
        };
        Ok(UNet {
            config: self.config.clone(),
            encoder: fuse(&self.encoder)?,
            decoder: fuse(&self.decoder)?,
            head_w: self.head_w.detach(),
            head_b: self.head_b.detach(),
            vars: VarMap::new(),
            device: self.device.clone(),
        })
    }

    /// The trainable variables (batch-norm running statistics excluded).
    pub fn trainable_vars(&self) -> Vec<Var> {
        let data = match self.vars.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let mut named: Vec<(&String, &Var)> = data
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.trainable_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// All tensors by name, for saving.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let data = match self.vars.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Writes `PATH.safetensors` and `PATH.json` (atomically: a crash leaves the old files).
    pub fn save(&self, weights: &Path) -> Result<(), ModelError> {
        let tensors = self.tensors();
        if tensors.is_empty() {
            return Err(ModelError::Config(
                "a fused network has no variables to save; save the trainable one".into(),
            ));
        }
        if let Some(dir) = weights.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
                path: dir.into(),
                source,
            })?;
        }
        crate::io::atomic_write_with(weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(std::io::Error::other)
        })
        .map_err(|source| ModelError::Io {
            path: weights.into(),
            source,
        })?;
        let json = config_path(weights);
        let text =
            serde_json::to_string_pretty(&self.config).map_err(|source| ModelError::Json {
                path: json.clone(),
                source,
            })?;
        crate::io::atomic_write(&json, text.as_bytes())
            .map_err(|source| ModelError::Io { path: json, source })
    }

    /// Loads `PATH.safetensors` with its `PATH.json`; every tensor must be present with the
    /// configured shape.
    pub fn load(weights: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = ModelConfig::read(&config_path(weights))?;
        Self::load_with(weights, config, device)
    }

    /// Loads weights into a network built from `config`.
    pub fn load_with(
        weights: &Path,
        config: ModelConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let bytes = std::fs::read(weights).map_err(|source| ModelError::Io {
            path: weights.into(),
            source,
        })?;
        Self::from_bytes(&bytes, config, device, weights)
    }

    /// Builds a network from safetensors bytes (`origin` names them in errors).
    pub fn from_bytes(
        bytes: &[u8],
        config: ModelConfig,
        device: &Device,
        origin: &Path,
    ) -> Result<Self, ModelError> {
        let weights = origin;
        let loaded = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
            ModelError::Mismatch {
                path: weights.into(),
                message: format!("not a safetensors file: {e}"),
            }
        })?;
        let net = Self::unseeded(config, device)?;
        let data = match net.vars.data().lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        for (name, var) in data.iter() {
            let t = loaded.get(name).ok_or_else(|| ModelError::Mismatch {
                path: weights.into(),
                message: format!("tensor {name} is missing"),
            })?;
            if t.dims() != var.dims() {
                return Err(ModelError::Mismatch {
                    path: weights.into(),
                    message: format!("{name} has shape {:?}, expected {:?}", t.dims(), var.dims()),
                });
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = loaded.keys().find(|k| !data.contains_key(*k)) {
            return Err(ModelError::Mismatch {
                path: weights.into(),
                message: format!("unexpected tensor {extra} (a different architecture?)"),
            });
        }
        drop(data);
        Ok(net)
    }
}

/// `models/x.safetensors` -> `models/x.json`.
pub fn config_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// One detected landmark.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Position in the frame's pixels (x right, y down).
    pub point: Point2<f64>,
    /// Peak probability of its heatmap, 0..1.
    pub confidence: f64,
    /// No peak of the heatmap agreed with the pose: the point is the CT landmark's
    /// reprojection (pose-consistent decoding), not the network's.
    #[serde(default)]
    pub reprojected: bool,
}

/// The device the model runs on: the first CUDA GPU in a build with the `cuda` feature when one
/// answers, else the CPU (with the fast kernels of [`conv`]). The app, training and the CLI all
/// take it from here, so a CUDA build uses its GPU everywhere.
/// Made once per process: every CUDA `Device` is its own context and stream, and tensors of two
/// of them cannot meet.
pub fn default_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                match Device::new_cuda(0) {
                    Ok(d) => return d,
                    Err(e) => log::warn!("no CUDA device ({e}); the model runs on the CPU"),
                }
            }
            Device::Cpu
        })
        .clone()
}

/// A short name of `device` for status bars and benchmark records.
pub fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

/// The views of a frame whose heatmaps are averaged at inference (test-time augmentation,
/// [`UNet::forward_views`]); the frame itself is always one. Each view is one more image in the
/// network's batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Views {
    /// The mirror image, its left and right landmarks swapped back: the pelvis is bilaterally
    /// symmetric, so it is another plausible pelvis and the network's second opinion.
    pub mirror: bool,
    /// The frame moved this many model-input pixels down-right, and as many up-left (0: not).
    /// The network is not shift-equivariant (four 2x max-pools, and zero padding that tells it
    /// where the border is), so a moved frame is a third and fourth opinion that errs
    /// elsewhere; the edge repeats into the strip uncovered.
    pub shift_px: usize,
    /// The frame magnified by this many percent about its centre, and shrunk by as much
    /// (0: not). The pelvis' apparent size is what a single view's depth is read from, so two
    /// more opinions on it at other scales may err differently; shrunk, the margin repeats the
    /// edge.
    #[serde(default)]
    pub zoom_pct: usize,
    /// Smooth a frame noisier than the training data before the network reads it
    /// ([`noise::smoothing_px`]); frames as clean as the training data are read as they are.
    #[serde(default)]
    pub denoise: bool,
}

impl Views {
    /// The frame alone.
    pub const PLAIN: Self = Self {
        mirror: false,
        shift_px: 0,
        zoom_pct: 0,
        denoise: false,
    };
    /// The frame and its mirror image. A network that has learnt the anatomy gives both the
    /// same answer; where it is unsure (an ASIS on the crest, a peak near the border), the two
    /// disagree and their average is steadier.
    pub const MIRROR: Self = Self {
        mirror: true,
        shift_px: 0,
        zoom_pct: 0,
        denoise: false,
    };
    /// The shift of [`Self::recommended`], model-input pixels: not a multiple of the 16 px
    /// the max-pools step in, and small against the pelvis (see the model card for 8 and 16).
    pub const SHIFT_PX: usize = 12;

    /// What the app and `predict` read: the frame, its mirror image and the frame moved
    /// [`Self::SHIFT_PX`] both ways (four images per frame), smoothed first when noisy.
    pub fn recommended() -> Self {
        Self {
            mirror: true,
            shift_px: Self::SHIFT_PX,
            zoom_pct: 0,
            denoise: true,
        }
    }

    /// Whether a live stream reads the moved views by default with the network on `device`:
    /// on a GPU, or with 4 or more CPU threads. On 2 CPU cores the 4-image batch takes 49-62 ms
    /// against 26-34 ms for the frame and its mirror image (`fluoropose bench model`), and the
    /// Live tab at a 10 fps clock falls from 8.9 to 7.0 fps.
    pub fn shifts_fit_live(device: &Device) -> bool {
        device.is_cuda() || device.is_metal() || rayon::current_num_threads() >= 4
    }

    /// For reports: "mirror-averaged", "shift-averaged (12 px)", both, "zoom-averaged (8%)"
    /// beside, or "" for the frame alone; ", smoothed when noisy" after with [`Self::denoise`].
    pub fn describe(&self) -> String {
        let mut names = Vec::new();
        let mut params = Vec::new();
        if self.mirror {
            names.push("mirror");
        }
        if self.shift_px > 0 {
            names.push("shift");
            params.push(format!("{} px", self.shift_px));
        }
        if self.zoom_pct > 0 {
            names.push("zoom");
            params.push(format!("{}%", self.zoom_pct));
        }
        let params = if params.is_empty() {
            String::new()
        } else {
            format!(" ({})", params.join(", "))
        };
        let averaged = match names.as_slice() {
            [] => String::new(),
            [one] => format!("{one}-averaged{params}"),
            [init @ .., last] => format!("{}- and {last}-averaged{params}", init.join("-, ")),
        };
        match (self.denoise, averaged.is_empty()) {
            (false, _) => averaged,
            (true, true) => "smoothed when noisy".into(),
            (true, false) => format!("{averaged}, smoothed when noisy"),
        }
    }

    /// The magnifications of the zoomed views, `1 + zoom_pct / 100` and its inverse (none
    /// without a zoom).
    pub fn zooms(&self) -> Vec<f64> {
        if self.zoom_pct == 0 {
            return Vec::new();
        }
        let z = 1.0 + self.zoom_pct as f64 / 100.0;
        vec![z, 1.0 / z]
    }
}

/// Frame pixels -> landmarks: resize to the model input, normalise, run the fused network,
/// read the heatmaps with sub-pixel argmax, and map back to frame pixels.
pub struct Predictor {
    net: UNet,
    /// The model's configuration (input size, τ, card).
    pub config: ModelConfig,
}

impl Predictor {
    /// Wraps a trained network (fusing it).
    pub fn new(net: &UNet) -> Result<Self, ModelError> {
        Ok(Self {
            config: net.config.clone(),
            net: net.fused()?,
        })
    }

    /// Loads `weights` (+ its JSON) for inference.
    pub fn load(weights: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::new(&UNet::load(weights, device)?)
    }

    /// The model's input tensor `(1, 1, S, S)` for a `width x height` frame.
    pub fn input(&self, pixels: &[f32], width: usize, height: usize) -> Result<Tensor, ModelError> {
        let (norm, _) = self.prepare(pixels, width, height, false)?;
        let s = self.config.input_size;
        Ok(Tensor::from_vec(norm, (1, 1, s, s), self.net.device())?)
    }

    /// The network's input for a frame, `S x S` row-major, and how noisy it is; with `denoise`
    /// a frame noisier than the training data is blurred first ([`noise::smoothing_px`]) and
    /// normalised again (the blur narrows the range that noise had widened).
    pub fn prepare(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
        denoise: bool,
    ) -> Result<(Vec<f32>, noise::InputNoise), ModelError> {
        if width == 0 || height == 0 || pixels.len() != width * height {
            return Err(ModelError::Input(format!(
                "{} pixels for a {width}x{height} frame",
                pixels.len()
            )));
        }
        let s = self.config.input_size;
        let resized = resize_bilinear(pixels, width, height, s, s);
        Ok(normalised_input(
            &self.config.normalisation,
            resized,
            s,
            denoise,
        ))
    }

    /// Heatmap logits `(N, S, S)` for a frame.
    pub fn heatmaps(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
    ) -> Result<Tensor, ModelError> {
        Ok(self.heatmaps_with(pixels, width, height, &Views::PLAIN)?.0)
    }

    /// Heatmap logits `(N, S, S)` for a frame, averaged over `views`
    /// ([`UNet::forward_views`]), and how noisy the frame was to the network (the reading that
    /// [`Self::prepare`] made anyway: callers report it rather than measure it again).
    pub fn heatmaps_with(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
        views: &Views,
    ) -> Result<(Tensor, noise::InputNoise), ModelError> {
        let (norm, report) = self.prepare(pixels, width, height, views.denoise)?;
        let s = self.config.input_size;
        let x = Tensor::from_vec(norm, (1, 1, s, s), self.net.device())?;
        Ok((self.net.forward_views(&x, views)?.squeeze(0)?, report))
    }

    /// A point of the model's input grid in the pixels of a `width x height` frame.
    pub fn to_frame(&self, p: Point2<f64>, width: usize, height: usize) -> Point2<f64> {
        let s = self.config.input_size as f64;
        let (sx, sy) = (width as f64 / s, height as f64 / s);
        // Pixel centres: input pixel i covers frame [i sx, (i+1) sx).
        Point2::new((p.x + 0.5) * sx - 0.5, (p.y + 0.5) * sy - 0.5)
    }

    /// The landmarks of a frame, in its own pixel coordinates.
    pub fn predict(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
    ) -> Result<Vec<Detection>, ModelError> {
        Ok(self.predict_with(pixels, width, height, &Views::PLAIN)?.0)
    }

    /// [`Self::predict`], from heatmaps averaged over `views`, and the frame's noise reading.
    pub fn predict_with(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
        views: &Views,
    ) -> Result<(Vec<Detection>, noise::InputNoise), ModelError> {
        let (logits, report) = self.heatmaps_with(pixels, width, height, views)?;
        let peaks = heatmap::argmax_subpixel(&logits)?;
        let detections = peaks
            .into_iter()
            .map(|(p, c)| Detection {
                point: self.to_frame(p, width, height),
                confidence: c,
                reprojected: false,
            })
            .collect();
        Ok((detections, report))
    }

    /// The peaks of each heatmap ([`heatmap::candidates`]; separation in input pixels), in
    /// frame pixels, and the frame's noise reading.
    pub fn candidates(
        &self,
        pixels: &[f32],
        width: usize,
        height: usize,
        views: &Views,
        search: &heatmap::PeakSearch,
    ) -> Result<(Vec<heatmap::Peaks>, noise::InputNoise), ModelError> {
        let (logits, report) = self.heatmaps_with(pixels, width, height, views)?;
        let peaks = heatmap::candidates(&logits, search)?
            .into_iter()
            .map(|c| {
                c.into_iter()
                    .map(|(p, conf)| (self.to_frame(p, width, height), conf))
                    .collect()
            })
            .collect();
        Ok((peaks, report))
    }
}

/// The network's input from an `s x s` image already at its input size: normalised, and with
/// `denoise` blurred first when noisier than the training data ([`noise::smoothing_px`]) and
/// normalised again (noise widens the quantile range; the blurred frame's own is the one the
/// network learnt). Returns the input and how noisy the image was.
pub fn normalised_input(
    normalisation: &Normalisation,
    mut img: Vec<f32>,
    s: usize,
    denoise: bool,
) -> (Vec<f32>, noise::InputNoise) {
    let norm = normalisation.apply(&img);
    let level = noise::level(&norm, s, s);
    let sigma = if denoise {
        noise::smoothing_px(level)
    } else {
        0.0
    };
    let report = noise::InputNoise {
        noise: level,
        smoothed_px: sigma,
    };
    if sigma <= 0.0 {
        return (norm, report);
    }
    noise::gaussian_blur(&mut img, s, s, sigma as f64);
    (normalisation.apply(&img), report)
}

/// Bilinear resampling with pixel-centre alignment (as `align_corners=False`), area-averaged
/// first when shrinking by 2x or more so that noise and thin edges do not alias.
pub fn resize_bilinear(src: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    if w == ow && h == oh {
        return src.to_vec();
    }
    if w >= 2 * ow && h >= 2 * oh && w.is_multiple_of(2) && h.is_multiple_of(2) {
        let (hw, hh) = (w / 2, h / 2);
        let mut half = vec![0.0f32; hw * hh];
        for y in 0..hh {
            for x in 0..hw {
                let i = 2 * y * w + 2 * x;
                half[y * hw + x] = 0.25 * (src[i] + src[i + 1] + src[i + w] + src[i + w + 1]);
            }
        }
        return resize_bilinear(&half, hw, hh, ow, oh);
    }
    let mut out = vec![0.0f32; ow * oh];
    let (fx, fy) = (w as f32 / ow as f32, h as f32 / oh as f32);
    for y in 0..oh {
        let sy = ((y as f32 + 0.5) * fy - 0.5).clamp(0.0, (h - 1) as f32);
        let y0 = sy.floor() as usize;
        let y1 = (y0 + 1).min(h - 1);
        let ty = sy - y0 as f32;
        for x in 0..ow {
            let sx = ((x as f32 + 0.5) * fx - 0.5).clamp(0.0, (w - 1) as f32);
            let x0 = sx.floor() as usize;
            let x1 = (x0 + 1).min(w - 1);
            let tx = sx - x0 as f32;
            let a = src[y0 * w + x0] * (1.0 - tx) + src[y0 * w + x1] * tx;
            let b = src[y1 * w + x0] * (1.0 - tx) + src[y1 * w + x1] * tx;
            out[y * ow + x] = a * (1.0 - ty) + b * ty;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            depth: 3,
            base_channels: 4,
            input_size: 32,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn shapes_and_fused_equals_eval() {
        let dev = Device::Cpu;
        let net = UNet::new(tiny(), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &dev).unwrap();
        // A training step's worth of batch statistics, so that folding has something to fold.
        for _ in 0..3 {
            net.forward(&x, true).unwrap();
        }
        let eval = net.forward(&x, false).unwrap();
        assert_eq!(eval.dims(), &[2, 8, 32, 32]);
        let fused = net.fused().unwrap().forward(&x, false).unwrap();
        let d = (eval - fused).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    }

    /// The largest absolute difference between two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn mirror_averaged_heatmaps_follow_a_mirrored_image() {
        // M(x) = (f(x) + U(f(F x))) / 2 with U = mirror back + swap left/right, an involution:
        // so M(F x) = U(M(x)) for any network. A plain forward of a random network does not.
        let dev = Device::Cpu;
        let net = UNet::with_seed(tiny(), &dev, 7).unwrap().fused().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &dev).unwrap();
        let fx = heatmap::flip_x(&x).unwrap();
        let m = net.forward_views(&x, &Views::MIRROR).unwrap();
        assert_eq!(m.dims(), &[2, 8, 32, 32]);
        let a = net.forward_views(&fx, &Views::MIRROR).unwrap();
        let b = heatmap::unmirror(&m).unwrap();
        assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
        let plain_a = net.forward(&fx, false).unwrap();
        let plain_b = heatmap::unmirror(&net.forward(&x, false).unwrap()).unwrap();
        assert!(max_diff(&plain_a, &plain_b) > 1e-3);
    }

    #[test]
    fn zoomed_views_are_averaged_each_mapped_back_and_described() {
        let dev = Device::Cpu;
        let net = UNet::with_seed(tiny(), &dev, 7).unwrap().fused().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &dev).unwrap();
        let views = Views {
            zoom_pct: 10,
            ..Views::PLAIN
        };
        assert_eq!(views.zooms().len(), 2);
        let got = net.forward_views(&x, &views).unwrap();
        // Each view on its own, through the same network, mapped back by hand.
        let plain = net.forward(&x, false).unwrap();
        let mut want = plain.clone();
        for z in [1.1, 1.0 / 1.1] {
            let v = net.forward(&heatmap::zoom(&x, z).unwrap(), false).unwrap();
            want = (want + heatmap::unzoom(&v, &plain, z).unwrap()).unwrap();
        }
        let want = want.affine(1.0 / 3.0, 0.0).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{diff}");
        assert!(
            max_diff(&got, &plain) > 1e-3,
            "the zoomed views changed nothing"
        );
        assert_eq!(views.describe(), "zoom-averaged (10%)");
        assert_eq!(Views::PLAIN.describe(), "");
        assert_eq!(Views::MIRROR.describe(), "mirror-averaged");
        assert_eq!(
            Views::recommended().describe(),
            "mirror- and shift-averaged (12 px), smoothed when noisy"
        );
        assert_eq!(
            Views {
                denoise: true,
                ..Views::PLAIN
            }
            .describe(),
            "smoothed when noisy"
        );
        assert_eq!(
            Views {
                zoom_pct: 8,
                denoise: false,
                ..Views::recommended()
            }
            .describe(),
            "mirror-, shift- and zoom-averaged (12 px, 8%)"
        );
    }

    #[test]
    fn config_is_validated() {
        let mut c = tiny();
        c.input_size = 30;
        assert!(c.validate().is_err());
        c = tiny();
        c.tau = 0.0;
        assert!(c.validate().is_err());
        assert!(tiny().validate().is_ok());
    }

    #[test]
    fn save_load_round_trip_is_exact_and_mismatch_is_reported() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let net = UNet::new(tiny(), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 1, 32, 32), &dev).unwrap();
        net.forward(&x, true).unwrap();
        net.save(&path).unwrap();
        let back = UNet::load(&path, &dev).unwrap();
        let a = net
            .forward(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = back
            .forward(&x, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // The same weights under a different architecture are refused with a reason.
        let other = ModelConfig {
            base_channels: 8,
            ..tiny()
        };
        let e = UNet::load_with(&path, other, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("shape"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(UNet::load(&path, &dev).is_err());
    }

    #[test]
    fn only_an_input_noisier_than_the_training_data_is_smoothed() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let s = 64;
        let clean: Vec<f32> = (0..s * s)
            .map(|i| ((i % s) as f32 / s as f32).powi(2) + if i / s > s / 2 { 0.5 } else { 0.0 })
            .collect();
        let n = Normalisation::default();
        let (a, r) = normalised_input(&n, clean.clone(), s, true);
        assert_eq!(a, n.apply(&clean));
        assert_eq!(r.smoothed_px, 0.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let g = Normal::new(0.0f32, 0.05).unwrap();
        let noisy: Vec<f32> = clean.iter().map(|v| v + g.sample(&mut rng)).collect();
        let (raw, r0) = normalised_input(&n, noisy.clone(), s, false);
        let (smooth, r1) = normalised_input(&n, noisy, s, true);
        assert_eq!(r0.noise, r1.noise);
        assert!(r0.noise > noise::SMOOTH_FULL_AT, "{}", r0.noise);
        assert_eq!(
            (r0.smoothed_px, r1.smoothed_px),
            (0.0, noise::SMOOTH_MAX_PX)
        );
        assert!(noise::estimate(&smooth, s, s) < 0.2 * noise::estimate(&raw, s, s));
        // Normalised again after the blur: still spans the range.
        let max = smooth.iter().copied().fold(0.0f32, f32::max);
        assert!(max > 0.99, "{max}");
    }

    #[test]
    fn normalisation_maps_quantiles() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32).chain([f32::NAN]).collect();
        let n = Normalisation::default().apply(&v);
        assert_eq!(n[0], 0.0);
        assert_eq!(n[999], 1.0);
        assert!((n[500] - 0.5).abs() < 0.01);
        assert_eq!(n[1000], 0.0);
    }

    #[test]
    fn predictor_rejects_wrong_sizes() {
        let net = UNet::new(tiny(), &Device::Cpu).unwrap();
        let p = Predictor::new(&net).unwrap();
        assert!(p.predict(&[0.0; 10], 4, 4).is_err());
        assert_eq!(p.predict(&vec![0.5; 64 * 48], 64, 48).unwrap().len(), 8);
    }

    #[test]
    fn resize_keeps_constant_and_centres() {
        let src = vec![3.0f32; 20 * 10];
        assert!(
            resize_bilinear(&src, 20, 10, 7, 5)
                .iter()
                .all(|v| (v - 3.0).abs() < 1e-6)
        );
        // A ramp stays a ramp under 2x shrink (area) and bilinear resampling.
        let ramp: Vec<f32> = (0..64 * 64).map(|i| (i % 64) as f32).collect();
        let r = resize_bilinear(&ramp, 64, 64, 32, 32);
        assert!((r[0] - 0.5).abs() < 1e-5 && (r[31] - 62.5).abs() < 1e-5);
    }
}
