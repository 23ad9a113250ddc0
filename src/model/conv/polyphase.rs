//! The decoder's convolution over an upsampled image, `conv3x3(concat([up2(low), skip]))`,
//! computed without convolving the upsampled copy.
//!
//! Nearest-neighbour upsampling by 2 repeats each low-resolution pixel in a 2 x 2 block, so at
//! an output pixel of row parity `a` and column parity `b` the 3 x 3 kernel covers only 2 x 2
//! distinct low-resolution pixels: its 9 taps fold into 4 (output row `2i + a`, kernel row `ky`
//! reads low row `i + ceil((ky + a) / 2) - 1`, and the same for columns). The low part of the
//! convolution is therefore 4 convolutions with 2 x 2 kernels at the low resolution, one per
//! output phase, which the direct kernel runs as 4 x `cout` output channels, each block reading
//! its 2 x 2 window of taps: 16 multiply-adds per 2 x 2 outputs and input channel against 36.
//! The skip channels are convolved as usual (with the bias), the phases interleaved into that
//! result, and ReLU applied last. In the U-Net two thirds of a decoder convolution's input
//! channels are the upsampled ones.

use super::{
    CONV_DIRECT_MIN_WIDTH, ConvShape, DIRECT_MIN_COUT, HostKernel, Layouts, co_block, conv3x3_from,
    direct_lanes, direct_rows, pad,
};
use rayon::prelude::*;

/// The vector lanes of the direct kernel that runs the phases, where this path applies: exactly
/// twice the low resolution (nearest upsampling then maps output `y` to `y / 2`), low images
/// wide enough for the direct kernel, and not switched off with `FLUOROPOSE_NO_POLYPHASE`.
pub(super) fn lanes(
    cl: usize,
    cs: usize,
    (hl, wl): (usize, usize),
    (h, w): (usize, usize),
    cout: usize,
) -> Option<usize> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let lanes = direct_lanes()?;
    (h == 2 * hl
        && w == 2 * wl
        && hl > 0
        && wl >= CONV_DIRECT_MIN_WIDTH.max(2 * lanes)
        && cl > 0
        && cs > 0
        && cout >= DIRECT_MIN_COUT
        && !*OFF.get_or_init(|| std::env::var_os("FLUOROPOSE_NO_POLYPHASE").is_some()))
    .then_some(lanes)
}

/// The low channels' kernel folded per output phase, for the direct kernel: `[ci][tap][4 coutp]`
/// with phase `p = 2a + b` at channels `p coutp ..`, each phase's `cout` padded to whole blocks
/// (so a block never mixes phases); only the phase's 2 x 2 window of taps is non-zero.
struct PhaseWeights {
    lanes: usize,
    coutp: usize,
    w2: Vec<f32>,
    /// The phases carry no bias (the skip channels' convolution adds it).
    zeros: Vec<f32>,
}

impl PhaseWeights {
    /// From the whole kernel `wt` (`cout x cin x 3 x 3`, the low channels first).
    fn new(wt: &[f32], cl: usize, cin: usize, cout: usize, lanes: usize) -> Self {
        assert_eq!(wt.len(), cout * cin * 9, "up-cat-conv: weight size");
        let coutp = cout.next_multiple_of(co_block(lanes));
        let width = 4 * coutp;
        let mut w2 = vec![0.0f32; cl * 9 * width];
        for co in 0..cout {
            for ci in 0..cl {
                for (tap, &v) in wt[(co * cin + ci) * 9..][..9].iter().enumerate() {
                    let (ky, kx) = (tap / 3, tap % 3);
                    for a in 0..2 {
                        for b in 0..2 {
                            // The tap of the padded low image this one reads at this phase.
                            let (fy, fx) = ((ky + a).div_ceil(2), (kx + b).div_ceil(2));
                            w2[(ci * 9 + fy * 3 + fx) * width + (2 * a + b) * coutp + co] += v;
                        }
                    }
                }
            }
        }
        Self {
            lanes,
            coutp,
            w2,
            zeros: vec![0.0; width],
        }
    }
}

/// A decoder kernel split for this path, made on its first frame and kept by its
/// [`HostKernel`]: the skip channels' kernel (with its own fast layouts) and the low channels'
/// folded per phase.
pub(super) struct UpCatWeights {
    /// Channels of the low-resolution input the split was made for.
    cl: usize,
    skip: Vec<f32>,
    skip_layouts: Layouts,
    phases: PhaseWeights,
}

impl UpCatWeights {
    fn new(k: &HostKernel, cl: usize, lanes: usize) -> Self {
        let cout = k.bias.len();
        let cin = k.weight.len() / (9 * cout);
        let skip = (0..cout)
            .flat_map(|co| {
                k.weight[(co * cin + cl) * 9..(co + 1) * cin * 9]
                    .iter()
                    .copied()
            })
            .collect();
        Self {
            cl,
            skip,
            skip_layouts: Layouts::default(),
            phases: PhaseWeights::new(&k.weight, cl, cin, cout, lanes),
        }
    }
}

/// `relu?(conv3x3(concat([upsample_nearest(low), skip])) + bias)` for a batch, `None` where
/// [`lanes`] does not hold (the caller then pads the upsampled concatenation).
#[allow(clippy::too_many_arguments)]
pub(super) fn upcat_conv(
    low: &[f32],
    cl: usize,
    (hl, wl): (usize, usize),
    skip: &[f32],
    cs: usize,
    (h, w): (usize, usize),
    batch: usize,
    k: &HostKernel,
) -> Option<Vec<f32>> {
    let cout = k.bias.len();
    let lanes = lanes(cl, cs, (hl, wl), (h, w), cout)?;
    assert_eq!(
        k.weight.len(),
        cout * (cl + cs) * 9,
        "up-cat-conv: weight size"
    );
    assert_eq!(
        low.len(),
        batch * cl * hl * wl,
        "up-cat-conv: low input size"
    );
    assert_eq!(
        skip.len(),
        batch * cs * h * w,
        "up-cat-conv: skip input size"
    );
    // One kernel always meets the same split in a network; another split is made for this call.
    let other;
    let uw = match k.upcat.get_or_init(|| UpCatWeights::new(k, cl, lanes)) {
        uw if uw.cl == cl => uw,
        _ => {
            other = UpCatWeights::new(k, cl, lanes);
            &other
        }
    };
    // The skip channels with the bias, no ReLU yet.
    let s_skip = ConvShape {
        batch,
        cin: cs,
        cout,
        h,
        w,
    };
    let mut out = conv3x3_from(
        |i| pad(&skip[i * cs * h * w..(i + 1) * cs * h * w], cs, h, w),
        &uw.skip,
        Some(&k.bias),
        false,
        s_skip,
        &uw.skip_layouts,
    );
    let pw = &uw.phases;
    let s_low = ConvShape {
        batch: 1,
        cin: cl,
        cout: 4 * pw.coutp,
        h: hl,
        w: wl,
    };
    let mut phases = vec![0.0f32; 4 * pw.coutp * hl * wl];
    for (i, dst) in out.chunks_mut(cout * h * w).enumerate() {
        let lp = pad(&low[i * cl * hl * wl..(i + 1) * cl * hl * wl], cl, hl, wl);
        phase_conv(&lp, pw, s_low, &mut phases);
        interleave(&phases, pw.coutp, (hl, wl), k.relu, dst);
    }
    Some(out)
}

/// The 4 phases' convolutions of one padded low image `xp` into `dst` (`4 coutp x hl x wl`),
/// on the direct kernel with each block over its phase's window of taps.
fn phase_conv(xp: &[f32], pw: &PhaseWeights, s: ConvShape, dst: &mut [f32]) {
    direct_rows(
        xp,
        &pw.w2,
        &pw.zeros,
        false,
        s,
        pw.lanes,
        dst,
        Some(pw.coutp),
    );
}

/// Adds the phases (`4 coutp x hl x wl`) into their pixels of `dst` (`cout x 2hl x 2wl`, the
/// skip channels' convolution with the bias), then ReLU.
fn interleave(phases: &[f32], coutp: usize, (hl, wl): (usize, usize), relu: bool, dst: &mut [f32]) {
    let (h, w) = (2 * hl, 2 * wl);
    let act = |v: f32| if relu { v.max(0.0) } else { v };
    dst.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(co, plane)| {
            for (y, row) in plane.chunks_mut(w).enumerate() {
                let (a, i) = (y % 2, y / 2);
                let phase =
                    |b: usize| &phases[((2 * a + b) * coutp + co) * hl * wl + i * wl..][..wl];
                let (even, odd) = (phase(0), phase(1));
                for (px, (e, o)) in row.chunks_exact_mut(2).zip(even.iter().zip(odd)) {
                    px[0] = act(px[0] + e);
                    px[1] = act(px[1] + o);
                }
            }
        });
}
