//! Heatmaps <-> points: training targets and loss (paper section 2.4's mask + BCE with logits),
//! soft-argmax with temperature τ (eqs. 1-2, differentiable, batched on the device) and argmax
//! with a sub-pixel refinement and a confidence for evaluation and the app.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use nalgebra::Point2;
use rayon::prelude::*;

/// Target masks `(B, N, S, S)`: a Gaussian of `sigma` pixels at each visible landmark (pixel
/// coordinates at the input size), all zero for a landmark that is absent or outside the image.
pub fn targets(
    points: &[Vec<Option<Point2<f64>>>],
    size: usize,
    sigma: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = points.first().map_or(0, |p| p.len());
    let mut data = vec![0.0f32; points.len() * n * size * size];
    let r = (3.0 * sigma).ceil() as i64;
    for (b, item) in points.iter().enumerate() {
        for (i, p) in item.iter().enumerate() {
            let Some(p) = p else { continue };
            if !(p.x.is_finite() && p.y.is_finite()) {
                continue;
            }
            let plane = &mut data[(b * n + i) * size * size..][..size * size];
            let (cx, cy) = (p.x.round() as i64, p.y.round() as i64);
            for y in (cy - r).max(0)..=(cy + r).min(size as i64 - 1) {
                for x in (cx - r).max(0)..=(cx + r).min(size as i64 - 1) {
                    let d2 = (x as f64 - p.x).powi(2) + (y as f64 - p.y).powi(2);
                    plane[y as usize * size + x as usize] =
                        (-d2 / (2.0 * sigma * sigma)).exp() as f32;
                }
            }
        }
    }
    Tensor::from_vec(data, (points.len(), n, size, size), device)
}

/// Mean binary cross-entropy with logits, in the stable form
/// `max(x, 0) - x t + log(1 + e^{-|x|})` (as PyTorch's `BCEWithLogitsLoss`).
pub fn bce_with_logits(logits: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    bce_with_logits_weighted(logits, target, 1.0)
}

/// BCE with logits with PyTorch's `pos_weight`: the positive term weighted by `w`, so that
/// 8 small masks on a 256x256 background are not drowned by it:
/// `(1 - t) x + (1 + (w - 1) t) softplus(-x)`.
pub fn bce_with_logits_weighted(
    logits: &Tensor,
    target: &Tensor,
    pos_weight: f64,
) -> candle_core::Result<Tensor> {
    let fused = logits.device().is_cpu()
        && logits.dtype() == DType::F32
        && target.dtype() == DType::F32
        && logits.shape() == target.shape()
        && logits.elem_count() > 0;
    if fused {
        // One pass forward and one backward instead of ~14 tensor ops each way over the
        // (B, 8, S, S) maps (about a fifth of a CPU training step).
        return logits
            .contiguous()?
            .apply_op2(&target.contiguous()?, BceWithLogits { pos_weight });
    }
    bce_composed(logits, target, pos_weight)
}

/// The same loss from tensor ops (any device and dtype; the reference of the fused op's test).
fn bce_composed(logits: &Tensor, target: &Tensor, pos_weight: f64) -> candle_core::Result<Tensor> {
    // softplus(-x) = log(1 + e^{-|x|}) + max(-x, 0), stable for any x.
    let softplus_neg =
        (logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()? + logits.neg()?.relu()?)?;
    let neg_part = (target.affine(-1.0, 1.0)? * logits)?;
    let weight = target.affine(pos_weight - 1.0, 1.0)?;
    (neg_part + (weight * softplus_neg)?)?.mean_all()
}

/// Mean weighted BCE with logits as one CPU op; its gradient is
/// `((1 - t) - w(t) sigmoid(-x)) / n` per element, `w(t) = 1 + (pos_weight - 1) t`.
struct BceWithLogits {
    pos_weight: f64,
}

const BCE_CHUNK: usize = 1 << 14;

fn bce_slices<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let x = super::conv::cpu_f32(s1, l1, "bce", "logits")?;
    let t = super::conv::cpu_f32(s2, l2, "bce", "target")?;
    if x.len() != t.len() {
        return Err(candle_core::Error::Msg("bce: shapes differ".into()));
    }
    Ok((x, t))
}

impl CustomOp2 for BceWithLogits {
    fn name(&self) -> &'static str {
        "bce-with-logits"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, t) = bce_slices(s1, l1, s2, l2)?;
        let wm1 = self.pos_weight - 1.0;
        let sum: f64 = x
            .par_chunks(BCE_CHUNK)
            .zip(t.par_chunks(BCE_CHUNK))
            .map(|(xc, tc)| {
                xc.iter()
                    .zip(tc)
                    .map(|(&x, &t)| {
                        let (x, t) = (f64::from(x), f64::from(t));
                        let softplus_neg = (-x.abs()).exp().ln_1p() + (-x).max(0.0);
                        (1.0 - t) * x + (1.0 + wm1 * t) * softplus_neg
                    })
                    .sum::<f64>()
            })
            .sum();
        let mean = (sum / x.len() as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = f64::from(grad.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let g = logits.apply_op2_no_bwd(
            target,
            &BceGrad {
                pos_weight: self.pos_weight,
                scale,
            },
        )?;
        Ok((Some(g), None))
    }
}

/// The gradient of [`BceWithLogits`] with respect to the logits, times `scale`.
struct BceGrad {
    pos_weight: f64,
    scale: f64,
}

impl CustomOp2 for BceGrad {
    fn name(&self) -> &'static str {
        "bce-with-logits-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, t) = bce_slices(s1, l1, s2, l2)?;
        let k = (self.scale / x.len() as f64) as f32;
        let wm1 = (self.pos_weight - 1.0) as f32;
        let mut g = vec![0.0f32; x.len()];
        g.par_chunks_mut(BCE_CHUNK)
            .zip(x.par_chunks(BCE_CHUNK).zip(t.par_chunks(BCE_CHUNK)))
            .for_each(|(gc, (xc, tc))| {
                for ((g, &x), &t) in gc.iter_mut().zip(xc).zip(tc) {
                    // sigmoid(-x), stable on both sides.
                    let s = if x >= 0.0 {
                        let e = (-x).exp();
                        e / (1.0 + e)
                    } else {
                        1.0 / (1.0 + x.exp())
                    };
                    *g = k * ((1.0 - t) - (1.0 + wm1 * t) * s);
                }
            });
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }
}

/// Soft-argmax (eqs. 1-2): `(B, N, H, W)` logits -> `(B, N, 2)` expected `(x, y)` in pixels
/// under `softmax(h / τ)` over all pixels. Differentiable.
pub fn soft_argmax(logits: &Tensor, tau: f64) -> candle_core::Result<Tensor> {
    let (b, n, h, w) = logits.dims4()?;
    let flat = (logits.reshape((b, n, h * w))? / tau)?;
    // The composed softmax (max-subtracted exp / sum) so that autograd reaches the logits.
    let p = candle_nn::ops::softmax(&flat, candle_core::D::Minus1)?;
    let mut coords = Vec::with_capacity(h * w * 2);
    for y in 0..h {
        for x in 0..w {
            coords.push(x as f32);
            coords.push(y as f32);
        }
    }
    let grid = Tensor::from_vec(coords, (h * w, 2), logits.device())?.to_dtype(logits.dtype())?;
    p.broadcast_matmul(&grid)
}

/// `(B, C, H, W)` maps mirrored left-right (the last axis reversed).
pub fn flip_x(t: &Tensor) -> candle_core::Result<Tensor> {
    let w = t.dim(candle_core::D::Minus1)?;
    let rev: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::from_vec(rev, w, t.device())?;
    t.index_select(&idx, t.rank() - 1)
}

/// Heatmap logits `(B, N, H, W)` of a mirrored image turned into those of the image itself:
/// mirrored back, and each landmark's map taken from its mirror partner's channel
/// ([`crate::landmarks::MIRROR`]).
pub fn unmirror(logits: &Tensor) -> candle_core::Result<Tensor> {
    let n = logits.dim(1)?;
    if n != crate::landmarks::N_LANDMARKS {
        return Err(candle_core::Error::Msg(format!(
            "mirroring needs the {} pelvic landmarks, not {n} maps",
            crate::landmarks::N_LANDMARKS
        )));
    }
    let perm: Vec<u32> = crate::landmarks::MIRROR.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(perm, n, logits.device())?;
    flip_x(&logits.index_select(&idx, 1)?)
}

/// `(B, C, H, W)` maps with their content moved `dx` columns right and `dy` rows down
/// (negative: left, up). The strips uncovered repeat the nearest edge, as an image moved under
/// the detector would continue.
pub fn shift(t: &Tensor, dx: isize, dy: isize) -> candle_core::Result<Tensor> {
    shift_axis(&shift_axis(t, 3, dx)?, 2, dy)
}

fn shift_axis(t: &Tensor, dim: usize, d: isize) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    let k = d.unsigned_abs().min(n.saturating_sub(1));
    if k == 0 {
        return Ok(t.clone());
    }
    if d > 0 {
        t.narrow(dim, 0, n - k)?.pad_with_same(dim, k, 0)
    } else {
        t.narrow(dim, k, n - k)?.pad_with_same(dim, 0, k)
    }
}

/// Heatmap logits `(B, N, H, W)` of an image [`shift`]ed by `(dx, dy)` turned into those of the
/// image itself: moved back, and where the shifted view did not see the image (the strips it
/// moved out of the field) `fallback`'s logits, the plain view's, so that those pixels keep one
/// opinion instead of an invented one.
pub fn unshift(
    logits: &Tensor,
    fallback: &Tensor,
    dx: isize,
    dy: isize,
) -> candle_core::Result<Tensor> {
    let back = shift(logits, -dx, -dy)?;
    // Frame pixel p sat at p + d in the view: the strip where that left the field is the
    // fallback's (columns first, then whole rows, so the corner both miss is too).
    let cols = fallback_strip(&back, fallback, 3, dx)?;
    fallback_strip(&cols, fallback, 2, dy)
}

/// `t` with the `|d|` lines along `dim` that a view moved by `d` did not see (the far side's
/// for `d > 0`) taken from `fallback`.
fn fallback_strip(
    t: &Tensor,
    fallback: &Tensor,
    dim: usize,
    d: isize,
) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    let k = d.unsigned_abs().min(n);
    if k == 0 {
        return Ok(t.clone());
    }
    if d > 0 {
        Tensor::cat(
            &[&t.narrow(dim, 0, n - k)?, &fallback.narrow(dim, n - k, k)?],
            dim,
        )
    } else {
        Tensor::cat(
            &[&fallback.narrow(dim, 0, k)?, &t.narrow(dim, k, n - k)?],
            dim,
        )
    }
}

/// `(B, C, H, W)` maps magnified `z` times about their centre (`z < 1`: shrunk), bilinear:
/// view pixel `p` shows the map at `c + (p - c) / z`. Shrunk, the margin repeats the nearest
/// edge, as [`shift`] does.
pub fn zoom(t: &Tensor, z: f64) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = t.dims4()?;
    let zx = resample_axis(t, 3, &zoom_coords(w, 1.0 / z))?;
    resample_axis(&zx, 2, &zoom_coords(h, 1.0 / z))
}

/// Heatmap logits `(B, N, H, W)` of an image [`zoom`]ed `z` times turned into those of the
/// image itself: image pixel `p` is read where the view showed it, `c + z (p - c)`, and where
/// the view did not show the image (its margin, magnified), `fallback`'s logits, the plain
/// view's, as [`unshift`] does.
pub fn unzoom(logits: &Tensor, fallback: &Tensor, z: f64) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = logits.dims4()?;
    let (cx, cy) = (zoom_coords(w, z), zoom_coords(h, z));
    let back = resample_axis(&resample_axis(logits, 3, &cx)?, 2, &cy)?;
    // Half a pixel of slack: the view's edge pixel still covers that far.
    let seen = |u: &[f64], n: usize| -> Vec<f32> {
        let inside = -0.5..=n as f64 - 0.5;
        u.iter()
            .map(|v| if inside.contains(v) { 1.0 } else { 0.0 })
            .collect()
    };
    let dev = logits.device();
    let mx = Tensor::from_vec(seen(&cx, w), (1, 1, 1, w), dev)?;
    let my = Tensor::from_vec(seen(&cy, h), (1, 1, h, 1), dev)?;
    let mask = mx.broadcast_mul(&my)?.to_dtype(logits.dtype())?;
    let keep = back.broadcast_mul(&mask)?;
    let other = fallback.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
    keep + other
}

/// Where each of `n` pixels samples a map magnified `1 / s` times about its centre:
/// `c + s (p - c)` (unclamped; [`resample_axis`] clamps).
fn zoom_coords(n: usize, s: f64) -> Vec<f64> {
    let c = (n as f64 - 1.0) / 2.0;
    (0..n).map(|p| c + s * (p as f64 - c)).collect()
}

/// `t` sampled along `dim` at the fractional positions `at` (one per output line), linearly
/// between the two nearest lines; positions beyond the ends take the end line.
fn resample_axis(t: &Tensor, dim: usize, at: &[f64]) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    let last = n.saturating_sub(1) as f64;
    let mut i0 = Vec::with_capacity(at.len());
    let mut i1 = Vec::with_capacity(at.len());
    let mut w1 = Vec::with_capacity(at.len());
    for &u in at {
        let u = u.clamp(0.0, last);
        let f = u.floor();
        i0.push(f as u32);
        i1.push((f + 1.0).min(last) as u32);
        w1.push((u - f) as f32);
    }
    let dev = t.device();
    let m = at.len();
    let mut shape = vec![1usize; t.rank()];
    shape[dim] = m;
    let w1 = Tensor::from_vec(w1, shape, dev)?.to_dtype(t.dtype())?;
    let w0 = w1.affine(-1.0, 1.0)?;
    let a = t.index_select(&Tensor::from_vec(i0, m, dev)?, dim)?;
    let b = t.index_select(&Tensor::from_vec(i1, m, dev)?, dim)?;
    a.broadcast_mul(&w0)? + b.broadcast_mul(&w1)?
}

/// Per heatmap of `(N, H, W)` logits: the argmax pixel refined to sub-pixel precision by a
/// parabola through its neighbours on each axis, and the peak probability `sigmoid(max)`.
pub fn argmax_subpixel(logits: &Tensor) -> candle_core::Result<Vec<(Point2<f64>, f64)>> {
    peaks(logits, true)
}

/// Per heatmap: the integer argmax (the paper's evaluation) and its probability.
pub fn argmax(logits: &Tensor) -> candle_core::Result<Vec<(Point2<f64>, f64)>> {
    peaks(logits, false)
}

fn peaks(logits: &Tensor, subpixel: bool) -> candle_core::Result<Vec<(Point2<f64>, f64)>> {
    per_plane(logits, |plane, w, h| peak(plane, w, h, subpixel))
}

/// `f(plane, width, height)` for each `(H, W)` plane of `(N, H, W)` logits, read as f32.
fn per_plane<T>(
    logits: &Tensor,
    f: impl Fn(&[f32], usize, usize) -> T,
) -> candle_core::Result<Vec<T>> {
    let (n, h, w) = logits.dims3()?;
    let v = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((0..n)
        .map(|i| f(&v[i * h * w..(i + 1) * h * w], w, h))
        .collect())
}

/// One heatmap's peaks: point (pixels) and probability, strongest first.
pub type Peaks = Vec<(Point2<f64>, f64)>;

/// Which peaks [`candidates`] lists.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakSearch {
    /// At most this many per heatmap.
    pub k: usize,
    /// Least distance from every stronger peak kept, pixels.
    pub min_separation_px: f64,
    /// Peaks below this probability are not listed (the strongest always is).
    pub min_probability: f64,
}

/// Per heatmap of `(N, H, W)` logits: up to `k` peaks, strongest first, each a local maximum
/// at least `min_separation_px` from every stronger one kept, refined to sub-pixel precision,
/// with its probability `sigmoid(logit)`. The first is [`argmax_subpixel`]'s point. The others
/// are the places a heatmap also considered (the other ASIS, a foramen's far edge): the
/// pose-consistent decoding (`registration::consensus`) chooses among them.
pub fn candidates(logits: &Tensor, search: &PeakSearch) -> candle_core::Result<Vec<Peaks>> {
    per_plane(logits, |plane, w, h| plane_candidates(plane, w, h, search))
}

fn plane_candidates(plane: &[f32], w: usize, h: usize, search: &PeakSearch) -> Peaks {
    if search.k == 0 || plane.is_empty() {
        return Vec::new();
    }
    let first = peak(plane, w, h, true);
    let mut out = vec![first];
    if search.k == 1 {
        return out;
    }
    // The floor as a logit: nearly every pixel of a heatmap lies far below it, so the
    // neighbour comparisons run on a few pixels only (they made this 12x the argmax's time).
    let p = search.min_probability;
    let floor = if p > 0.0 {
        (p / (1.0 - p)).ln() as f32
    } else {
        f32::NEG_INFINITY
    };
    // Strict local maxima (ties broken towards the first pixel in raster order, so that a
    // plateau yields one peak), strongest first.
    let mut maxima: Vec<(f32, usize)> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let v = plane[i];
            // (NaN fails this too.)
            if !(v.is_finite() && v >= floor) {
                continue;
            }
            let mut is_max = true;
            'nb: for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                    if (dx, dy) == (0, 0) || xx < 0 || yy < 0 || xx >= w as i64 || yy >= h as i64 {
                        continue;
                    }
                    let j = yy as usize * w + xx as usize;
                    let u = plane[j];
                    if u > v || (u == v && j < i) {
                        is_max = false;
                        break 'nb;
                    }
                }
            }
            if is_max {
                maxima.push((v, i));
            }
        }
    }
    maxima.sort_by(|a, b| b.0.total_cmp(&a.0));
    let sep2 = search.min_separation_px * search.min_separation_px;
    for (_, i) in maxima {
        if out.len() >= search.k {
            break;
        }
        let c = refine(plane, w, h, i);
        if out.iter().all(|(p, _)| (p - c.0).norm_squared() >= sep2) {
            out.push(c);
        }
    }
    out
}

fn peak(plane: &[f32], w: usize, h: usize, subpixel: bool) -> (Point2<f64>, f64) {
    let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
    for (i, v) in plane.iter().enumerate() {
        if *v > bv {
            (best, bv) = (i, *v);
        }
    }
    if !subpixel {
        let conf = 1.0 / (1.0 + (-(bv as f64)).exp());
        return (Point2::new((best % w) as f64, (best / w) as f64), conf);
    }
    refine(plane, w, h, best)
}

/// The pixel `best` refined to sub-pixel precision, and its probability.
fn refine(plane: &[f32], w: usize, h: usize, best: usize) -> (Point2<f64>, f64) {
    let bv = plane[best];
    let (x, y) = (best % w, best / w);
    let conf = 1.0 / (1.0 + (-(bv as f64)).exp());
    // Parabola through (−1, a), (0, b), (1, c): vertex at (a − c) / (2 (a − 2b + c)).
    let offset = |a: f32, b: f32, c: f32| -> f64 {
        let den = a as f64 - 2.0 * b as f64 + c as f64;
        if den < -1e-12 {
            (0.5 * (a as f64 - c as f64) / den).clamp(-0.5, 0.5)
        } else {
            0.0
        }
    };
    let dx = if x > 0 && x + 1 < w {
        offset(plane[best - 1], bv, plane[best + 1])
    } else {
        0.0
    };
    let dy = if y > 0 && y + 1 < h {
        offset(plane[best - w], bv, plane[best + w])
    } else {
        0.0
    };
    (Point2::new(x as f64 + dx, y as f64 + dy), conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_logits(points: &[(f64, f64)], size: usize, sigma: f64, peak: f64) -> Tensor {
        let mut v = vec![0.0f32; points.len() * size * size];
        for (i, (px, py)) in points.iter().enumerate() {
            for y in 0..size {
                for x in 0..size {
                    let d2 = (x as f64 - px).powi(2) + (y as f64 - py).powi(2);
                    // log of a Gaussian: its softmax is the sampled Gaussian itself.
                    v[i * size * size + y * size + x] = (peak - d2 / (2.0 * sigma * sigma)) as f32;
                }
            }
        }
        Tensor::from_vec(v, (1, points.len(), size, size), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_shifted_view_moves_its_peaks_and_unshifting_brings_them_back() {
        let pts = [(20.0, 41.0), (3.0, 50.0), (60.0, 2.0)];
        let t = gaussian_logits(&pts, 64, 2.0, 30.0);
        let peaks = |t: &Tensor| argmax(&t.get(0).unwrap()).unwrap();
        // The view: content 5 right and 7 up. A peak that leaves the field sticks to the edge.
        let view = shift(&t, 5, -7).unwrap();
        assert_eq!(view.dims(), t.dims());
        let moved = peaks(&view);
        assert_eq!((moved[0].0.x, moved[0].0.y), (25.0, 34.0));
        assert_eq!((moved[1].0.x, moved[1].0.y), (8.0, 43.0));
        assert_eq!(moved[2].0.y, 0.0, "{:?}", moved[2]);
        // Back in the frame: what the view saw returns exactly; the strips it did not see (the
        // 5 right-most columns, the 7 top rows) are the fallback's.
        let fallback = (t.clone() + 0.25).unwrap();
        let back = unshift(&view, &fallback, 5, -7).unwrap();
        let (b, t3, f) = (
            back.get(0).unwrap().to_vec3::<f32>().unwrap(),
            t.get(0).unwrap().to_vec3::<f32>().unwrap(),
            fallback.get(0).unwrap().to_vec3::<f32>().unwrap(),
        );
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    let want = if x >= 59 || y < 7 {
                        f[c][y][x]
                    } else {
                        t3[c][y][x]
                    };
                    assert_eq!(b[c][y][x], want, "map {c} at ({x}, {y})");
                }
            }
        }
        assert_eq!(
            peaks(&back)
                .iter()
                .map(|(p, _)| (p.x, p.y))
                .collect::<Vec<_>>(),
            pts
        );
    }

    #[test]
    fn a_zoomed_view_scales_its_peaks_about_the_centre_and_unzooming_brings_them_back() {
        // Centre (31.5, 31.5); peaks off the axes so that both passes move them.
        let pts = [(21.5, 41.5), (43.5, 15.5), (1.5, 60.5)];
        let t = gaussian_logits(&pts, 64, 3.0, 30.0);
        let peaks = |t: &Tensor| argmax_subpixel(&t.get(0).unwrap()).unwrap();
        let near = |p: Point2<f64>, q: (f64, f64), tol: f64| {
            assert!(
                (p.x - q.0).abs() < tol && (p.y - q.1).abs() < tol,
                "{p:?} is not near {q:?}"
            );
        };
        let z = 1.25;
        let magnified = zoom(&t, z).unwrap();
        assert_eq!(magnified.dims(), t.dims());
        let m = peaks(&magnified);
        // 10 px from the centre becomes 12.5: p' = c + z (p - c).
        near(m[0].0, (19.0, 44.0), 0.15);
        near(m[1].0, (46.5, 11.5), 0.15);
        // The third, near the corner, left the magnified field: the view cannot show it.
        let shrunk = zoom(&t, 1.0 / z).unwrap();
        let s = peaks(&shrunk);
        near(s[2].0, (31.5 - 30.0 / z, 31.5 + 29.0 / z), 0.15);
        // Back in the frame: each view's peaks return where they were, and where the magnified
        // view did not see the frame (its outer 1/10 on each side) the fallback's logits stand.
        let fallback = (t.clone() + 0.25).unwrap();
        for view_z in [z, 1.0 / z] {
            let back = unzoom(&zoom(&t, view_z).unwrap(), &fallback, view_z).unwrap();
            for (i, (p, _)) in peaks(&back).iter().enumerate() {
                near(*p, pts[i], 0.15);
            }
        }
        let back = unzoom(&magnified, &fallback, z).unwrap();
        let (b, f) = (
            back.get(0).unwrap().to_vec3::<f32>().unwrap(),
            fallback.get(0).unwrap().to_vec3::<f32>().unwrap(),
        );
        // Pixel 2 maps to view 31.5 + 1.25 * (2 - 31.5) = -5.4: unseen. Pixel 8 to 2.1: seen,
        // and a smooth map resampled twice is close to itself there.
        assert_eq!(b[0][2][40], f[0][2][40]);
        assert_eq!(b[1][30][61], f[1][30][61]);
        let t3 = t.get(0).unwrap().to_vec3::<f32>().unwrap();
        assert_ne!(b[0][8][40], f[0][8][40]);
        assert!((b[0][8][40] - t3[0][8][40]).abs() < 0.5, "{}", b[0][8][40]);
    }

    #[test]
    fn soft_argmax_finds_a_synthetic_peak() {
        let pts = [(20.3, 41.7), (15.0, 50.0), (47.5, 12.25)];
        let t = gaussian_logits(&pts, 64, 2.0, 30.0);
        let out = soft_argmax(&t, 1.0).unwrap().to_vec3::<f32>().unwrap();
        for (i, (x, y)) in pts.iter().enumerate() {
            assert!((out[0][i][0] as f64 - x).abs() < 0.01, "{:?}", out[0][i]);
            assert!((out[0][i][1] as f64 - y).abs() < 0.01, "{:?}", out[0][i]);
        }
        // A hot τ spreads the mass: the estimate is pulled towards the image centre.
        let hot = soft_argmax(&t, 100.0).unwrap().to_vec3::<f32>().unwrap();
        assert!((hot[0][1][0] - 31.5).abs() < (15.0f32 - 31.5).abs() - 1.0);
    }

    #[test]
    fn soft_argmax_is_differentiable() {
        let t = candle_core::Var::from_tensor(&gaussian_logits(&[(10.0, 20.0)], 32, 2.0, 20.0))
            .unwrap();
        let p = soft_argmax(t.as_tensor(), 1.0).unwrap();
        let g = p.sum_all().unwrap().backward().unwrap();
        let gt = g.get(&t).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(gt.to_scalar::<f32>().unwrap() > 0.0);
    }

    #[test]
    fn argmax_subpixel_recovers_offsets() {
        let pts = [(20.3, 41.7), (0.0, 63.0)];
        let t = gaussian_logits(&pts, 64, 2.0, 30.0).squeeze(0).unwrap();
        let sub = argmax_subpixel(&t).unwrap();
        assert!(
            (sub[0].0.x - 20.3).abs() < 1e-3 && (sub[0].0.y - 41.7).abs() < 1e-3,
            "{:?}",
            sub[0]
        );
        assert_eq!(sub[1].0, Point2::new(0.0, 63.0));
        let int = argmax(&t).unwrap();
        assert_eq!(int[0].0, Point2::new(20.0, 42.0));
        assert!(int[0].1 > 0.99); // peak logit 30
    }

    #[test]
    fn candidates_list_the_peaks_of_a_two_mode_heatmap_strongest_first() {
        // Two bumps in one plane: a strong one at (40.4, 12.2) and a weaker one at (10.0, 50.6),
        // plus a ridge of noise near the strong one that separation must suppress.
        let size = 64;
        let mut v = vec![-20.0f32; size * size];
        for y in 0..size {
            for x in 0..size {
                let g = |px: f64, py: f64, peak: f64| {
                    peak - ((x as f64 - px).powi(2) + (y as f64 - py).powi(2)) / 8.0
                };
                v[y * size + x] = g(40.4, 12.2, 6.0).max(g(10.0, 50.6, 2.0)) as f32;
            }
        }
        v[12 * size + 44] += 1.0; // a spike 4 px from the strong peak, weaker than it
        let t = Tensor::from_vec(v, (1, size, size), &Device::Cpu).unwrap();
        let search = |k: usize, min_separation_px: f64, min_probability: f64| PeakSearch {
            k,
            min_separation_px,
            min_probability,
        };
        let c = candidates(&t, &search(3, 6.0, 0.0)).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].len(), 2, "{:?}", c[0]);
        // The first is argmax_subpixel's point.
        assert_eq!(c[0][0], argmax_subpixel(&t).unwrap()[0]);
        assert!(
            (c[0][1].0 - Point2::new(10.0, 50.6)).norm() < 1e-3,
            "{:?}",
            c[0][1]
        );
        assert!(c[0][0].1 > c[0][1].1);
        assert!((c[0][1].1 - 1.0 / (1.0 + (-1.98f64).exp())).abs() < 0.01);
        // Without separation the spike counts, and k = 1 is the argmax alone.
        assert_eq!(candidates(&t, &search(3, 0.0, 0.0)).unwrap()[0].len(), 3);
        assert_eq!(candidates(&t, &search(1, 6.0, 0.0)).unwrap()[0].len(), 1);
        // A floor above the weak peak's probability (0.88) leaves the strongest alone.
        assert_eq!(candidates(&t, &search(3, 6.0, 0.95)).unwrap()[0].len(), 1);
        assert_eq!(candidates(&t, &search(3, 6.0, 0.8)).unwrap()[0].len(), 2);
    }

    #[test]
    fn unmirror_moves_each_map_to_its_partner_mirrored() {
        // L-ASIS's map peaks at (3, 5) of a 16-wide image; read back from the mirror image it
        // is R-ASIS's map (channel 7), peaking at (12, 5). The symphysis maps stay put.
        let mut v = vec![0.0f32; 8 * 16 * 16];
        v[5 * 16 + 3] = 9.0; // channel 0
        v[3 * 256 + 2 * 16 + 1] = 7.0; // channel 3 (SPS) at (1, 2)
        let t = Tensor::from_vec(v, (1, 8, 16, 16), &Device::Cpu).unwrap();
        let u = unmirror(&t).unwrap().squeeze(0).unwrap();
        let peaks = argmax(&u).unwrap();
        assert_eq!(peaks[7].0, Point2::new(12.0, 5.0));
        assert!(peaks[7].1 > 0.99);
        assert_eq!(peaks[3].0, Point2::new(14.0, 2.0));
        assert!(
            peaks[0].1 < 0.51,
            "channel 0 is now the old R-ASIS map (flat)"
        );
        // Twice is the identity.
        let back = unmirror(&unmirror(&t).unwrap()).unwrap();
        let d: f32 = (back - &t)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
        assert!(unmirror(&Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn targets_peak_at_points_and_absent_is_empty() {
        let pts = vec![vec![
            Some(Point2::new(3.0, 4.0)),
            None,
            Some(Point2::new(-50.0, 2.0)),
        ]];
        let t = targets(&pts, 8, 1.0, &Device::Cpu).unwrap();
        let v = t.to_vec3::<f32>();
        assert!(v.is_err()); // 4-D
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v[4 * 8 + 3], 1.0);
        assert!(v[64..].iter().all(|x| *x == 0.0));
    }

    #[test]
    fn fused_bce_matches_the_composed_loss_and_its_gradient() {
        let dev = Device::Cpu;
        let n = 2 * 3 * 17 * 19;
        // No logit exactly 0: there the composed form's abs/relu kinks give autograd a
        // different subgradient (the loss itself is smooth; the fused op has the true slope).
        let xv: Vec<f32> = (0..n)
            .map(|i| {
                ((i * 7919 % 1000) as f32 / 50.0 - 9.987) * if i % 97 == 0 { 9.0 } else { 1.0 }
            })
            .collect();
        let tv: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 11) as f32 / 10.0).min(1.0))
            .collect();
        let t = Tensor::from_vec(tv, (2, 3, 17, 19), &dev).unwrap();
        for w in [1.0, 100.0] {
            let xa = candle_core::Var::from_tensor(
                &Tensor::from_vec(xv.clone(), (2, 3, 17, 19), &dev).unwrap(),
            )
            .unwrap();
            let xb = candle_core::Var::from_tensor(xa.as_tensor()).unwrap();
            let la = bce_with_logits_weighted(xa.as_tensor(), &t, w).unwrap();
            let lb = bce_composed(xb.as_tensor(), &t, w).unwrap();
            let (va, vb) = (
                la.to_scalar::<f32>().unwrap(),
                lb.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (va - vb).abs() <= 1e-5 * vb.abs().max(1.0),
                "loss {va} vs {vb}"
            );
            // Scaled as part of a larger graph, so that the incoming gradient is not 1.
            let ga = (la * 3.0).unwrap().backward().unwrap();
            let gb = (lb * 3.0).unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(xa.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                gb.get(xb.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            let m = gb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in ga.iter().zip(&gb) {
                assert!((a - b).abs() <= 1e-5 * m, "gradient {a} vs {b} (w {w})");
            }
        }
    }

    #[test]
    fn bce_matches_the_definition_and_is_stable() {
        let x = Tensor::new(&[-100.0f32, -1.0, 0.0, 2.0, 100.0], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.0f32, 1.0, 0.5, 0.0, 1.0], &Device::Cpu).unwrap();
        let l = bce_with_logits(&x, &t).unwrap().to_scalar::<f32>().unwrap() as f64;
        let s = |v: f64| 1.0 / (1.0 + (-v).exp());
        let want = [
            (-100.0, 0.0),
            (-1.0, 1.0),
            (0.0, 0.5),
            (2.0, 0.0),
            (100.0, 1.0),
        ]
        .iter()
        .map(|&(v, t): &(f64, f64)| {
            let p = s(v).clamp(1e-300, 1.0 - 1e-16);
            -(t * p.ln() + (1.0 - t) * (1.0 - p).ln())
        })
        .sum::<f64>()
            / 5.0;
        assert!(l.is_finite());
        assert!((l - want).abs() < 1e-4, "{l} vs {want}");
        // pos_weight scales exactly the positive term: t = 1 items scale by w, t = 0 do not.
        let one = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let x1 = Tensor::new(&[-0.7f32], &Device::Cpu).unwrap();
        let a = bce_with_logits(&x1, &one)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = bce_with_logits_weighted(&x1, &one, 5.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((b - 5.0 * a).abs() < 1e-5);
        let zero = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let c = bce_with_logits(&x1, &zero)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = bce_with_logits_weighted(&x1, &zero, 5.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((c - d).abs() < 1e-6);
    }
}
