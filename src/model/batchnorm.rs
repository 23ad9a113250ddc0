//! Training-mode batch norm (optionally with the ReLU after it) as one fused CPU op, forward
//! and backward.
//!
//! Written with candle's broadcast ops, batch norm's backward reduces (B, C, H, W) gradients over
//! the strided axes (0, 2, 3) four times per layer, and candle's strided reductions were 28% of
//! a training step (perf, `bench model`); candle's ReLU then adds a pass forward and five
//! backward (a zero tensor, a comparison, a cast, a product, a sum). Here every channel is one
//! pass over its contiguous `H*W` runs, channels in parallel:
//! `x̂ = (x − μ)/σ`, `y = max(0, γ x̂ + β)`; with `g = dy · [y > 0]`: `dβ = Σ g`, `dγ = Σ g x̂`,
//! `dx = γ/σ (g − mean(g) − x̂ mean(g x̂))`.

use super::conv::with_host_f32;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `Σ f(i)` over one contiguous run of `len` values, in 16 f32 lanes that vectorise, gathered
/// in f64 every block so that long runs keep f64-like accuracy.
#[inline(always)]
fn lane_sum(len: usize, f: impl Fn(usize) -> f32) -> f64 {
    const BLOCK: usize = 1024;
    let mut total = 0.0f64;
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let mut lanes = [0.0f32; 16];
        let mut i = start;
        while i + 16 <= end {
            for (k, l) in lanes.iter_mut().enumerate() {
                *l += f(i + k);
            }
            i += 16;
        }
        for j in i..end {
            lanes[0] += f(j);
        }
        total += lanes.iter().map(|v| *v as f64).sum::<f64>();
        start = end;
    }
    total
}

/// `Σ a`.
fn sum(a: &[f32]) -> f64 {
    lane_sum(a.len(), |i| a[i])
}

/// `Σ a (b − off)`: with `off` the mean, no cancellation however far the mean is from zero.
fn dot_centred(a: &[f32], b: &[f32], off: f32) -> f64 {
    let b = &b[..a.len()];
    lane_sum(a.len(), |i| a[i] * (b[i] - off))
}

/// Per-channel batch mean and biased variance of NCHW data (two passes: the mean, then the
/// squares about it).
fn stats(x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let rows = || (0..b).map(|i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw]);
            let n = (b * hw) as f64;
            let m = (rows().map(sum).sum::<f64>() / n) as f32;
            let v = rows()
                .map(|r| lane_sum(r.len(), |i| (r[i] - m) * (r[i] - m)))
                .sum::<f64>()
                / n;
            (m, v.max(0.0) as f32)
        })
        .unzip()
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.shape().dims() {
        &[b, c, h, w] => Ok((b, c, h * w)),
        d => Err(candle_core::Error::Msg(format!(
            "batch norm: expected NCHW, got {d:?}"
        ))),
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    super::conv::cpu_f32(s, l, "batch norm", "input")
}

/// Per-channel (mean, biased variance) of one batch.
pub type BatchStats = (Vec<f32>, Vec<f32>);

/// `(x, gamma, beta) -> gamma (x - mean) / sqrt(var + eps) + beta` with batch statistics
/// (then `max(0, ·)` when `relu`), which it leaves in `stats` for the running averages and
/// for its own backward pass.
#[derive(Clone)]
pub struct BatchNormTrain {
    /// Variance epsilon.
    pub eps: f64,
    /// Apply ReLU to the output.
    pub relu: bool,
    /// The batch's (mean, biased variance) per channel, written by the forward pass.
    pub stats: Arc<Mutex<Option<BatchStats>>>,
}

impl BatchNormTrain {
    /// A batch norm (with ReLU when `relu`) that has not run yet.
    pub fn new(eps: f64, relu: bool) -> Self {
        Self {
            eps,
            relu,
            stats: Default::default(),
        }
    }

    /// The statistics of the last forward pass.
    pub fn batch_stats(&self) -> Option<BatchStats> {
        self.stats.lock().ok().and_then(|s| s.clone())
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        if self.relu {
            "batch-norm-relu-train"
        } else {
            "batch-norm-train"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(l1)?;
        let (x, g, be) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if g.len() != c || be.len() != c {
            return Err(candle_core::Error::Msg(
                "batch norm: gamma/beta size".into(),
            ));
        }
        let (mean, var) = stats(x, b, c, hw);
        let mut y = vec![0.0f32; x.len()];
        let relu = self.relu;
        y.par_chunks_mut(hw).enumerate().for_each(|(row, out)| {
            let ch = row % c;
            let inv = 1.0 / (var[ch] as f64 + self.eps).sqrt() as f32;
            let (scale, shift) = (g[ch] * inv, be[ch] - g[ch] * inv * mean[ch]);
            let src = &x[row * hw..(row + 1) * hw];
            if relu {
                for (o, v) in out.iter_mut().zip(src) {
                    *o = (v * scale + shift).max(0.0);
                }
            } else {
                for (o, v) in out.iter_mut().zip(src) {
                    *o = v * scale + shift;
                }
            }
        });
        if let Ok(mut s) = self.stats.lock() {
            *s = Some((mean, var));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let gam = gamma.to_vec1::<f32>()?;
        let n = (b * hw) as f64;
        let (dx, sums) = with_host_f32(
            [x, grad, res],
            "batch norm",
            ["input", "gradient", "output"],
            |[xv, gv, yv]| {
                let (mean, var) = self.batch_stats().unwrap_or_else(|| stats(xv, b, c, hw));
                self.backward(xv, gv, yv, (b, c, hw), (&mean, &var), &gam, n)
            },
        )?;
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, c, dev)?),
            Some(Tensor::from_vec(dbeta, c, dev)?),
        ))
    }
}

impl BatchNormTrain {
    /// `dx` and per channel `(Σ g, Σ g x̂)`, with `g` the output gradient masked by the ReLU.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        xv: &[f32],
        gv: &[f32],
        yv: &[f32],
        (b, c, hw): (usize, usize, usize),
        (mean, var): (&[f32], &[f32]),
        gam: &[f32],
        n: f64,
    ) -> (Vec<f32>, Vec<(f64, f64)>) {
        let relu = self.relu;
        // The gradient that reaches the batch norm's output: zero where the ReLU clipped.
        let masked = |row: usize, buf: &mut Vec<f32>| {
            let r = row * hw..(row + 1) * hw;
            buf.clear();
            if relu {
                buf.extend(
                    gv[r.clone()]
                        .iter()
                        .zip(&yv[r])
                        .map(|(g, y)| if *y > 0.0 { *g } else { 0.0 }),
                );
            } else {
                buf.extend_from_slice(&gv[r]);
            }
        };
        // Per channel Σ g and Σ g x̂.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map_init(Vec::new, |buf, ch| {
                let inv = 1.0 / (var[ch] as f64 + self.eps).sqrt();
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for i in 0..b {
                    let row = i * c + ch;
                    masked(row, buf);
                    sg += sum(buf);
                    sgx += dot_centred(buf, &xv[row * hw..(row + 1) * hw], mean[ch]);
                }
                (sg, sgx * inv)
            })
            .collect();
        let mut dx = vec![0.0f32; xv.len()];
        dx.par_chunks_mut(hw)
            .enumerate()
            .for_each_init(Vec::new, |buf, (row, out)| {
                let ch = row % c;
                let inv = 1.0 / (var[ch] as f64 + self.eps).sqrt();
                let (mg, mgx) = (sums[ch].0 / n, sums[ch].1 / n);
                let k = gam[ch] as f64 * inv;
                // dx = k (g − mg − (x − μ) σ⁻¹ mgx) = a g + bx (x − μ) + d, per channel.
                let (a, bx, d) = (k as f32, (-k * inv * mgx) as f32, (-k * mg) as f32);
                let m = mean[ch];
                masked(row, buf);
                for ((o, g), xx) in out.iter_mut().zip(buf.iter()).zip(&xv[row * hw..]) {
                    *o = a * g + bx * (xx - m) + d;
                }
            });
        (dx, sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op against the same maths in candle's tensor ops: outputs and all gradients,
    /// with and without the ReLU, for data centred at zero and far from it (where a one-pass
    /// `E[x²] − E[x]²` in f32 would lose the variance).
    #[test]
    fn fused_batch_norm_matches_candle_ops() {
        for (relu, centre) in [(false, 0.3f32), (true, 0.3), (true, 500.0)] {
            check(relu, centre);
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn check(relu: bool, centre: f32) {
        let dev = Device::Cpu;
        let x = Tensor::randn(centre, 2.0, (3, 5, 37, 29), &dev).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let g = Var::from_tensor(&Tensor::randn(1.0f32, 0.5, 5, &dev).unwrap()).unwrap();
        let be = Var::from_tensor(&Tensor::randn(0.0f32, 0.5, 5, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 37, 29), &dev).unwrap();
        let op = BatchNormTrain::new(1e-5, relu);
        let ours = x
            .as_tensor()
            .apply_op3(g.as_tensor(), be.as_tensor(), op.clone())
            .unwrap();
        // The reference in f64, so that it is the accurate one.
        let xt = x.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
        let mean = |t: &Tensor| {
            t.mean_keepdim(0)
                .unwrap()
                .mean_keepdim(2)
                .unwrap()
                .mean_keepdim(3)
                .unwrap()
        };
        let xc = xt.broadcast_sub(&mean(&xt)).unwrap();
        let var = mean(&xc.sqr().unwrap());
        let f64_of = |v: &Var| {
            v.as_tensor()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .reshape((1, 5, 1, 1))
                .unwrap()
        };
        let mut theirs = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&f64_of(&g))
            .unwrap()
            .broadcast_add(&f64_of(&be))
            .unwrap();
        if relu {
            // ReLU through our op's own mask: where the output is within rounding of zero the
            // f32 op and the f64 reference may fall on different sides, and the derivative of
            // each is then right for its own side.
            let mask = ours
                .gt(0f32)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap();
            theirs = (theirs * mask).unwrap();
        }
        let theirs = theirs.to_dtype(candle_core::DType::F32).unwrap();
        let d = max_abs(&(&ours - &theirs).unwrap());
        assert!(d < 1e-4, "forward {d} (relu {relu}, centre {centre})");
        if relu {
            assert_eq!(
                ours.ge(0f32)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as usize,
                ours.elem_count(),
                "ReLU output has negatives"
            );
        }
        let go = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &g, &be] {
            let a = go.get(v).unwrap();
            let b = gt.get(v).unwrap();
            let scale = max_abs(b).max(1e-6);
            let d = max_abs(&(a - b).unwrap());
            assert!(
                d / scale < 1e-4,
                "gradient {d} of {scale} (relu {relu}, centre {centre})"
            );
        }
        let (m, _) = op.batch_stats().unwrap();
        assert!((m[0] - centre).abs() < 0.2, "mean {} of {centre}", m[0]);
    }
}
