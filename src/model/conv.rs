//! Fast CPU 3x3 convolution (stride 1, zero padding 1) for the U-Net, forward and backward.
//!
//! candle 0.11 lowers a convolution through an im2col copy and layout shuffles that cost 7-13x
//! the arithmetic on this CPU (see `../shared/NOTES.md`), while its GEMM (the `gemm` crate) is
//! as fast as PyTorch's. This module feeds that GEMM directly with no im2col:
//!
//! pad each input channel once to `(H+2) x (W+2)` and flatten it. For kernel tap `(ky, kx)` the
//! shifted input the tap needs is then a *contiguous* window of that flat array starting at
//! `ky (W+2) + kx`, so the whole convolution is 9 accumulating GEMMs
//! `out (Cout x H(W+2)) += W_k (Cout x Cin) · X_pad[:, off_k ..]` over a strided view, computed on a
//! grid 2 columns wider than the output (those 2 columns are discarded in the epilogue, which
//! also fuses bias and ReLU). The input gradient is the same convolution with the kernel flipped
//! and transposed; the weight gradient is 9 GEMMs `dW_k += G_pad · X_pad[:, off_k ..]ᵀ`.
//!
//! The GEMM is `unsafe` (raw pointers with strides); every call is preceded by the bounds it
//! relies on, checked with `assert!`, so a wrong shape panics instead of reading out of bounds.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Shape of one 3x3 convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Image height.
    pub h: usize,
    /// Image width.
    pub w: usize,
}

impl ConvShape {
    fn padded_plane(&self) -> usize {
        (self.h + 2) * (self.w + 2)
    }
    /// Columns of the wide output grid (`H x (W+2)`).
    fn wide(&self) -> usize {
        self.h * (self.w + 2)
    }
}

fn threads() -> gemm::Parallelism {
    if SERIAL_GEMM.with(|c| c.get()) {
        return gemm::Parallelism::None;
    }
    gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
}

thread_local! {
    /// Set inside work that is already parallel over batch items: a GEMM then runs on its
    /// own thread instead of splitting into tasks that wait for each other.
    static SERIAL_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with single-threaded GEMMs on this thread.
fn serial<T>(f: impl FnOnce() -> T) -> T {
    SERIAL_GEMM.with(|c| {
        let old = c.replace(true);
        let out = f();
        c.set(old);
        out
    })
}

/// Zero-pads `c` channels of `h x w` to `(h+2) x (w+2)`, flattened, plus 2 trailing zeros so
/// the last tap's wide window stays in bounds.
fn pad(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let plane = (h + 2) * (w + 2);
    let mut out = vec![0.0f32; c * plane + 2];
    out[..c * plane]
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for y in 0..h {
                let d = (y + 1) * (w + 2) + 1;
                dst[d..d + w].copy_from_slice(&src[y * w..(y + 1) * w]);
            }
        });
    out
}

/// `dst (m x n, row stride dst_rs) (+)= lhs (m x k) · rhs (k x n)` with explicit strides.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // The furthest element each operand is read or written at must lie inside its slice.
    assert!((m - 1) * dst_rs + n <= dst.len(), "gemm: dst out of bounds");
    if k > 0 {
        assert!(
            (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
            "gemm: lhs out of bounds"
        );
        assert!(
            (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
            "gemm: rhs out of bounds"
        );
    }
    // SAFETY: the asserts above bound every index the GEMM touches: rows < m, columns < n,
    // inner < k, with the strides given; the slices do not alias (dst is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads(),
        );
    }
}

/// 3x3 convolution, NCHW input `x`, OIHW weight `wt` (`cout x cin x 3 x 3`), optional bias and
/// ReLU fused into the epilogue. Returns NCHW `batch x cout x h x w`.
pub fn conv3x3(x: &[f32], wt: &[f32], bias: Option<&[f32]>, relu: bool, s: ConvShape) -> Vec<f32> {
    assert_eq!(x.len(), s.batch * s.cin * s.h * s.w, "conv3x3: input size");
    let hw = s.h * s.w;
    conv3x3_from(
        |b| pad(&x[b * s.cin * hw..(b + 1) * s.cin * hw], s.cin, s.h, s.w),
        wt,
        bias,
        relu,
        s,
    )
}

/// [`conv3x3`] over a padded input that `padded(b)` builds for batch item `b` (so that an
/// upsample and a concatenation can be fused into the padding pass).
fn conv3x3_from(
    padded: impl Fn(usize) -> Vec<f32> + Sync,
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
) -> Vec<f32> {
    assert_eq!(wt.len(), s.cout * s.cin * 9, "conv3x3: weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.cout, "conv3x3: bias size");
    }
    let (wide, hw) = (s.wide(), s.h * s.w);
    let mut out = vec![0.0f32; s.batch * s.cout * hw];
    // A batch at least as large as the thread pool: one item per task, serial GEMMs (9 small
    // parallel GEMMs per item spend much of their time handing work between threads).
    if s.batch > 1 && s.batch >= rayon::current_num_threads() {
        out.par_chunks_mut(s.cout * hw)
            .enumerate()
            .for_each(|(b, dst)| {
                let mut acc = vec![0.0f32; s.cout * wide];
                serial(|| conv3x3_item(&padded(b), wt, bias, relu, s, &mut acc, dst));
            });
        return out;
    }
    let mut acc = vec![0.0f32; s.cout * wide];
    for (b, dst) in out.chunks_mut(s.cout * hw).enumerate() {
        conv3x3_item(&padded(b), wt, bias, relu, s, &mut acc, dst);
    }
    out
}

/// One batch item of [`conv3x3_from`]: 9 GEMMs (one per tap) into `acc` (`cout x wide`),
/// then bias and ReLU into `dst` (`cout x h x w`).
fn conv3x3_item(
    xp: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
    acc: &mut [f32],
    dst: &mut [f32],
) {
    let (plane, wide, hw) = (s.padded_plane(), s.wide(), s.h * s.w);
    assert_eq!(xp.len(), s.cin * plane + 2, "conv3x3: padded input size");
    for tap in 0..9 {
        let off = (tap / 3) * (s.w + 2) + tap % 3;
        gemm_strided(
            (s.cout, wide, s.cin),
            acc,
            wide,
            tap > 0,
            &wt[tap..],
            (s.cin * 9, 9),
            &xp[off..],
            (plane, 1),
        );
    }
    let acc = &*acc;
    let epilogue = |(co, d): (usize, &mut [f32])| {
        let bv = bias.map_or(0.0, |bb| bb[co]);
        for y in 0..s.h {
            let src = &acc[co * wide + y * (s.w + 2)..][..s.w];
            for (o, v) in d[y * s.w..(y + 1) * s.w].iter_mut().zip(src) {
                let v = v + bv;
                *o = if relu { v.max(0.0) } else { v };
            }
        }
    };
    if SERIAL_GEMM.with(|c| c.get()) {
        dst.chunks_mut(hw).enumerate().for_each(epilogue);
    } else {
        dst.par_chunks_mut(hw).enumerate().for_each(epilogue);
    }
}

/// The padded input of `concat([upsample_nearest(low, h, w), skip])` for one batch item,
/// without materialising the upsampled or concatenated tensors (nearest source index
/// `floor(y * h_low / h)` as candle's `upsample_nearest2d`).
fn pad_upcat(
    low: &[f32],
    cl: usize,
    (hl, wl): (usize, usize),
    skip: &[f32],
    cs: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let plane = (h + 2) * (w + 2);
    let mut out = vec![0.0f32; (cl + cs) * plane + 2];
    let ys: Vec<usize> = (0..h)
        .map(|y| ((y as f64 * hl as f64 / h as f64) as usize).min(hl - 1))
        .collect();
    let xs: Vec<usize> = (0..w)
        .map(|x| ((x as f64 * wl as f64 / w as f64) as usize).min(wl - 1))
        .collect();
    out[..(cl + cs) * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(c, dst)| {
            for y in 0..h {
                let d = (y + 1) * (w + 2) + 1;
                let row = &mut dst[d..d + w];
                if c < cl {
                    let src = &low[c * hl * wl + ys[y] * wl..][..wl];
                    for (o, &sx) in row.iter_mut().zip(&xs) {
                        *o = src[sx];
                    }
                } else {
                    let cc = c - cl;
                    row.copy_from_slice(&skip[cc * h * w + y * w..][..w]);
                }
            }
        });
    out
}

/// The padded input of `max_pool2d(x, 2)` for one batch item (floor sizes, as candle's).
fn pad_pool(x: &[f32], c: usize, (hi, wi): (usize, usize)) -> Vec<f32> {
    let (h, w) = (hi / 2, wi / 2);
    let plane = (h + 2) * (w + 2);
    let mut out = vec![0.0f32; c * plane + 2];
    out[..c * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(ch, dst)| {
            let src = &x[ch * hi * wi..(ch + 1) * hi * wi];
            for y in 0..h {
                let d = (y + 1) * (w + 2) + 1;
                let (r0, r1) = (&src[2 * y * wi..], &src[(2 * y + 1) * wi..]);
                for (xx, o) in dst[d..d + w].iter_mut().enumerate() {
                    *o = r0[2 * xx]
                        .max(r0[2 * xx + 1])
                        .max(r1[2 * xx])
                        .max(r1[2 * xx + 1]);
                }
            }
        });
    out
}

/// The constants of one fused inference convolution, on the host: read out of the tensors once
/// when the network is fused, not on every frame.
pub struct HostKernel {
    /// OIHW weights.
    pub weight: Vec<f32>,
    /// Bias per output channel.
    pub bias: Vec<f32>,
    /// Apply ReLU.
    pub relu: bool,
}

impl std::ops::Deref for PoolConv {
    type Target = HostKernel;
    fn deref(&self) -> &HostKernel {
        &self.0
    }
}

impl std::ops::Deref for UpCatConv {
    type Target = HostKernel;
    fn deref(&self) -> &HostKernel {
        &self.0
    }
}

/// Inference-only encoder step: `relu?(conv3x3(max_pool2d(x, 2)) + bias)`, the pooling done in
/// the padding pass.
pub struct PoolConv(pub std::sync::Arc<HostKernel>);

impl candle_core::CustomOp1 for PoolConv {
    fn name(&self) -> &'static str {
        "fast-maxpool-conv3x3"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[b, c, hi, wi] = l1.shape().dims() else {
            return Err(candle_core::Error::Msg("pool-conv: expected NCHW".into()));
        };
        let cout = self.bias.len();
        let (h, w) = (hi / 2, wi / 2);
        if h == 0 || w == 0 || self.weight.len() != cout * c * 9 {
            return Err(candle_core::Error::Msg(format!(
                "pool-conv: input {:?} does not fit a {cout}-channel kernel",
                l1.shape()
            )));
        }
        let x = slice_f32(s1, l1, "input")?;
        let s = ConvShape {
            batch: b,
            cin: c,
            cout,
            h,
            w,
        };
        let out = conv3x3_from(
            |i| pad_pool(&x[i * c * hi * wi..(i + 1) * c * hi * wi], c, (hi, wi)),
            &self.weight,
            Some(&self.bias),
            self.relu,
            s,
        );
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}

/// Inference-only decoder step: `relu?(conv3x3(concat([upsample(low), skip])) + bias)` with the
/// weights held by the op (they are constants of a fused network); the kernel is
/// `cout x (c_low + c_skip) x 3 x 3`.
pub struct UpCatConv(pub std::sync::Arc<HostKernel>);

impl candle_core::CustomOp2 for UpCatConv {
    fn name(&self) -> &'static str {
        "fast-upsample-concat-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[b, cl, hl, wl], &[b2, cs, h, w]) = (l1.shape().dims(), l2.shape().dims()) else {
            return Err(candle_core::Error::Msg(
                "up-cat-conv: expected NCHW inputs".into(),
            ));
        };
        let cout = self.bias.len();
        if b != b2 || hl == 0 || wl == 0 || self.weight.len() != cout * (cl + cs) * 9 {
            return Err(candle_core::Error::Msg(format!(
                "up-cat-conv: inputs {:?} and {:?} do not fit a {cout}-channel kernel",
                l1.shape(),
                l2.shape()
            )));
        }
        let low = slice_f32(s1, l1, "low-resolution input")?;
        let skip = slice_f32(s2, l2, "skip input")?;
        let s = ConvShape {
            batch: b,
            cin: cl + cs,
            cout,
            h,
            w,
        };
        let out = conv3x3_from(
            |i| {
                pad_upcat(
                    &low[i * cl * hl * wl..(i + 1) * cl * hl * wl],
                    cl,
                    (hl, wl),
                    &skip[i * cs * h * w..(i + 1) * cs * h * w],
                    cs,
                    h,
                    w,
                )
            },
            &self.weight,
            Some(&self.bias),
            self.relu,
            s,
        );
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}

/// The input gradient of [`conv3x3`] (no bias/ReLU): the convolution of `grad` with the kernel
/// flipped in space and transposed in channels.
pub fn conv3x3_grad_input(grad: &[f32], wt: &[f32], s: ConvShape) -> Vec<f32> {
    let mut flipped = vec![0.0f32; wt.len()];
    for co in 0..s.cout {
        for ci in 0..s.cin {
            for tap in 0..9 {
                flipped[(ci * s.cout + co) * 9 + (8 - tap)] = wt[(co * s.cin + ci) * 9 + tap];
            }
        }
    }
    let t = ConvShape {
        cin: s.cout,
        cout: s.cin,
        ..s
    };
    conv3x3(grad, &flipped, None, false, t)
}

/// The weight gradient of [`conv3x3`]: `cout x cin x 3 x 3`, summed over the batch.
pub fn conv3x3_grad_weight(x: &[f32], grad: &[f32], s: ConvShape) -> Vec<f32> {
    let (plane, wide, hw) = (s.padded_plane(), s.wide(), s.h * s.w);
    // One (cout x cin) block per tap, accumulated over the batch, then interleaved to OIHW.
    let mut taps = vec![0.0f32; 9 * s.cout * s.cin];
    let mut gwide = vec![0.0f32; s.cout * wide];
    for b in 0..s.batch {
        let xp = pad(&x[b * s.cin * hw..(b + 1) * s.cin * hw], s.cin, s.h, s.w);
        let g = &grad[b * s.cout * hw..(b + 1) * s.cout * hw];
        // The gradient on the wide grid, zero in the 2 discarded columns.
        gwide
            .par_chunks_mut(wide)
            .enumerate()
            .for_each(|(co, dst)| {
                for y in 0..s.h {
                    dst[y * (s.w + 2)..y * (s.w + 2) + s.w]
                        .copy_from_slice(&g[co * hw + y * s.w..co * hw + (y + 1) * s.w]);
                }
            });
        for tap in 0..9 {
            let off = (tap / 3) * (s.w + 2) + tap % 3;
            gemm_strided(
                (s.cout, s.cin, wide),
                &mut taps[tap * s.cout * s.cin..(tap + 1) * s.cout * s.cin],
                s.cin,
                b > 0,
                &gwide,
                (wide, 1),
                &xp[off..],
                (1, plane),
            );
        }
    }
    let mut out = vec![0.0f32; s.cout * s.cin * 9];
    for tap in 0..9 {
        for i in 0..s.cout * s.cin {
            out[i * 9 + tap] = taps[tap * s.cout * s.cin + i];
        }
    }
    out
}

fn slice_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    cpu_f32(s, l, "conv3x3", what)
}

/// The f32 values of a contiguous CPU operand of a custom op (`op`'s `what`), or an error that
/// names both. Shared by the model's CPU ops (convolutions, batch norm, the fused loss).
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("{op}: {what} must be f32"))),
    }
}

fn shape_of(x: &Layout, w: &Layout) -> candle_core::Result<ConvShape> {
    let (&[batch, cin, h, wd], &[cout, wcin, 3, 3]) = (x.shape().dims(), w.shape().dims()) else {
        return Err(candle_core::Error::Msg(format!(
            "conv3x3: expected NCHW input and OIHW 3x3 weight, got {:?} and {:?}",
            x.shape(),
            w.shape()
        )));
    };
    if wcin != cin {
        return Err(candle_core::Error::Msg(format!(
            "conv3x3: input has {cin} channels, weight expects {wcin}"
        )));
    }
    Ok(ConvShape {
        batch,
        cin,
        cout,
        h,
        w: wd,
    })
}

/// The differentiable op `(x, weight) -> conv3x3(x, weight)`.
struct Conv3x3;

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "fast-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = shape_of(l1, l2)?;
        let out = conv3x3(
            slice_f32(s1, l1, "input")?,
            slice_f32(s2, l2, "weight")?,
            None,
            false,
            s,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.cout, s.h, s.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let s = shape_of(x.layout(), w.layout())?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (gx, gw) = rayon::join(
            || conv3x3_grad_input(&gv, &wv, s),
            || conv3x3_grad_weight(&xv, &gv, s),
        );
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(gw, w.shape(), w.device())?),
        ))
    }
}

/// Inference-only `(x, weight, bias) -> relu?(conv3x3(x, weight) + bias)`.
struct Conv3x3BiasAct {
    relu: bool,
}

impl CustomOp3 for Conv3x3BiasAct {
    fn name(&self) -> &'static str {
        "fast-conv3x3-bias-act"
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
        let s = shape_of(l1, l2)?;
        let bias = slice_f32(s3, l3, "bias")?;
        if bias.len() != s.cout {
            return Err(candle_core::Error::Msg("conv3x3: bias size".into()));
        }
        let out = conv3x3(
            slice_f32(s1, l1, "input")?,
            slice_f32(s2, l2, "weight")?,
            Some(bias),
            self.relu,
            s,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.cout, s.h, s.w)),
        ))
    }
}

static REFERENCE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Use candle's own convolution everywhere (for benchmarks and parity checks only).
pub fn use_reference_kernels(on: bool) {
    REFERENCE.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && !REFERENCE.load(std::sync::atomic::Ordering::Relaxed)
}

/// 3x3 "same" convolution, differentiable: the fast kernel on the CPU, candle's own elsewhere.
pub fn conv3x3_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, Conv3x3)
    } else {
        x.conv2d(w, 1, 1, 1, 1)
    }
}

/// 3x3 "same" convolution with bias and optional ReLU for inference (no gradient on the CPU
/// path).
pub fn conv3x3_bias_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    relu: bool,
) -> candle_core::Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &b.contiguous()?,
            &Conv3x3BiasAct { relu },
        )
    } else {
        let y = x
            .conv2d(w, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
        if relu { y.relu() } else { Ok(y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        // A small LCG: deterministic values in [-1, 1) without pulling a RNG into the kernel tests.
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Every shape class the U-Net uses, odd sizes and batch > 1 included: forward, input
    /// gradient and weight gradient against candle's own conv2d and its autograd.
    #[test]
    fn parity_with_candle_forward_and_backward() {
        let dev = Device::Cpu;
        for (i, &(batch, cin, cout, h, w)) in [
            (1, 1, 8, 32, 32),
            (2, 8, 8, 17, 23),
            (3, 24, 8, 9, 5),
            (1, 64, 128, 8, 8),
            (2, 3, 5, 1, 1),
            (1, 16, 4, 2, 7),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_vec(
                rand(batch * cin * h * w, i as u64),
                (batch, cin, h, w),
                &dev,
            )
            .unwrap();
            let wt = Var::from_vec(
                rand(cout * cin * 9, 100 + i as u64),
                (cout, cin, 3, 3),
                &dev,
            )
            .unwrap();
            let g = Tensor::from_vec(
                rand(batch * cout * h * w, 200 + i as u64),
                (batch, cout, h, w),
                &dev,
            )
            .unwrap();
            let ours = conv3x3_t(x.as_tensor(), wt.as_tensor()).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                ours.flatten_all().unwrap().to_vec1().unwrap(),
                theirs.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(max_rel(&a, &b) < 1e-4, "forward {i}: {}", max_rel(&a, &b));
            let go = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (theirs * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("input", &x), ("weight", &wt)] {
                let a: Vec<f32> = go.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = gt.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    max_rel(&a, &b) < 1e-4,
                    "{name} gradient {i}: {}",
                    max_rel(&a, &b)
                );
            }
        }
    }

    #[test]
    fn fused_bias_relu_matches_unfused() {
        let dev = Device::Cpu;
        let s = (2, 6, 4, 11, 13);
        let x = Tensor::from_vec(rand(2 * 6 * 11 * 13, 7), (2, 6, 11, 13), &dev).unwrap();
        let w = Tensor::from_vec(rand(4 * 6 * 9, 8), (4, 6, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(rand(4, 9), 4, &dev).unwrap();
        let fused = conv3x3_bias_act(&x, &w, &b, true).unwrap();
        let plain = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        assert_eq!(fused.dims(), &[s.0, s.2, s.3, s.4]);
        let a: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
        let c: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_rel(&a, &c) < 1e-5);
        assert!(a.iter().all(|v| *v >= 0.0));
    }

    /// The fused decoder and encoder steps against candle's separate ops, odd sizes included.
    #[test]
    fn fused_upsample_concat_and_pool_convs_match_candle() {
        let dev = Device::Cpu;
        let low = Tensor::from_vec(rand(2 * 3 * 5 * 7, 31), (2, 3, 5, 7), &dev).unwrap();
        let skip = Tensor::from_vec(rand(2 * 4 * 10 * 14, 32), (2, 4, 10, 14), &dev).unwrap();
        let w = Tensor::from_vec(rand(6 * 7 * 9, 33), (6, 7, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(rand(6, 34), 6, &dev).unwrap();
        let op = UpCatConv(std::sync::Arc::new(HostKernel {
            weight: w.flatten_all().unwrap().to_vec1().unwrap(),
            bias: b.to_vec1().unwrap(),
            relu: true,
        }));
        let ours = low.apply_op2_no_bwd(&skip, &op).unwrap();
        let up = low.upsample_nearest2d(10, 14).unwrap();
        let cat = Tensor::cat(&[&up, &skip], 1).unwrap();
        let theirs = cat
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        let (a, c): (Vec<f32>, Vec<f32>) = (
            ours.flatten_all().unwrap().to_vec1().unwrap(),
            theirs.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(max_rel(&a, &c) < 1e-4, "up-cat {}", max_rel(&a, &c));

        let x = Tensor::from_vec(rand(2 * 3 * 9 * 11, 35), (2, 3, 9, 11), &dev).unwrap();
        let w = Tensor::from_vec(rand(5 * 3 * 9, 36), (5, 3, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(rand(5, 37), 5, &dev).unwrap();
        let op = PoolConv(std::sync::Arc::new(HostKernel {
            weight: w.flatten_all().unwrap().to_vec1().unwrap(),
            bias: b.to_vec1().unwrap(),
            relu: false,
        }));
        let ours = x.apply_op1_no_bwd(&op).unwrap();
        let theirs = x
            .max_pool2d(2)
            .unwrap()
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let (a, c): (Vec<f32>, Vec<f32>) = (
            ours.flatten_all().unwrap().to_vec1().unwrap(),
            theirs.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(max_rel(&a, &c) < 1e-4, "pool {}", max_rel(&a, &c));
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv3x3_t(&x, &w).is_err());
        let w5 = Tensor::zeros((4, 3, 5, 5), DType::F32, &dev).unwrap();
        assert!(conv3x3_t(&x, &w5).is_err());
    }
}
