//! The U-Net's resampling for training, forward and backward: 2x2 max pooling, and nearest
//! upsampling fused with the skip concatenation.
//!
//! Two reasons not to use candle's ops here. Correctness: candle 0.11's `max_pool2d` backward
//! multiplies the gradient by the *fraction* of maxima in each window instead of dividing by
//! their count, so a unique maximum receives a quarter of its gradient (`examples/maxpool_grad.rs`
//! shows it); this op gives the whole gradient to the first maximum, as PyTorch does. Speed: on
//! the CPU candle's pool backward is eight passes over the activations, and its upsample
//! backward a grouped convolution; each op here is one pass.

use super::conv::{cpu_f32, with_host_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

fn dims4(l: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    match l.shape().dims() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        d => Err(candle_core::Error::Msg(format!(
            "{op}: expected NCHW, got {d:?}"
        ))),
    }
}

/// Index of the first maximum of a 2x2 window (row-major), and the maximum.
#[inline]
fn argmax4(v: [f32; 4]) -> (usize, f32) {
    let mut best = (0, v[0]);
    for (k, x) in v.iter().enumerate().skip(1) {
        // `>` keeps the first of equal values.
        if *x > best.1 {
            best = (k, *x);
        }
    }
    best
}

/// 2x2 max pooling with stride 2 (odd trailing rows and columns dropped, as candle does).
struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims4(l, "max pool")?;
        let x = cpu_f32(s, l, "max pool", "input")?;
        let (oh, ow) = (h / 2, w / 2);
        let mut out = vec![0.0f32; b * c * oh * ow];
        if oh * ow > 0 {
            out.par_chunks_mut(oh * ow)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for y in 0..oh {
                        let (r0, r1) = (&src[2 * y * w..], &src[(2 * y + 1) * w..]);
                        for (xo, o) in dst[y * ow..(y + 1) * ow].iter_mut().enumerate() {
                            let v = [r0[2 * xo], r0[2 * xo + 1], r1[2 * xo], r1[2 * xo + 1]];
                            *o = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let gx = with_host_f32([x, grad], "max pool", ["input", "gradient"], |[xv, gv]| {
            let mut gx = vec![0.0f32; b * c * h * w];
            if oh * ow > 0 {
                gx.par_chunks_mut(h * w)
                    .zip(xv.par_chunks(h * w))
                    .zip(gv.par_chunks(oh * ow))
                    .for_each(|((dst, src), g)| {
                        for y in 0..oh {
                            let (r0, r1) = (2 * y * w, (2 * y + 1) * w);
                            for xo in 0..ow {
                                let idx =
                                    [r0 + 2 * xo, r0 + 2 * xo + 1, r1 + 2 * xo, r1 + 2 * xo + 1];
                                let (k, _) = argmax4(idx.map(|i| src[i]));
                                dst[idx[k]] = g[y * ow + xo];
                            }
                        }
                    });
            }
            gx
        })?;
        Ok(Some(Tensor::from_vec(gx, x.shape(), x.device())?))
    }
}

/// 2x2 max pooling, differentiable: one pass each way on the CPU; elsewhere a reshape and a
/// max over each window (candle's reduction backward, which is right for a unique maximum).
pub fn max_pool2(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::conv::fast_path(x) {
        return x.contiguous()?.apply_op1(MaxPool2);
    }
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    x.narrow(2, 0, 2 * oh)?
        .narrow(3, 0, 2 * ow)?
        .reshape((b, c, oh, 2, ow, 2))?
        .max(5)?
        .max(3)
}

/// Nearest source index of each of `n` destination positions for a source of `m`, as candle's
/// `upsample_nearest2d` computes it (also the fused inference up-cat convolution's).
pub(crate) fn nearest(m: usize, n: usize) -> Vec<usize> {
    let scale = m as f64 / n as f64;
    (0..n)
        .map(|i| ((i as f64 * scale) as usize).min(m.saturating_sub(1)))
        .collect()
}

/// `(low, skip) -> concat([upsample_nearest(low, to skip's size), skip], channel axis)`.
struct UpsampleConcat;

impl CustomOp2 for UpsampleConcat {
    fn name(&self) -> &'static str {
        "upsample-concat"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, cl, hl, wl) = dims4(l1, "upsample-concat")?;
        let (bs, cs, h, w) = dims4(l2, "upsample-concat")?;
        if bs != b || (hl == 0 || wl == 0) && h * w > 0 {
            return Err(candle_core::Error::Msg(format!(
                "upsample-concat: low {:?} and skip {:?} do not fit",
                l1.shape(),
                l2.shape()
            )));
        }
        let low = cpu_f32(s1, l1, "upsample-concat", "low")?;
        let skip = cpu_f32(s2, l2, "upsample-concat", "skip")?;
        let (ys, xs) = (nearest(hl, h), nearest(wl, w));
        let c = cl + cs;
        let mut out = vec![0.0f32; b * c * h * w];
        if h * w > 0 {
            out.par_chunks_mut(h * w)
                .enumerate()
                .for_each(|(plane, dst)| {
                    let (i, ch) = (plane / c, plane % c);
                    if ch < cl {
                        let src = &low[(i * cl + ch) * hl * wl..][..hl * wl];
                        for (y, row) in dst.chunks_mut(w).enumerate() {
                            let s = &src[ys[y] * wl..][..wl];
                            for (o, x) in row.iter_mut().zip(&xs) {
                                *o = s[*x];
                            }
                        }
                    } else {
                        dst.copy_from_slice(&skip[(i * cs + ch - cl) * h * w..][..h * w]);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(
        &self,
        low: &Tensor,
        skip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, cl, hl, wl) = low.dims4()?;
        let (_, cs, h, w) = skip.dims4()?;
        let c = cl + cs;
        let (ys, xs) = (nearest(hl, h), nearest(wl, w));
        let (glow, gskip) = with_host_f32([grad], "upsample-concat", ["gradient"], |[g]| {
            let mut glow = vec![0.0f32; b * cl * hl * wl];
            let mut gskip = vec![0.0f32; b * cs * h * w];
            rayon::join(
                || {
                    if hl * wl == 0 {
                        return;
                    }
                    // Each low-resolution pixel sums the destination pixels mapped to it.
                    glow.par_chunks_mut(hl * wl)
                        .enumerate()
                        .for_each(|(plane, dst)| {
                            let (i, ch) = (plane / cl, plane % cl);
                            let src = &g[(i * c + ch) * h * w..][..h * w];
                            for (y, row) in src.chunks(w).enumerate() {
                                let d = &mut dst[ys[y] * wl..][..wl];
                                for (v, x) in row.iter().zip(&xs) {
                                    d[*x] += v;
                                }
                            }
                        });
                },
                || {
                    if h * w == 0 {
                        return;
                    }
                    gskip
                        .par_chunks_mut(h * w)
                        .enumerate()
                        .for_each(|(plane, dst)| {
                            let (i, ch) = (plane / cs, plane % cs);
                            dst.copy_from_slice(&g[(i * c + cl + ch) * h * w..][..h * w]);
                        });
                },
            );
            (glow, gskip)
        })?;
        Ok((
            Some(Tensor::from_vec(glow, low.shape(), low.device())?),
            Some(Tensor::from_vec(gskip, skip.shape(), skip.device())?),
        ))
    }
}

/// `concat([upsample_nearest(low, skip's height and width), skip])` on the channel axis,
/// differentiable: one pass each way on the CPU, candle's ops elsewhere.
pub fn upsample_concat(low: &Tensor, skip: &Tensor) -> candle_core::Result<Tensor> {
    if super::conv::fast_path(low) {
        return low
            .contiguous()?
            .apply_op2(&skip.contiguous()?, UpsampleConcat);
    }
    let (_, _, h, w) = skip.dims4()?;
    Tensor::cat(&[&low.upsample_nearest2d(h, w)?, skip], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Forward equals candle's `max_pool2d`; each window's gradient goes whole to its first
    /// maximum (checked against a direct loop), odd sizes and ties included.
    #[test]
    fn max_pool_forward_matches_candle_and_gradient_goes_to_the_maximum() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 6), (7, 9), (2, 2)] {
            // Rounded values so that windows hold ties.
            let x = (Tensor::randn(0f32, 2.0, (2, 3, h, w), &dev).unwrap())
                .round()
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let ours = max_pool2(x.as_tensor()).unwrap();
            let theirs = x.as_tensor().max_pool2d(2).unwrap();
            assert_eq!(values(&ours), values(&theirs), "{h}x{w}");
            let gout = Tensor::randn(0f32, 1.0, ours.shape(), &dev).unwrap();
            let grads = (&ours * &gout)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = values(grads.get(&x).unwrap());
            let (xv, gv) = (values(x.as_tensor()), values(&gout));
            let (oh, ow) = (h / 2, w / 2);
            let mut expect = vec![0.0f32; xv.len()];
            for p in 0..6 {
                for y in 0..oh {
                    for xo in 0..ow {
                        let mut best = None::<(usize, f32)>;
                        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                            let i = p * h * w + (2 * y + dy) * w + 2 * xo + dx;
                            if best.is_none_or(|(_, m)| xv[i] > m) {
                                best = Some((i, xv[i]));
                            }
                        }
                        expect[best.unwrap().0] = gv[p * oh * ow + y * ow + xo];
                    }
                }
            }
            assert_eq!(gx, expect, "{h}x{w}");
        }
    }

    /// The general path (reshape and max, used off the CPU) agrees with the CPU op.
    #[test]
    fn max_pool_reshape_path_matches() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 10, 7), &dev).unwrap();
        let (oh, ow) = (5, 3);
        let general = x
            .narrow(3, 0, 6)
            .unwrap()
            .reshape((2, 3, oh, 2, ow, 2))
            .unwrap()
            .max(5)
            .unwrap()
            .max(3)
            .unwrap();
        assert_eq!(values(&max_pool2(&x).unwrap()), values(&general));
    }

    /// Forward and both gradients equal candle's upsample + concat, at 2x and at a size that is
    /// not a multiple.
    #[test]
    fn upsample_concat_matches_candle() {
        let dev = Device::Cpu;
        for ((hl, wl), (h, w)) in [((4, 3), (8, 6)), ((3, 5), (7, 11))] {
            let low =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, hl, wl), &dev).unwrap()).unwrap();
            let skip =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev).unwrap()).unwrap();
            let ours = upsample_concat(low.as_tensor(), skip.as_tensor()).unwrap();
            let up = low.as_tensor().upsample_nearest2d(h, w).unwrap();
            let theirs = Tensor::cat(&[&up, skip.as_tensor()], 1).unwrap();
            assert_eq!(values(&ours), values(&theirs));
            let gout = Tensor::randn(0f32, 1.0, ours.shape(), &dev).unwrap();
            let g = (&ours * &gout)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // candle's upsample backward only handles integer factors: compare with a direct sum.
            let gv = values(&gout);
            let mut expect_low = vec![0.0f32; 2 * 3 * hl * wl];
            let (ys, xs) = (nearest(hl, h), nearest(wl, w));
            for i in 0..2 {
                for c in 0..3 {
                    for y in 0..h {
                        for x in 0..w {
                            expect_low[((i * 3 + c) * hl + ys[y]) * wl + xs[x]] +=
                                gv[((i * 7 + c) * h + y) * w + x];
                        }
                    }
                }
            }
            let got = values(g.get(&low).unwrap());
            for (a, b) in got.iter().zip(&expect_low) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            let expect_skip = values(&gout.narrow(1, 3, 4).unwrap());
            assert_eq!(values(g.get(&skip).unwrap()), expect_skip);
            if h == 2 * hl && w == 2 * wl {
                let gt = (&theirs * &gout)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let cand = values(gt.get(&low).unwrap());
                for (a, b) in got.iter().zip(&cand) {
                    assert!((a - b).abs() < 1e-5, "{a} vs candle {b}");
                }
            }
        }
    }
}
