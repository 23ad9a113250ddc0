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
//! Those GEMMs suit the deep levels (few pixels, many channels). At the wide top levels (8-16
//! channels, 128-512 pixels wide) a GEMM's output or reduction is so small that it spends its
//! time packing operands: there, on x86-64 with AVX2/FMA or AVX-512, *direct* kernels keep a
//! block of accumulators in vector registers (`conv_direct`: 8 (AVX-512) or 4 (AVX2) output channels x 2 vectors of
//! one output row; `grad_weight_direct`: 4 output channels x 3 taps over whole rows). They
//! made the U-Net forward 2x and a training step 1.9x faster (see README's table).
//!
//! At the deep levels (many channels, images at most 64 wide) the convolution runs as
//! Winograd's F(2x2, 3x3) instead (`winograd`): 16 GEMMs over 2x2 output tiles with 2.25x less
//! arithmetic, 1.3-1.9x faster than the 9 GEMMs or the direct kernel there; the weight gradient
//! there runs through the same transforms. The decoder's
//! convolution over the upsampled level below never convolves the upsampled copy
//! (`polyphase`): per output phase its 3x3 taps fold into 2x2 at the low resolution.
//!
//! The GEMM and the vector loads are `unsafe` (raw pointers with strides); every call is
//! preceded by the bounds it relies on, checked with `assert!`, so a wrong shape panics instead
//! of reading out of bounds.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod polyphase;
mod winograd;

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
        &Layouts::default(),
    )
}

/// [`conv3x3`] over a padded input that `padded(b)` builds for batch item `b` (so that an
/// upsample and a concatenation can be fused into the padding pass), with the fast
/// formulations' weight layouts taken from (or made once into) `layouts`.
fn conv3x3_from(
    padded: impl Fn(usize) -> Vec<f32> + Sync,
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
    layouts: &Layouts,
) -> Vec<f32> {
    assert_eq!(wt.len(), s.cout * s.cin * 9, "conv3x3: weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.cout, "conv3x3: bias size");
    }
    let hw = s.h * s.w;
    let mut out = vec![0.0f32; s.batch * s.cout * hw];
    let fast = layouts.fast(wt, bias, s);
    // A batch at least as large as the thread pool: one item per task, serial GEMMs (9 small
    // parallel GEMMs per item spend much of their time handing work between threads).
    if s.batch > 1 && s.batch >= rayon::current_num_threads() {
        out.par_chunks_mut(s.cout * hw)
            .enumerate()
            .for_each(|(b, dst)| {
                let mut acc = Vec::new();
                serial(|| conv3x3_item(&padded(b), wt, bias, relu, s, fast, &mut acc, dst));
            });
        return out;
    }
    let mut acc = Vec::new();
    for (b, dst) in out.chunks_mut(s.cout * hw).enumerate() {
        conv3x3_item(&padded(b), wt, bias, relu, s, fast, &mut acc, dst);
    }
    out
}

/// The faster formulations of one convolution that apply to its shape, their weights laid out.
#[derive(Clone, Copy)]
struct Fast<'a> {
    /// The direct kernel (wide images, few channels).
    direct: Option<&'a DirectWeights>,
    /// Winograd F(2x2, 3x3) (small images, many channels).
    wino: Option<&'a winograd::WinogradWeights>,
}

/// The weights of one kernel laid out for the fast formulations, each made on first use and
/// kept: a fused network's kernels are constants, so every frame after the first reuses them
/// (laying them out again took about 1 ms of each forward of the shipped network). The layouts
/// depend on the kernel and the instruction set, not on the image, so one kernel can run at
/// any size; which formulation runs is still chosen per call from the shape.
#[derive(Default)]
pub(crate) struct Layouts {
    direct: std::sync::OnceLock<DirectWeights>,
    wino: std::sync::OnceLock<winograd::WinogradWeights>,
}

impl Layouts {
    /// The formulation that applies to `s`, its layout made from `wt` and `bias` the first
    /// time (every call on one `Layouts` must pass the same kernel).
    fn fast(&self, wt: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Fast<'_> {
        if winograd::applies(s) {
            let wino = self
                .wino
                .get_or_init(|| winograd::WinogradWeights::new(wt, s.cin, s.cout));
            return Fast {
                direct: None,
                wino: Some(wino),
            };
        }
        let direct = direct_lanes()
            .filter(|&lanes| DirectWeights::fits(s, lanes))
            .map(|lanes| {
                self.direct
                    .get_or_init(|| DirectWeights::new(wt, bias, s.cin, s.cout, lanes))
            });
        Fast { direct, wino: None }
    }
}

/// One batch item of [`conv3x3_from`]: Winograd's F(2x2, 3x3) or the direct kernel where one
/// applies (`fast`), else 9 GEMMs (one per tap) into `acc` (grown to `cout x wide`), then bias
/// and ReLU into `dst` (`cout x h x w`).
#[allow(clippy::too_many_arguments)]
fn conv3x3_item(
    xp: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
    fast: Fast,
    acc: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let (plane, wide, hw) = (s.padded_plane(), s.wide(), s.h * s.w);
    assert_eq!(xp.len(), s.cin * plane + 2, "conv3x3: padded input size");
    if let Some(wg) = fast.wino {
        winograd::conv(xp, wg, bias, relu, s, dst);
        return;
    }
    if let Some(d) = fast.direct {
        conv_direct(xp, d, relu, s, dst);
        return;
    }
    acc.resize(s.cout * wide, 0.0);
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

/// The block of accumulators the direct convolution keeps in vector registers, per
/// instruction set: `CO` output channels x `J` vectors of one output row, so `CO J`
/// accumulators, `J` input vectors and one broadcast weight live in the register file.
/// AVX-512 has 32 registers: 8 x 2. AVX2 has 16: there the 8 x 2 block spilled accumulators
/// to the stack on every step and ran slower than the GEMMs (the shipped network's forward
/// 90-107 ms, 75 ms with no direct kernels, on a 2-core AVX2 EPYC); 4 x 3 still spilled
/// (65 ms); 4 x 2 keeps 11 registers live (38-50 ms) and pads no channel count that is a
/// multiple of 4, where 6 x 2 (41-48 ms) pads the 8-channel network's top level by half.
#[cfg(target_arch = "x86_64")]
mod block {
    /// AVX-512: output channels per block.
    pub const AVX512_CO: usize = 8;
    /// AVX-512: vectors of columns per block.
    pub const AVX512_J: usize = 2;
    /// AVX2: output channels per block.
    pub const AVX2_CO: usize = 4;
    /// AVX2: vectors of columns per block.
    pub const AVX2_J: usize = 2;
}

/// Fewer output channels than this (the input gradient of a 1-channel input) would mostly
/// compute the zeros that pad a block.
const DIRECT_MIN_COUT: usize = 4;

/// The weights of a convolution laid out for the direct kernel, where it applies (x86-64 with
/// AVX2 and FMA, images at least [`CONV_DIRECT_MIN_WIDTH`] wide): `[ci][tap][co]` with `co`
/// padded to whole blocks of output channels (`co_block`, per instruction set) with zeros, so
/// that a block's weights for one `(ci, tap)` are adjacent; the bias padded the same way.
struct DirectWeights {
    lanes: usize,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl DirectWeights {
    /// Whether the direct kernel of `lanes` (16: AVX-512, 8: AVX2) runs `s`: images wide
    /// enough for whole vectors, enough output channels to fill a block.
    fn fits(s: ConvShape, lanes: usize) -> bool {
        s.w >= CONV_DIRECT_MIN_WIDTH.max(2 * lanes)
            && s.h > 0
            && s.cin > 0
            && s.cout >= DIRECT_MIN_COUT
    }

    /// The layout of `wt` (`cout x cin x 3 x 3`) and `bias` for the kernel of `lanes`, which
    /// the caller has checked this CPU runs.
    fn new(wt: &[f32], bias: Option<&[f32]>, cin: usize, cout: usize, lanes: usize) -> Self {
        assert_eq!(wt.len(), cout * cin * 9, "conv3x3: weight size");
        let coutp = cout.next_multiple_of(co_block(lanes));
        let mut w2 = vec![0.0f32; cin * 9 * coutp];
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..9 {
                    w2[(ci * 9 + tap) * coutp + co] = wt[(co * cin + ci) * 9 + tap];
                }
            }
        }
        let mut b2 = vec![0.0f32; coutp];
        if let Some(b) = bias {
            b2[..cout].copy_from_slice(b);
        }
        Self { lanes, w2, b2 }
    }
}

/// Output channels per block of the direct convolution for vectors of `lanes` f32.
fn co_block(lanes: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if lanes == 16 {
            block::AVX512_CO
        } else {
            block::AVX2_CO
        }
    }
    // `direct_lanes` is `None` elsewhere, so this is never asked there.
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = lanes;
        DIRECT_MIN_COUT
    }
}

/// The direct convolution of one padded batch item into `dst` (`cout x h x w`). For a block of
/// output channels x vectors of columns of one row the accumulators stay in registers while
/// the loop runs over input channels and taps: each step loads the shifted input vectors and
/// broadcasts one weight per channel of the block, where the GEMM formulation of a few-channel
/// layer spends much of its time packing operands.
fn conv_direct(xp: &[f32], d: &DirectWeights, relu: bool, s: ConvShape, dst: &mut [f32]) {
    direct_rows(xp, &d.w2, &d.b2, relu, s, d.lanes, dst, None);
}

/// Every row of a direct convolution (`conv_rows` on the kernel of `lanes`; `phase` as there)
/// into `dst` (`cout x h x w`): bands of rows in parallel, or all on this thread inside work
/// that is already parallel over batch items.
#[allow(clippy::too_many_arguments)]
fn direct_rows(
    xp: &[f32],
    w2: &[f32],
    b2: &[f32],
    relu: bool,
    s: ConvShape,
    lanes: usize,
    dst: &mut [f32],
    phase: Option<usize>,
) {
    assert_eq!(dst.len(), s.cout * s.h * s.w, "conv3x3: output size");
    let out = SharedOut(dst.as_mut_ptr(), dst.len());
    let rows = |y0: usize, y1: usize| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `direct_lanes` returned 16 only where AVX-512F is present and 8 only where
        // AVX2 and FMA are (the callers' `lanes` come from it); tasks write disjoint rows of
        // `dst` (see `SharedOut`).
        unsafe {
            if lanes == 16 {
                conv_rows_avx512(xp, w2, b2, relu, s, y0..y1, &out, phase);
            } else {
                conv_rows_avx2(xp, w2, b2, relu, s, y0..y1, &out, phase);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (xp, w2, b2, relu, lanes, phase, &out, y0, y1);
    };
    if SERIAL_GEMM.with(|c| c.get()) {
        rows(0, s.h);
    } else {
        let band = s.h.div_ceil(4 * rayon::current_num_threads().max(1)).max(1);
        (0..s.h.div_ceil(band))
            .into_par_iter()
            .for_each(|i| rows(i * band, ((i + 1) * band).min(s.h)));
    }
}

/// The output of [`conv_direct`], shared by tasks that each write their own rows of every
/// channel plane (disjoint elements), which `&mut [f32]` cannot express.
struct SharedOut(*mut f32, usize);
// SAFETY: tasks write disjoint elements (their own rows) and nothing reads them meanwhile.
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn conv_rows_avx512(
    xp: &[f32],
    w2: &[f32],
    b2: &[f32],
    relu: bool,
    s: ConvShape,
    rows: std::ops::Range<usize>,
    out: &SharedOut,
    phase: Option<usize>,
) {
    conv_rows::<simd::Avx512, { block::AVX512_CO }, { block::AVX512_J }>(
        xp, w2, b2, relu, s, rows, out, phase,
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn conv_rows_avx2(
    xp: &[f32],
    w2: &[f32],
    b2: &[f32],
    relu: bool,
    s: ConvShape,
    rows: std::ops::Range<usize>,
    out: &SharedOut,
    phase: Option<usize>,
) {
    conv_rows::<simd::Avx2, { block::AVX2_CO }, { block::AVX2_J }>(
        xp, w2, b2, relu, s, rows, out, phase,
    );
}

/// Rows `rows` of every output channel of the direct convolution, in blocks of `CO` output
/// channels x `J` vectors of columns, then single vectors, then single columns. With `phase`
/// (channels per phase, see `polyphase`), the channels are 4 output phases of a convolution
/// over an upsampled image and each block reads only its phase's 2 x 2 window of taps.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_rows<S: simd::Lanes, const CO: usize, const J: usize>(
    xp: &[f32],
    w2: &[f32],
    b2: &[f32],
    relu: bool,
    s: ConvShape,
    rows: std::ops::Range<usize>,
    out: &SharedOut,
    phase: Option<usize>,
) {
    let (wp, plane, hw) = (s.w + 2, s.padded_plane(), s.h * s.w);
    let coutp = b2.len();
    // The bounds every pointer below stays within: input rows y + ky <= h + 1 of every
    // channel, columns j + kx + L <= w + 2; weights (ci, tap, co < coutp); output rows < h of
    // channels < cout.
    assert!(xp.len() >= s.cin * plane && w2.len() == s.cin * 9 * coutp);
    assert!(rows.end <= s.h && out.1 == s.cout * hw && coutp >= s.cout);
    assert!(
        coutp.is_multiple_of(CO),
        "conv3x3: weights padded to blocks"
    );
    if let Some(per) = phase {
        assert!(
            coutp == 4 * per && per.is_multiple_of(CO),
            "conv3x3: phases padded to blocks"
        );
    }
    // The block's window of taps: (first row, first column, size); a phase's is 2 x 2.
    let window = |cb: usize| phase.map_or((0, 0, 3), |per| (cb / per / 2, cb / per % 2, 2));
    for y in rows {
        for cb in (0..coutp).step_by(CO) {
            let mut j = 0;
            while j + J * S::L <= s.w {
                // SAFETY: bounds as asserted above (j + J L <= w); the window is a phase's.
                let acc =
                    unsafe { window_block::<S, CO, J>(window(cb), xp, w2, coutp, s, cb, y, j) };
                store_block::<S, CO, J>(acc, b2, relu, s, cb, y, j, out);
                j += J * S::L;
            }
            while j + S::L <= s.w {
                // SAFETY: as above (j + L <= w).
                let acc =
                    unsafe { window_block::<S, CO, 1>(window(cb), xp, w2, coutp, s, cb, y, j) };
                store_block::<S, CO, 1>(acc, b2, relu, s, cb, y, j, out);
                j += S::L;
            }
            // Columns past the last whole vector.
            let (y0, x0, n) = window(cb);
            for x in j..s.w {
                for co in cb..(cb + CO).min(s.cout) {
                    let mut v = b2[co];
                    for ci in 0..s.cin {
                        for ky in y0..y0 + n {
                            for kx in x0..x0 + n {
                                v = w2[(ci * 9 + ky * 3 + kx) * coutp + co]
                                    .mul_add(xp[ci * plane + (y + ky) * wp + x + kx], v);
                            }
                        }
                    }
                    let v = if relu { v.max(0.0) } else { v };
                    // SAFETY: co < cout, y < h, x < w: inside `out`, a row of this task only.
                    unsafe { *out.0.add(co * hw + y * s.w + x) = v };
                }
            }
        }
    }
}

/// [`conv_block`] over the window `(first row, first column, size)` of taps: all 9, or one of
/// the 4 phases' 2 x 2 windows (a plain function, not a closure, so that it is inlined into the
/// kernels compiled with their target features).
///
/// # Safety
/// As [`conv_block`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn window_block<S: simd::Lanes, const CO: usize, const J: usize>(
    window: (usize, usize, usize),
    xp: &[f32],
    w2: &[f32],
    coutp: usize,
    s: ConvShape,
    cb: usize,
    y: usize,
    j: usize,
) -> [[S::V; J]; CO] {
    unsafe {
        match window {
            (0, 0, 3) => conv_block::<S, CO, J, 0, 0, 3>(xp, w2, coutp, s, cb, y, j),
            (0, 0, _) => conv_block::<S, CO, J, 0, 0, 2>(xp, w2, coutp, s, cb, y, j),
            (0, _, _) => conv_block::<S, CO, J, 0, 1, 2>(xp, w2, coutp, s, cb, y, j),
            (_, 0, _) => conv_block::<S, CO, J, 1, 0, 2>(xp, w2, coutp, s, cb, y, j),
            _ => conv_block::<S, CO, J, 1, 1, 2>(xp, w2, coutp, s, cb, y, j),
        }
    }
}

/// The accumulators of `CO` output channels from `cb` x `J` vectors of columns from `j` of
/// row `y`, summed over every input channel and the taps of the `N x N` window from tap row
/// `Y0`, column `X0` of the 3x3 kernel (all 9 taps: `0, 0, 3`; one output phase of a
/// convolution over an upsampled image: a 2 x 2 window, see `polyphase`).
///
/// # Safety
/// The CPU has the features of `S`; `j + J L <= w`, `y < h`, `cb + CO <= coutp`,
/// `Y0 + N <= 3`, `X0 + N <= 3`, and `xp`, `w2` are as [`conv_rows`] asserts.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn conv_block<
    S: simd::Lanes,
    const CO: usize,
    const J: usize,
    const Y0: usize,
    const X0: usize,
    const N: usize,
>(
    xp: &[f32],
    w2: &[f32],
    coutp: usize,
    s: ConvShape,
    cb: usize,
    y: usize,
    j: usize,
) -> [[S::V; J]; CO] {
    let (wp, plane) = (s.w + 2, s.padded_plane());
    unsafe {
        let zero = S::splat(0.0);
        let mut acc = [[zero; J]; CO];
        let (xq, wq) = (xp.as_ptr(), w2.as_ptr());
        for ci in 0..s.cin {
            for ky in Y0..Y0 + N {
                let row = xq.add(ci * plane + (y + ky) * wp + j);
                for kx in X0..X0 + N {
                    let mut xv = [zero; J];
                    for (u, v) in xv.iter_mut().enumerate() {
                        *v = S::load(row.add(kx + u * S::L));
                    }
                    let wrow = wq.add((ci * 9 + ky * 3 + kx) * coutp + cb);
                    for (c, ac) in acc.iter_mut().enumerate() {
                        let wv = S::splat(*wrow.add(c));
                        for (a, x) in ac.iter_mut().zip(&xv) {
                            *a = S::fma(wv, *x, *a);
                        }
                    }
                }
            }
        }
        acc
    }
}

/// Bias, ReLU and the store of one block of [`conv_block`] (channels past `cout` dropped).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store_block<S: simd::Lanes, const CO: usize, const J: usize>(
    acc: [[S::V; J]; CO],
    b2: &[f32],
    relu: bool,
    s: ConvShape,
    cb: usize,
    y: usize,
    j: usize,
    out: &SharedOut,
) {
    let hw = s.h * s.w;
    for (c, ac) in acc.iter().enumerate() {
        let co = cb + c;
        if co >= s.cout {
            break;
        }
        // SAFETY: co < cout, y < h, j + J L <= w (the caller's bounds): inside `out`, in a row
        // that only this task writes; the CPU has the features of `S`.
        unsafe {
            let bv = S::splat(b2[co]);
            let zero = S::splat(0.0);
            for (u, a) in ac.iter().enumerate() {
                let mut v = S::add(*a, bv);
                if relu {
                    v = S::max(v, zero);
                }
                S::store(out.0.add(co * hw + y * s.w + j + u * S::L), v);
            }
        }
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
    let (ys, xs) = (
        super::resample::nearest(hl, h),
        super::resample::nearest(wl, w),
    );
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
/// when the network is fused, not on every frame, with their layouts for the fast formulations
/// made on the first frame and kept.
pub struct HostKernel {
    /// OIHW weights.
    pub weight: Vec<f32>,
    /// Bias per output channel.
    pub bias: Vec<f32>,
    /// Apply ReLU.
    pub relu: bool,
    /// The whole kernel's layouts (a plain or pooled convolution, or the fallback of an
    /// upsampled one).
    layouts: Layouts,
    /// The split kernel of a convolution over an upsampled image and a skip.
    #[cfg(target_arch = "x86_64")]
    upcat: std::sync::OnceLock<polyphase::UpCatWeights>,
}

impl HostKernel {
    /// `relu?(conv3x3(x, weight) + bias)` with `weight` OIHW (`bias.len()` output channels).
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, relu: bool) -> Self {
        Self {
            weight,
            bias,
            relu,
            layouts: Layouts::default(),
            #[cfg(target_arch = "x86_64")]
            upcat: std::sync::OnceLock::new(),
        }
    }

    /// An error naming `what` unless an input of `shape` with `cin` channels fits the kernel.
    fn check_input(&self, what: &str, shape: &Shape, cin: usize) -> candle_core::Result<()> {
        let cout = self.bias.len();
        if cout == 0 || self.weight.len() != cout * cin * 9 {
            return Err(candle_core::Error::Msg(format!(
                "{what}: input {shape:?} does not fit a {cout}-channel kernel of {} weights",
                self.weight.len()
            )));
        }
        Ok(())
    }
}

/// Inference-only `relu?(conv3x3(x) + bias)` with the kernel held by the op.
pub struct HostConv(pub std::sync::Arc<HostKernel>);

impl candle_core::CustomOp1 for HostConv {
    fn name(&self) -> &'static str {
        "fast-conv3x3-host"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.run(s1, l1, false)
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
        self.0.run(s1, l1, true)
    }
}

impl HostKernel {
    /// [`HostConv`] (`pool` false) or [`PoolConv`] on an NCHW input.
    fn run(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        pool: bool,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = if pool { "pool-conv" } else { "conv3x3" };
        let &[b, c, hi, wi] = l1.shape().dims() else {
            return Err(candle_core::Error::Msg(format!("{what}: expected NCHW")));
        };
        self.check_input(what, l1.shape(), c)?;
        let (h, w) = if pool { (hi / 2, wi / 2) } else { (hi, wi) };
        if h == 0 || w == 0 {
            return Err(candle_core::Error::Msg(format!(
                "{what}: input {:?} is empty or too small to pool",
                l1.shape()
            )));
        }
        let x = slice_f32(s1, l1, "input")?;
        let s = ConvShape {
            batch: b,
            cin: c,
            cout: self.bias.len(),
            h,
            w,
        };
        let item = |i: usize| &x[i * c * hi * wi..(i + 1) * c * hi * wi];
        let out = conv3x3_from(
            |i| {
                if pool {
                    pad_pool(item(i), c, (hi, wi))
                } else {
                    pad(item(i), c, h, w)
                }
            },
            &self.weight,
            Some(&self.bias),
            self.relu,
            s,
            &self.layouts,
        );
        Ok((CpuStorage::F32(out), Shape::from((b, s.cout, h, w))))
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
        let k = &*self.0;
        let (&[b, cl, hl, wl], &[b2, cs, h, w]) = (l1.shape().dims(), l2.shape().dims()) else {
            return Err(candle_core::Error::Msg(
                "up-cat-conv: expected NCHW inputs".into(),
            ));
        };
        let cout = k.bias.len();
        if b != b2 || hl == 0 || wl == 0 || k.weight.len() != cout * (cl + cs) * 9 {
            return Err(candle_core::Error::Msg(format!(
                "up-cat-conv: inputs {:?} and {:?} do not fit a {cout}-channel kernel",
                l1.shape(),
                l2.shape()
            )));
        }
        let low = slice_f32(s1, l1, "low-resolution input")?;
        let skip = slice_f32(s2, l2, "skip input")?;
        #[cfg(target_arch = "x86_64")]
        if let Some(out) = polyphase::upcat_conv(low, cl, (hl, wl), skip, cs, (h, w), b, k) {
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))));
        }
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
            &k.weight,
            Some(&k.bias),
            k.relu,
            s,
            &k.layouts,
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
///
/// As GEMMs (`dW_k += G · X_kᵀ`) the output is tiny (`cout x cin` per tap) and the reduction
/// huge (every pixel of the batch), so the GEMM spends its time packing both operands, 9 times,
/// on one thread: at the U-Net's top level it ran at a third of the forward pass's speed. The
/// direct kernel (`grad_weight_direct`) keeps a block of `4 output channels x 3 taps` of
/// accumulators in vector registers while it streams one row of the gradient and of the padded
/// input, with tasks over (batch item, input channel). Used for images at least
/// [`DIRECT_MIN_WIDTH`] wide on x86-64 with AVX2 and FMA; the GEMMs otherwise. Where the
/// forward pass runs as Winograd's F(2x2, 3x3) (many channels, images at most 64 wide), so does
/// this gradient, 1.8-2.1x faster than either (`winograd::grad_weight`).
pub fn conv3x3_grad_weight(x: &[f32], grad: &[f32], s: ConvShape) -> Vec<f32> {
    if winograd::grad_weight_applies(s) {
        return winograd::grad_weight(x, grad, s);
    }
    if let Some(out) = grad_weight_direct(x, grad, s) {
        return out;
    }
    conv3x3_grad_weight_gemm(x, grad, s)
}

/// Narrower images (the U-Net's deep levels, with many channels) are faster as GEMMs: for the
/// weight gradient below 64 columns (measured: 128 -> 256 channels at 32²: 9.8 ms direct, 3.8
/// ms as GEMMs), for the convolution itself below 32 (there: 2.6 ms direct, 5.0 ms as GEMMs).
pub const DIRECT_MIN_WIDTH: usize = 64;

/// See [`DIRECT_MIN_WIDTH`].
pub const CONV_DIRECT_MIN_WIDTH: usize = 32;

/// Vector lanes the direct weight-gradient kernel runs with on this CPU (16 with AVX-512, 8
/// with AVX2 and FMA), or `None` where it does not run.
fn direct_lanes() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        static LANES: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
        *LANES.get_or_init(|| {
            if std::env::var_os("FLUOROPOSE_NO_DIRECT_KERNELS").is_some() {
                None
            } else if is_x86_feature_detected!("avx512f") {
                Some(16)
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Some(8)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`conv3x3_grad_weight`] with the direct kernel, or `None` where it does not apply.
fn grad_weight_direct(x: &[f32], grad: &[f32], s: ConvShape) -> Option<Vec<f32>> {
    let lanes = direct_lanes()?;
    if s.w < DIRECT_MIN_WIDTH.max(lanes) || s.h == 0 || s.batch == 0 {
        return None;
    }
    let hw = s.h * s.w;
    assert_eq!(x.len(), s.batch * s.cin * hw, "conv3x3: input size");
    assert_eq!(grad.len(), s.batch * s.cout * hw, "conv3x3: gradient size");
    // Per (batch item, input channel): cout x 9 taps of lane accumulators, summed after.
    let partial: Vec<Vec<f32>> = (0..s.batch * s.cin)
        .into_par_iter()
        .map(|task| {
            let (b, ci) = (task / s.cin, task % s.cin);
            let xp = pad(&x[(b * s.cin + ci) * hw..][..hw], 1, s.h, s.w);
            let g = &grad[b * s.cout * hw..][..s.cout * hw];
            let mut acc = vec![0.0f32; s.cout * 9 * lanes];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `direct_lanes` returned 16 only where AVX-512F is present and 8 only
            // where AVX2 and FMA are.
            unsafe {
                if lanes == 16 {
                    grad_weight_rows_avx512(&xp, g, s, &mut acc);
                } else {
                    grad_weight_rows_avx2(&xp, g, s, &mut acc);
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; s.cout * s.cin * 9];
    for (task, acc) in partial.iter().enumerate() {
        let ci = task % s.cin;
        for co in 0..s.cout {
            for tap in 0..9 {
                let l = &acc[(co * 9 + tap) * lanes..][..lanes];
                out[(co * s.cin + ci) * 9 + tap] += l.iter().sum::<f32>();
            }
        }
    }
    Some(out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn grad_weight_rows_avx512(xp: &[f32], g: &[f32], s: ConvShape, acc: &mut [f32]) {
    grad_weight_rows::<simd::Avx512>(xp, g, s, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn grad_weight_rows_avx2(xp: &[f32], g: &[f32], s: ConvShape, acc: &mut [f32]) {
    grad_weight_rows::<simd::Avx2>(xp, g, s, acc);
}

/// The vector operations the direct kernel needs, for each instruction set it runs on.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// A vector of `L` f32 lanes. The functions are `unsafe`: the caller guarantees the CPU
    /// feature and that `p .. p + L` is readable (or writable).
    pub trait Lanes {
        type V: Copy;
        const L: usize;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        /// `a * b + c`.
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
        unsafe fn splat(v: f32) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    }

    /// A [`Lanes`] for one instruction set, from its intrinsics.
    macro_rules! lanes {
        ($name:ident, $v:ty, $l:expr, $load:ident, $store:ident, $fma:ident, $set1:ident,
         $add:ident, $max:ident) => {
            pub struct $name;
            impl Lanes for $name {
                type V = $v;
                const L: usize = $l;
                #[inline(always)]
                unsafe fn load(p: *const f32) -> $v {
                    unsafe { $load(p) }
                }
                #[inline(always)]
                unsafe fn store(p: *mut f32, v: $v) {
                    unsafe { $store(p, v) }
                }
                #[inline(always)]
                unsafe fn fma(a: $v, b: $v, c: $v) -> $v {
                    unsafe { $fma(a, b, c) }
                }
                #[inline(always)]
                unsafe fn splat(v: f32) -> $v {
                    unsafe { $set1(v) }
                }
                #[inline(always)]
                unsafe fn add(a: $v, b: $v) -> $v {
                    unsafe { $add(a, b) }
                }
                #[inline(always)]
                unsafe fn max(a: $v, b: $v) -> $v {
                    unsafe { $max(a, b) }
                }
            }
        };
    }

    lanes!(
        Avx512,
        __m512,
        16,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_set1_ps,
        _mm512_add_ps,
        _mm512_max_ps
    );
    lanes!(
        Avx2,
        __m256,
        8,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_max_ps
    );
}

/// One input channel's share of the weight gradient, for every output channel and tap:
/// `acc[co][ky*3+kx][lane] += Σ_y Σ_j g[co][y][j] · xp[y+ky][j+kx]`, with `xp` the channel's
/// zero-padded `(h+2) x (w+2)` plane. Lanes are summed by the caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn grad_weight_rows<S: simd::Lanes>(xp: &[f32], g: &[f32], s: ConvShape, acc: &mut [f32]) {
    let (h, w, wp) = (s.h, s.w, s.w + 2);
    let hw = h * w;
    // The bounds every pointer below stays within.
    assert!(xp.len() >= (h + 2) * wp, "grad weight: padded input size");
    assert!(g.len() == s.cout * hw, "grad weight: gradient size");
    assert!(
        acc.len() == s.cout * 9 * S::L,
        "grad weight: accumulator size"
    );
    let full = w / S::L * S::L;
    for y in 0..h {
        let mut cb = 0;
        while cb < s.cout {
            let n = (s.cout - cb).min(4);
            for ky in 0..3 {
                let xr = &xp[(y + ky) * wp..][..wp];
                if n == 4 {
                    block::<S, 4>(xr, g, cb, y * w, hw, full, ky, acc);
                } else {
                    for c in cb..cb + n {
                        block::<S, 1>(xr, g, c, y * w, hw, full, ky, acc);
                    }
                }
                // The columns past the last full vector, one at a time into lane 0.
                for c in cb..cb + n {
                    let gr = &g[c * hw + y * w..][..w];
                    for kx in 0..3 {
                        let a = &mut acc[(c * 9 + ky * 3 + kx) * S::L];
                        for j in full..w {
                            *a = gr[j].mul_add(xr[j + kx], *a);
                        }
                    }
                }
            }
            cb += n;
        }
    }
}

/// `C` output channels from `c0` x the 3 taps of row `ky`, over the full vectors of one row:
/// `3 C` accumulators stay in registers; each step loads 3 shifted input vectors and `C`
/// gradient vectors for `3 C` FMAs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<S: simd::Lanes, const C: usize>(
    xr: &[f32],
    g: &[f32],
    c0: usize,
    row: usize,
    hw: usize,
    full: usize,
    ky: usize,
    acc: &mut [f32],
) {
    // Bounds: the input row holds `full + 2` values past each step's start (full <= w and the
    // row is w + 2 long); each gradient row `c0 + c` holds `full` values from `row`; the
    // accumulators of `c0 + C - 1` end inside `acc`.
    assert!(full + 2 <= xr.len());
    assert!((c0 + C - 1) * hw + row + full <= g.len());
    assert!(((c0 + C - 1) * 9 + ky * 3 + 3) * S::L <= acc.len());
    // SAFETY: every pointer below is in bounds by the asserts above (j + S::L <= full); the
    // CPU features are those the caller's `target_feature` enabled, as `direct_lanes` checked.
    unsafe {
        let ap = acc.as_mut_ptr();
        let at = |c: usize, kx: usize| ((c0 + c) * 9 + ky * 3 + kx) * S::L;
        let mut a: [[S::V; 3]; C] = [[S::load(ap); 3]; C];
        for (c, ac) in a.iter_mut().enumerate() {
            for (kx, v) in ac.iter_mut().enumerate() {
                *v = S::load(ap.add(at(c, kx)));
            }
        }
        let (xq, gq) = (xr.as_ptr(), g.as_ptr());
        let mut j = 0;
        while j < full {
            let x0 = S::load(xq.add(j));
            let x1 = S::load(xq.add(j + 1));
            let x2 = S::load(xq.add(j + 2));
            for (c, ac) in a.iter_mut().enumerate() {
                let gv = S::load(gq.add((c0 + c) * hw + row + j));
                ac[0] = S::fma(gv, x0, ac[0]);
                ac[1] = S::fma(gv, x1, ac[1]);
                ac[2] = S::fma(gv, x2, ac[2]);
            }
            j += S::L;
        }
        for (c, ac) in a.iter().enumerate() {
            for (kx, v) in ac.iter().enumerate() {
                S::store(ap.add(at(c, kx)), *v);
            }
        }
    }
}

/// [`conv3x3_grad_weight`] as 9 GEMMs per batch item.
pub fn conv3x3_grad_weight_gemm(x: &[f32], grad: &[f32], s: ConvShape) -> Vec<f32> {
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

/// Runs `f` on the f32 values of `N` CPU tensors in place (no copy; a strided tensor is made
/// contiguous first), each named in `what` for the error. For custom ops' backward passes,
/// whose operands arrive as tensors.
pub(crate) fn with_host_f32<const N: usize, R>(
    tensors: [&Tensor; N],
    op: &str,
    what: [&str; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for ((slot, (storage, layout)), name) in slices.iter_mut().zip(&guards).zip(what) {
        *slot = match &**storage {
            candle_core::Storage::Cpu(s) => cpu_f32(s, layout, op, name)?,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{op}: {name} must be on the CPU"
                )));
            }
        };
    }
    Ok(f(slices))
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
        let (gx, gw) = with_host_f32(
            [x, w, grad],
            "conv3x3",
            ["input", "weight", "gradient"],
            |[xv, wv, gv]| {
                rayon::join(
                    || conv3x3_grad_input(gv, wv, s),
                    || conv3x3_grad_weight(xv, gv, s),
                )
            },
        )?;
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(gw, w.shape(), w.device())?),
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
        shape_of(x.layout(), w.layout())?;
        // A kernel for this one call: a fused network keeps its own (`HostConv`).
        let k = HostKernel::new(
            w.flatten_all()?.to_vec1()?,
            b.flatten_all()?.to_vec1()?,
            relu,
        );
        x.contiguous()?
            .apply_op1_no_bwd(&HostConv(std::sync::Arc::new(k)))
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
            // Wide enough for the direct weight-gradient kernel: a row that is not a whole
            // number of vectors, and output channels that are not a whole number of blocks.
            (2, 8, 8, 9, 70),
            (1, 3, 6, 5, 64),
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

    /// Every direct convolution kernel this CPU can run (AVX2, and AVX-512 where present)
    /// equals the GEMM formulation, with bias and ReLU, on shapes that end in a partial block
    /// of output channels, a single vector and single columns.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn each_direct_convolution_kernel_matches_the_gemms() {
        let mut kernels = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.push(8);
        }
        if is_x86_feature_detected!("avx512f") {
            kernels.push(16);
        }
        if kernels.is_empty() {
            eprintln!("no AVX2/FMA here: no direct kernel runs, nothing to compare");
            return;
        }
        for lanes in kernels {
            for (i, &(cin, cout, h, w)) in [
                (5, 10, 3, 45),
                (12, 12, 4, 64),
                (1, 8, 5, 33),
                (3, 6, 2, 90),
            ]
            .iter()
            .enumerate()
            {
                let s = ConvShape {
                    batch: 1,
                    cin,
                    cout,
                    h,
                    w,
                };
                let xp = pad(&rand(cin * h * w, 500 + i as u64), cin, h, w);
                let wt = rand(cout * cin * 9, 600 + i as u64);
                let bias = rand(cout, 700 + i as u64);
                assert!(
                    DirectWeights::fits(s, lanes),
                    "wide enough for the direct kernel"
                );
                let direct = DirectWeights::new(&wt, Some(&bias), cin, cout, lanes);
                let run = |direct: Option<&DirectWeights>| {
                    let mut out = vec![0.0; cout * h * w];
                    let acc = &mut Vec::new();
                    let fast = Fast { direct, wino: None };
                    conv3x3_item(&xp, &wt, Some(&bias), true, s, fast, acc, &mut out);
                    out
                };
                let (a, b) = (run(Some(&direct)), run(None));
                assert!(
                    max_rel(&a, &b) < 1e-5,
                    "{lanes} lanes, {s:?}: {}",
                    max_rel(&a, &b)
                );
                assert!(a.iter().any(|v| *v > 0.0) && a.contains(&0.0));
            }
        }
    }

    /// Winograd's F(2x2, 3x3) equals the 9-GEMM formulation: on one item with its bands in
    /// parallel, on a batch whose items run in parallel (each item's bands serial), with and
    /// without bias and ReLU, and for band counts that do not divide the tile rows.
    #[test]
    fn winograd_matches_the_gemms() {
        for (i, &(batch, cin, cout, h, w, relu)) in [
            (1, 96, 32, 32, 32, true),
            (1, 100, 7, 14, 6, false),
            (3, 128, 40, 16, 16, true),
            (1, 192, 192, 16, 16, true),
            (2, 96, 12, 10, 64, false),
            (1, 48, 20, 12, 16, true),
        ]
        .iter()
        .enumerate()
        {
            let s = ConvShape {
                batch,
                cin,
                cout,
                h,
                w,
            };
            assert!(winograd::applies(s), "{s:?}");
            let x = rand(batch * cin * h * w, 800 + i as u64);
            let wt = rand(cout * cin * 9, 900 + i as u64);
            let bias = rand(cout, 1000 + i as u64);
            let bias = relu.then_some(&bias[..]);
            let got = conv3x3(&x, &wt, bias, relu, s);
            let mut want = vec![0.0; batch * cout * h * w];
            for (b, dst) in want.chunks_mut(cout * h * w).enumerate() {
                let xp = pad(&x[b * cin * h * w..(b + 1) * cin * h * w], cin, h, w);
                let none = Fast {
                    direct: None,
                    wino: None,
                };
                conv3x3_item(&xp, &wt, bias, relu, s, none, &mut Vec::new(), dst);
            }
            assert!(
                max_rel(&got, &want) < 1e-5,
                "{s:?}: {}",
                max_rel(&got, &want)
            );
            if relu {
                assert!(got.iter().any(|v| *v > 0.0) && got.contains(&0.0));
            } else {
                assert!(got.iter().any(|v| *v < 0.0));
            }
        }
    }

    /// F(2x2, 3x3) runs only on whole tiles of deep, small images; the rest keeps the direct
    /// kernel or the GEMMs.
    #[test]
    fn winograd_runs_only_where_it_pays() {
        let s = |cin, h, w| ConvShape {
            batch: 1,
            cin,
            cout: 64,
            h,
            w,
        };
        assert!(winograd::applies(s(96, 32, 32)));
        assert!(!winograd::applies(s(96, 33, 32)), "odd height");
        assert!(!winograd::applies(s(96, 32, 31)), "odd width");
        assert!(winograd::applies(s(48, 64, 64)));
        assert!(!winograd::applies(s(32, 32, 32)), "few input channels");
        assert!(!winograd::applies(s(96, 128, 128)), "wide image");
        let wt = rand(64 * 32 * 9, 1);
        assert!(
            Layouts::default()
                .fast(&wt, None, s(32, 32, 32))
                .wino
                .is_none()
        );
    }

    /// A fused kernel lays its weights out once and reuses them at every size it meets: as
    /// Winograd's tiles (32²), for the direct kernel (a wide image) and for neither (a small
    /// odd image), each time equal to candle's convolution, and a second pass over the kept
    /// layouts gives the same bits as the first.
    #[test]
    fn kept_layouts_serve_every_image_size() {
        let dev = Device::Cpu;
        let (cin, cout) = (96, 12);
        let wt = rand(cout * cin * 9, 70);
        let bias = rand(cout, 71);
        let op = HostConv(std::sync::Arc::new(HostKernel::new(
            wt.clone(),
            bias.clone(),
            true,
        )));
        let wt_t = Tensor::from_vec(wt, (cout, cin, 3, 3), &dev).unwrap();
        let b_t = Tensor::from_vec(bias, cout, &dev).unwrap();
        for (i, &(batch, h, w)) in [(1, 32, 32), (1, 6, 96), (2, 5, 7), (2, 32, 32), (1, 6, 96)]
            .iter()
            .enumerate()
        {
            let x = Tensor::from_vec(
                rand(batch * cin * h * w, 72 + i as u64),
                (batch, cin, h, w),
                &dev,
            )
            .unwrap();
            let ours = x.apply_op1_no_bwd(&op).unwrap();
            let again = x.apply_op1_no_bwd(&op).unwrap();
            let theirs = x
                .conv2d(&wt_t, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b_t.reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (a, c) = (v(&ours), v(&theirs));
            assert!(
                max_rel(&a, &c) < 1e-4,
                "{batch} x {h} x {w}: {}",
                max_rel(&a, &c)
            );
            assert_eq!(a, v(&again), "{batch} x {h} x {w}: a second pass differs");
        }
        assert!(op.0.layouts.wino.get().is_some(), "32² ran as Winograd");
        assert_eq!(
            op.0.layouts.direct.get().is_some(),
            direct_lanes().is_some(),
            "the wide image ran on the direct kernel where this CPU has one"
        );
    }

    /// The direct weight-gradient kernel equals the GEMM formulation (where this CPU runs it).
    #[test]
    fn winograd_weight_gradient_matches_the_gemms() {
        // One band, several bands, a last band of one tile row, a one-tile-wide image.
        for (i, &(batch, cin, cout, h, w)) in [
            (1, 96, 32, 32, 32),
            (2, 64, 24, 64, 64),
            (2, 48, 12, 10, 64),
            (3, 100, 7, 14, 6),
            (1, 48, 5, 4, 2),
        ]
        .iter()
        .enumerate()
        {
            let s = ConvShape {
                batch,
                cin,
                cout,
                h,
                w,
            };
            assert!(winograd::grad_weight_applies(s), "{s:?}");
            let x = rand(batch * cin * h * w, 1300 + i as u64);
            let g = rand(batch * cout * h * w, 1400 + i as u64);
            let got = conv3x3_grad_weight(&x, &g, s);
            let want = conv3x3_grad_weight_gemm(&x, &g, s);
            assert!(
                max_rel(&got, &want) < 1e-4,
                "{s:?}: {}",
                max_rel(&got, &want)
            );
        }
    }

    #[test]
    fn direct_weight_gradient_matches_the_gemms() {
        for (i, &(batch, cin, cout, h, w)) in [
            (4, 8, 8, 16, 256),
            (2, 1, 8, 7, 64),
            (3, 24, 8, 4, 129),
            (1, 5, 7, 3, 100),
        ]
        .iter()
        .enumerate()
        {
            let s = ConvShape {
                batch,
                cin,
                cout,
                h,
                w,
            };
            let x = rand(batch * cin * h * w, 300 + i as u64);
            let g = rand(batch * cout * h * w, 400 + i as u64);
            let Some(direct) = grad_weight_direct(&x, &g, s) else {
                eprintln!("no AVX2/FMA here: the direct kernel does not run, nothing to compare");
                return;
            };
            let gemm = conv3x3_grad_weight_gemm(&x, &g, s);
            assert!(
                max_rel(&direct, &gemm) < 1e-4,
                "{s:?}: {}",
                max_rel(&direct, &gemm)
            );
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

    /// The fused decoder and encoder steps against candle's separate ops, odd sizes included,
    /// narrow (GEMM kernels) and wide (direct kernels where the CPU has them).
    #[test]
    fn fused_upsample_concat_and_pool_convs_match_candle() {
        for (lw, xw) in [(7, 11), (35, 141)] {
            upcat_and_pool_case(lw, xw);
        }
    }

    fn upcat_and_pool_case(lw: usize, xw: usize) {
        let dev = Device::Cpu;
        let low = Tensor::from_vec(rand(2 * 3 * 5 * lw, 31), (2, 3, 5, lw), &dev).unwrap();
        let skip =
            Tensor::from_vec(rand(2 * 4 * 10 * 2 * lw, 32), (2, 4, 10, 2 * lw), &dev).unwrap();
        let w = Tensor::from_vec(rand(6 * 7 * 9, 33), (6, 7, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(rand(6, 34), 6, &dev).unwrap();
        let op = UpCatConv(std::sync::Arc::new(HostKernel::new(
            w.flatten_all().unwrap().to_vec1().unwrap(),
            b.to_vec1().unwrap(),
            true,
        )));
        let ours = low.apply_op2_no_bwd(&skip, &op).unwrap();
        let up = low.upsample_nearest2d(10, 2 * lw).unwrap();
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

        let x = Tensor::from_vec(rand(2 * 3 * 9 * xw, 35), (2, 3, 9, xw), &dev).unwrap();
        let w = Tensor::from_vec(rand(5 * 3 * 9, 36), (5, 3, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(rand(5, 37), 5, &dev).unwrap();
        let op = PoolConv(std::sync::Arc::new(HostKernel::new(
            w.flatten_all().unwrap().to_vec1().unwrap(),
            b.to_vec1().unwrap(),
            false,
        )));
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

    /// The decoder's convolution over the upsampled image, computed as 4 phase convolutions at
    /// the low resolution, equals candle's upsample, concatenation and convolution: whole
    /// blocks, single vectors and single columns (widths 64, 40, 33), a partial block of
    /// channels (6), a batch, with and without ReLU.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn polyphase_upsampled_convolution_matches_candle() {
        let dev = Device::Cpu;
        for (i, &(batch, cl, cs, hl, wl, cout, relu)) in [
            (1, 24, 12, 6, 64, 12, true),
            (2, 9, 5, 3, 33, 6, false),
            (1, 16, 8, 5, 40, 8, true),
        ]
        .iter()
        .enumerate()
        {
            let (h, w) = (2 * hl, 2 * wl);
            if polyphase::lanes(cl, cs, (hl, wl), (h, w), cout).is_none() {
                eprintln!("no direct kernel on this CPU: the polyphase path does not run");
                return;
            }
            let seed = 40 + 10 * i as u64;
            let low = Tensor::from_vec(rand(batch * cl * hl * wl, seed), (batch, cl, hl, wl), &dev)
                .unwrap();
            let skip =
                Tensor::from_vec(rand(batch * cs * h * w, seed + 1), (batch, cs, h, w), &dev)
                    .unwrap();
            let cin = cl + cs;
            let wt =
                Tensor::from_vec(rand(cout * cin * 9, seed + 2), (cout, cin, 3, 3), &dev).unwrap();
            let b = Tensor::from_vec(rand(cout, seed + 3), cout, &dev).unwrap();
            let op = UpCatConv(std::sync::Arc::new(HostKernel::new(
                wt.flatten_all().unwrap().to_vec1().unwrap(),
                b.to_vec1().unwrap(),
                relu,
            )));
            let ours = low.apply_op2_no_bwd(&skip, &op).unwrap();
            // The kernel's split is kept from the first pass: the second gives the same bits.
            let again = low.apply_op2_no_bwd(&skip, &op).unwrap();
            let up = low.upsample_nearest2d(h, w).unwrap();
            let cat = Tensor::cat(&[&up, &skip], 1).unwrap();
            let mut theirs = cat
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            if relu {
                theirs = theirs.relu().unwrap();
            }
            assert_eq!(ours.dims(), theirs.dims());
            let (a, c): (Vec<f32>, Vec<f32>) = (
                ours.flatten_all().unwrap().to_vec1().unwrap(),
                theirs.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(max_rel(&a, &c) < 1e-4, "case {i}: {}", max_rel(&a, &c));
            let again: Vec<f32> = again.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, again, "case {i}: the kept split differs");
            assert!(a.iter().any(|v| *v > 0.0));
            assert_eq!(a.contains(&0.0), relu, "case {i}: ReLU");
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv3x3_t(&x, &w).is_err());
        let w5 = Tensor::zeros((4, 3, 5, 5), DType::F32, &dev).unwrap();
        assert!(conv3x3_t(&x, &w5).is_err());
        // A fused kernel of 2 input channels given 3, and an image too small to pool.
        let k = std::sync::Arc::new(HostKernel::new(vec![0.0; 4 * 2 * 9], vec![0.0; 4], true));
        let err = x.apply_op1_no_bwd(&HostConv(k.clone())).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(x.apply_op1_no_bwd(&PoolConv(k.clone())).is_err());
        let tiny = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        let err = tiny.apply_op1_no_bwd(&PoolConv(k)).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }
}
