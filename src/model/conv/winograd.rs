//! Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016) for the U-Net's deep levels.
//!
//! Each 2x2 block of outputs (a *tile*) is computed from the 4x4 padded input patch under it:
//! `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`. The element-wise product, summed over input channels,
//! is 16 independent GEMMs `M_ξ (cout x tiles) = U_ξ (cout x cin) · V_ξ (cin x tiles)`, one per
//! element ξ of the 4x4 transformed patch: 16 multiplications per 4 outputs against 36, so
//! 2.25x less arithmetic than the direct convolution. The transforms cost additions and memory
//! traffic (the transformed input is 4x the input), which pays off only where the channels are
//! many and the images small: on the 2-core AVX2 EPYC, 288 -> 96 channels at 32² took 4.0-4.7
//! ms against 6.4-8.2 ms for the direct kernel and 192 -> 192 at 16² 1.8-2.1 against 2.4-3.8,
//! while 12 -> 12 at 256² took 2.6-3.4 ms against 1.3-1.9 for the direct kernel, measured
//! warm (`examples/forward_layers` times the network's convolutions; `FLUOROPOSE_NO_WINOGRAD=1`
//! switches this off). From 48 input channels it wins at 64² and below ([`MIN_CIN`]). See
//! [`applies`] for where it runs.
//!
//! The weight gradient runs through the same transforms ([`grad_weight`]): 16 GEMMs
//! `∂L/∂U_ξ (cout x cin) = Σ_tiles (A ∂Y Aᵀ)_ξ V_ξᵀ`, then `∂L/∂g = Gᵀ (∂L/∂U) G`. The input
//! gradient is a convolution itself (the kernel flipped and transposed) and takes the forward
//! path.
//!
//! The tiles are processed in bands of about [`BAND_TILES`] tiles, so that a band's transformed
//! input and products stay in cache (L2, or L3 for the widest layers) between the transform,
//! the GEMMs and the inverse transform; bands run in parallel, each with serial GEMMs.

use super::{ConvShape, SharedOut, gemm_strided, serial};
use rayon::prelude::*;

/// Fewer input channels than this stay with the direct kernel or the 9-GEMM formulation: the
/// transforms' memory traffic outweighs the saved multiplications. Measured warm (stop 35, 8
/// interleaved runs of `examples/forward_layers`, medians): at 48, 48 -> 48 at 64² takes
/// 1.27-1.29 ms against 1.61-1.65 direct, 64 -> 128 at 16² (the compact network's, too narrow
/// for the direct kernel) 0.36 against 1.21 with the GEMMs; at 32, 32 -> 32 at 64² and
/// 32 -> 64 at 32² are slower than the direct kernel (0.92 against 0.78, 0.45 against 0.41).
const MIN_CIN: usize = 48;

/// Wider images than this stay with the direct kernel (the transforms are memory-bound there).
const MAX_WIDTH: usize = 64;

/// Tiles per band: the GEMMs' `n`. At 64 the transformed input of a 288-channel band is 1.2 MB.
const BAND_TILES: usize = 64;

/// Whether F(2x2, 3x3) runs for `s`: even sizes (whole tiles), enough input channels, a small
/// enough image, and not switched off with `FLUOROPOSE_NO_WINOGRAD` (for comparisons).
pub(super) fn applies(s: ConvShape) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    s.h >= 2
        && s.w >= 2
        && s.h.is_multiple_of(2)
        && s.w.is_multiple_of(2)
        && s.w <= MAX_WIDTH
        && s.cin >= min_cin()
        && s.cout > 0
        && !*OFF.get_or_init(|| std::env::var_os("FLUOROPOSE_NO_WINOGRAD").is_some())
}

/// [`MIN_CIN`], or `FLUOROPOSE_WINOGRAD_MIN_CIN` where set (to measure the cut-off again).
fn min_cin() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("FLUOROPOSE_WINOGRAD_MIN_CIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_CIN)
    })
}

/// The transformed kernel `U = G g Gᵀ` of every (output, input) channel pair, stored as 16
/// matrices `U_ξ` of `cout x cin` (row-major), ξ = 4 i + j over the 4x4 transformed tap.
pub(super) struct WinogradWeights {
    u: Vec<f32>,
}

impl WinogradWeights {
    /// From OIHW weights `wt` (`cout x cin x 3 x 3`).
    pub(super) fn new(wt: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(wt.len(), cout * cin * 9, "conv3x3: weight size");
        let mut u = vec![0.0f32; 16 * cout * cin];
        // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
        let g_rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &wt[(co * cin + ci) * 9..][..9];
                // G g: 4 x 3, by columns.
                let cols: [[f32; 4]; 3] = std::array::from_fn(|c| g_rows(g[c], g[3 + c], g[6 + c]));
                for i in 0..4 {
                    // (G g) Gᵀ: row i of G g, transformed the same way.
                    let row = g_rows(cols[0][i], cols[1][i], cols[2][i]);
                    for (j, v) in row.into_iter().enumerate() {
                        u[((i * 4 + j) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
        Self { u }
    }
}

/// Per-band buffers, reused by each task of the pool.
#[derive(Default)]
struct Scratch {
    /// `Bᵀ d B`: 16 x cin x tiles.
    v: Vec<f32>,
    /// The products `U_ξ V_ξ`: 16 x cout x tiles.
    m: Vec<f32>,
    /// `Bᵀ d` of one tile row of one channel: 4 rows of the padded width.
    rows: Vec<f32>,
    /// `Aᵀ M` of one output channel: 2 x 4 x tiles, then the outputs 2 x 2 x tiles.
    half: Vec<f32>,
    out: Vec<f32>,
}

/// The convolution of one padded batch item `xp` (`cin x (h+2)(w+2)`, as `pad` makes it) into
/// `dst` (`cout x h x w`), with `bias` (per output channel) and ReLU.
pub(super) fn conv(
    xp: &[f32],
    wg: &WinogradWeights,
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
    dst: &mut [f32],
) {
    let (th, tw) = (s.h / 2, s.w / 2);
    assert!(
        xp.len() >= s.cin * s.padded_plane(),
        "winograd: padded input size"
    );
    assert_eq!(dst.len(), s.cout * s.h * s.w, "winograd: output size");
    assert_eq!(wg.u.len(), 16 * s.cout * s.cin, "winograd: weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.cout, "winograd: bias size");
    }
    let out = SharedOut(dst.as_mut_ptr(), dst.len());
    let parallel = !super::SERIAL_GEMM.with(|c| c.get());
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // At least one band per thread, else bands of about BAND_TILES tiles.
    let band = (BAND_TILES / tw).clamp(1, th.div_ceil(threads).max(1));
    let bands = th.div_ceil(band);
    let run = |scratch: &mut Scratch, b: usize| {
        let rows = b * band..((b + 1) * band).min(th);
        serial(|| band_conv(xp, wg, bias, relu, s, rows, scratch, &out));
    };
    if parallel {
        (0..bands)
            .into_par_iter()
            .for_each_init(Scratch::default, |sc, b| run(sc, b));
    } else {
        let mut sc = Scratch::default();
        (0..bands).for_each(|b| run(&mut sc, b));
    }
}

/// Tile rows `rows` (output rows `2 rows.start .. 2 rows.end`) of every output channel.
#[allow(clippy::too_many_arguments)]
fn band_conv(
    xp: &[f32],
    wg: &WinogradWeights,
    bias: Option<&[f32]>,
    relu: bool,
    s: ConvShape,
    rows: std::ops::Range<usize>,
    sc: &mut Scratch,
    out: &SharedOut,
) {
    let (cin, cout) = (s.cin, s.cout);
    let tw = s.w / 2;
    let tb = rows.len() * tw;
    sc.m.resize(16 * cout * tb, 0.0);
    sc.half.resize(8 * tb, 0.0);
    sc.out.resize(2 * tb, 0.0);

    transform_input(xp, s, rows.clone(), &mut sc.v, &mut sc.rows);

    // M_ξ = U_ξ · V_ξ.
    for xi in 0..16 {
        gemm_strided(
            (cout, tb, cin),
            &mut sc.m[xi * cout * tb..(xi + 1) * cout * tb],
            tb,
            false,
            &wg.u[xi * cout * cin..(xi + 1) * cout * cin],
            (cin, 1),
            &sc.v[xi * cin * tb..(xi + 1) * cin * tb],
            (tb, 1),
        );
    }

    // Y = Aᵀ M A, Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]], plus bias and ReLU, into the output rows.
    let (h, w) = (s.h, s.w);
    for co in 0..cout {
        let m = |xi: usize| &sc.m[(xi * cout + co) * tb..][..tb];
        // Aᵀ M: rows 0 and 1 (of the 2 x 4 result) for each column j.
        for j in 0..4 {
            let (a, b, c, d) = (m(j), m(4 + j), m(8 + j), m(12 + j));
            let (p, q) = sc.half.split_at_mut(4 * tb);
            let (p, q) = (&mut p[j * tb..][..tb], &mut q[j * tb..][..tb]);
            for k in 0..tb {
                p[k] = a[k] + b[k] + c[k];
                q[k] = b[k] - c[k] - d[k];
            }
        }
        let bv = bias.map_or(0.0, |b| b[co]);
        let act = |v: f32| if relu { v.max(0.0) } else { v };
        for r in 0..2 {
            let half = &sc.half[r * 4 * tb..][..4 * tb];
            let (a, b, c, d) = (
                &half[..tb],
                &half[tb..2 * tb],
                &half[2 * tb..3 * tb],
                &half[3 * tb..],
            );
            let (even, odd) = sc.out.split_at_mut(tb);
            for k in 0..tb {
                even[k] = act(a[k] + b[k] + c[k] + bv);
                odd[k] = act(b[k] - c[k] - d[k] + bv);
            }
            for (k, ty) in rows.clone().enumerate() {
                let y = 2 * ty + r;
                // SAFETY: co < cout, y < h: the row lies inside `out` (`cout x h x w`), and
                // only the band of tile row `ty` writes it.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(co * h * w + y * w), w) };
                let (e, o) = (&even[k * tw..][..tw], &odd[k * tw..][..tw]);
                for tx in 0..tw {
                    row[2 * tx] = e[tx];
                    row[2 * tx + 1] = o[tx];
                }
            }
        }
    }
}

/// `V = Bᵀ d B` of every tile in tile rows `rows` of the padded batch item `xp`, into `v`
/// (`16 x cin x tiles`, ξ-major); `buf` is scratch.
fn transform_input(
    xp: &[f32],
    s: ConvShape,
    rows: std::ops::Range<usize>,
    v: &mut Vec<f32>,
    buf: &mut Vec<f32>,
) {
    let (cin, wp, plane) = (s.cin, s.w + 2, s.padded_plane());
    let tw = s.w / 2;
    let tb = rows.len() * tw;
    v.resize(16 * cin * tb, 0.0);
    buf.resize(4 * wp, 0.0);
    // V = Bᵀ d B, Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: first down
    // the 4 input rows under a tile row (whole rows, vectorisable), then across each tile.
    for ci in 0..cin {
        for (k, ty) in rows.clone().enumerate() {
            let r = |i: usize| &xp[ci * plane + (2 * ty + i) * wp..][..wp];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let (t0, rest) = buf.split_at_mut(wp);
            let (t1, rest) = rest.split_at_mut(wp);
            let (t2, t3) = rest.split_at_mut(wp);
            for x in 0..wp {
                t0[x] = r0[x] - r2[x];
                t1[x] = r1[x] + r2[x];
                t2[x] = r2[x] - r1[x];
                t3[x] = r1[x] - r3[x];
            }
            for (i, t) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                let [v0, v1, v2, v3] = runs4(
                    v,
                    std::array::from_fn(|j| ((i * 4 + j) * cin + ci) * tb + k * tw),
                    tw,
                );
                let t = &t[..2 * tw + 2];
                for tx in 0..tw {
                    let (a, b, c, d) = (t[2 * tx], t[2 * tx + 1], t[2 * tx + 2], t[2 * tx + 3]);
                    v0[tx] = a - c;
                    v1[tx] = b + c;
                    v2[tx] = c - b;
                    v3[tx] = b - d;
                }
            }
        }
    }
}

/// The four runs of `len` elements of `v` that start at the increasing offsets `at` (a tile
/// row's 4 of the 16 transformed planes). Exact lengths, so that the loops writing them run
/// without bounds checks and vectorise.
fn runs4(v: &mut [f32], at: [usize; 4], len: usize) -> [&mut [f32]; 4] {
    let (a, rest) = v.split_at_mut(at[1]);
    let (b, rest) = rest.split_at_mut(at[2] - at[1]);
    let (c, d) = rest.split_at_mut(at[3] - at[2]);
    [
        &mut a[at[0]..][..len],
        &mut b[..len],
        &mut c[..len],
        &mut d[..len],
    ]
}

/// Tiles per band of the weight gradient: the GEMMs' reduction length per call.
const GRAD_BAND_TILES: usize = 128;

/// The weight gradient of the convolution (`cout x cin x 3 x 3`, OIHW, summed over the batch)
/// from the input `x` (`batch x cin x h x w`) and the output's gradient `grad`
/// (`batch x cout x h x w`), through the same transforms: `Y = Aᵀ [U ⊙ V] A` gives
/// `∂L/∂U_ξ = Σ_tiles (A ∂Y Aᵀ)_ξ ⊙ V_ξ`, 16 GEMMs `cout x cin` whose reduction runs over the
/// tiles of the whole batch, and `∂L/∂g = Gᵀ (∂L/∂U) G`. Tasks over (batch item, band of tile
/// rows), each with its own accumulator, summed at the end.
pub(super) fn grad_weight(x: &[f32], grad: &[f32], s: ConvShape) -> Vec<f32> {
    let (cin, cout, h, w) = (s.cin, s.cout, s.h, s.w);
    let (th, tw, hw) = (h / 2, w / 2, h * w);
    assert!(h % 2 == 0 && w % 2 == 0, "winograd: odd image size");
    assert_eq!(x.len(), s.batch * cin * hw, "conv3x3: input size");
    assert_eq!(grad.len(), s.batch * cout * hw, "conv3x3: gradient size");
    let band = (GRAD_BAND_TILES / tw.max(1)).clamp(1, th.max(1));
    let bands = th.div_ceil(band);
    let du = (0..s.batch * bands)
        .into_par_iter()
        .fold(
            || (GradScratch::default(), vec![0.0f32; 16 * cout * cin]),
            |(mut sc, mut acc), task| {
                let (b, k) = (task / bands, task % bands);
                let rows = k * band..((k + 1) * band).min(th);
                let xb = &x[b * cin * hw..(b + 1) * cin * hw];
                let gb = &grad[b * cout * hw..(b + 1) * cout * hw];
                serial(|| band_grad_weight(xb, gb, s, rows, &mut sc, &mut acc));
                (sc, acc)
            },
        )
        .map(|(_, acc)| acc)
        .reduce(
            || vec![0.0f32; 16 * cout * cin],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    // ∂L/∂g = Gᵀ D G with Gᵀ = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
    let gt = |d: [f32; 4]| {
        [
            d[0] + 0.5 * (d[1] + d[2]),
            0.5 * (d[1] - d[2]),
            0.5 * (d[1] + d[2]) + d[3],
        ]
    };
    let mut out = vec![0.0f32; cout * cin * 9];
    for co in 0..cout {
        for ci in 0..cin {
            let d = |xi: usize| du[(xi * cout + co) * cin + ci];
            // Gᵀ D: 3 x 4, column by column.
            let cols: [[f32; 3]; 4] =
                std::array::from_fn(|j| gt([d(j), d(4 + j), d(8 + j), d(12 + j)]));
            let o = &mut out[(co * cin + ci) * 9..][..9];
            for r in 0..3 {
                let row = gt([cols[0][r], cols[1][r], cols[2][r], cols[3][r]]);
                o[r * 3..r * 3 + 3].copy_from_slice(&row);
            }
        }
    }
    out
}

/// Per-task buffers of [`grad_weight`].
#[derive(Default)]
struct GradScratch {
    /// The band's input, zero-padded as [`super::pad`] pads a whole image.
    xp: Vec<f32>,
    /// `Bᵀ d B`: 16 x cin x tiles.
    v: Vec<f32>,
    /// `A ∂Y Aᵀ`: 16 x cout x tiles.
    m: Vec<f32>,
    rows: Vec<f32>,
}

/// Adds tile rows `rows` of one batch item (`x`: `cin x h x w`, `g`: `cout x h x w`) to `acc`
/// (`∂L/∂U`, 16 x cout x cin).
fn band_grad_weight(
    x: &[f32],
    g: &[f32],
    s: ConvShape,
    rows: std::ops::Range<usize>,
    sc: &mut GradScratch,
    acc: &mut [f32],
) {
    let (cin, cout, h, w) = (s.cin, s.cout, s.h, s.w);
    let tw = w / 2;
    let nr = rows.len();
    let tb = nr * tw;
    // The band's padded rows 2 ty0 .. 2 ty1 + 2 (image rows one above to one below), as a
    // padded image of 2 nr rows of its own, so that the forward's input transform reads it.
    let sb = ConvShape { h: 2 * nr, ..s };
    let (wp, plane) = (w + 2, sb.padded_plane());
    sc.xp.clear();
    sc.xp.resize(cin * plane, 0.0);
    for ci in 0..cin {
        for r in 0..2 * nr + 2 {
            let Some(y) = (2 * rows.start + r).checked_sub(1).filter(|&y| y < h) else {
                continue;
            };
            sc.xp[ci * plane + r * wp + 1..][..w].copy_from_slice(&x[(ci * h + y) * w..][..w]);
        }
    }
    transform_input(&sc.xp, sb, 0..nr, &mut sc.v, &mut sc.rows);

    // A ∂Y Aᵀ per 2x2 gradient tile, A = [[1, 0], [1, 1], [1, -1], [0, -1]]: each pair (a, b)
    // becomes (a, a + b, a - b, -b), first down the two gradient rows of a tile row (whole
    // rows, vectorisable), then across each tile into 4 contiguous runs of the tile row.
    sc.m.resize(16 * cout * tb, 0.0);
    sc.rows.resize(4 * w, 0.0);
    for co in 0..cout {
        for (k, ty) in rows.clone().enumerate() {
            let r0 = &g[(co * h + 2 * ty) * w..][..w];
            let r1 = &g[(co * h + 2 * ty + 1) * w..][..w];
            let (d0, rest) = sc.rows.split_at_mut(w);
            let (d1, rest) = rest.split_at_mut(w);
            let (d2, d3) = rest.split_at_mut(w);
            for x in 0..w {
                d0[x] = r0[x];
                d1[x] = r0[x] + r1[x];
                d2[x] = r0[x] - r1[x];
                d3[x] = -r1[x];
            }
            for (i, d) in [&*d0, &*d1, &*d2, &*d3].into_iter().enumerate() {
                let [m0, m1, m2, m3] = runs4(
                    &mut sc.m,
                    std::array::from_fn(|j| ((i * 4 + j) * cout + co) * tb + k * tw),
                    tw,
                );
                for (tx, p) in d.chunks_exact(2).enumerate() {
                    let (a, b) = (p[0], p[1]);
                    m0[tx] = a;
                    m1[tx] = a + b;
                    m2[tx] = a - b;
                    m3[tx] = -b;
                }
            }
        }
    }

    // ∂L/∂U_ξ += (A ∂Y Aᵀ)_ξ · V_ξᵀ over the band's tiles.
    for xi in 0..16 {
        gemm_strided(
            (cout, cin, tb),
            &mut acc[xi * cout * cin..(xi + 1) * cout * cin],
            cin,
            true,
            &sc.m[xi * cout * tb..(xi + 1) * cout * tb],
            (tb, 1),
            &sc.v[xi * cin * tb..(xi + 1) * cin * tb],
            (1, tb),
        );
    }
}

/// Whether [`grad_weight`] runs for `s`: where the forward's Winograd does ([`applies`]).
/// Measured (stop 36, `examples/train_profile 16 12`, batch 16): 144 -> 48 at 64² 75-79 ms
/// against 147 with the direct kernel, 288 -> 96 at 32² 57-61 against 104 and 192 -> 192 at
/// 16² 24-26 against 52 with the GEMMs; with fewer channels or wider images it loses (24 -> 48
/// at 64² 29-32 against 18-22 direct, 72 -> 24 at 128² 110-129 against 76-84).
pub(super) fn grad_weight_applies(s: ConvShape) -> bool {
    s.batch > 0 && applies(s)
}
