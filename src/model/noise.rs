//! How noisy a frame is, and smoothing a noisy frame towards the noise the network learnt.
//!
//! Every shipped network learnt DRRs at 10,000 photons per pixel; fluoroscopy runs at far
//! lower doses, and there the network is confidently wrong (model card, "Low dose"). A
//! Gaussian blur before the network trades detail it does not need (it reads the pelvis at
//! 256 px) for noise it cannot read through. The blur is chosen from the frame's own noise,
//! measured on what the network sees, so frames as clean as the training data pass unchanged.

/// The frame is smoothed by this much (sigma, model-input pixels) before its noise [`level`] is
/// measured: the pixel-to-pixel noise depends on how sharp the detector is (the training data's
/// 0.5 px blur hides two thirds of it; a sharp frame at the same dose would read three times
/// noisier), while the noise at the scale of a pixel or two, which the network reads, does not.
/// Measured with [`estimate`] on 40 DRRs each of phantoms 61-64 (d45's recipe, `--blur 0.5` and
/// `--blur 0`): medians 0.00698 and 0.01436 at 10,000 photons unsmoothed, 0.00028 and 0.00035
/// after this blur.
pub const LEVEL_BLUR_PX: f64 = 1.0;

/// The noise [`level`] at which smoothing starts: above the 95th percentile of the shipped
/// networks' training images (0.00052 at 10,000 photons; 0.00048 for sharp frames), about the
/// 5th at 1,000 photons (0.00051; 0.00059 sharp).
pub const SMOOTH_ABOVE: f32 = 0.00055;

/// The noise [`level`] at which smoothing reaches [`SMOOTH_MAX_PX`]: most 1,000-photon frames
/// (median 0.00080; 0.00104 sharp).
pub const SMOOTH_FULL_AT: f32 = 0.00075;

/// The strongest blur, sigma in model-input pixels. Measured on phantoms 61-64 with the app's
/// reading (`eval --mirror --shift-px 12 --decode registered`, images blurred by sigma first):
/// at 1,000 photons RMSE 34.1 px unblurred, 26.6 at sigma 1, 26.1 at 3, 22.6 at 4, 32.7 at 5;
/// at 300 photons 96.0, 80.3 at 1.5, 68.5 at 3, 65.3 at 4, 77.6 at 5.
pub const SMOOTH_MAX_PX: f32 = 3.5;

/// The standard deviation of the white noise in an image, robustly (Immerkær 1996, "Fast noise
/// variance estimation", with a median in place of the mean so that edges do not count): the
/// kernel `[1 -2 1; -2 4 -2; 1 -2 1]` is blind to constant, linear and most of the smooth
/// anatomy, and turns white noise of sigma into residuals of standard deviation 6 sigma.
/// 0 for an image smaller than 3x3 or without finite pixels.
pub fn estimate(img: &[f32], w: usize, h: usize) -> f32 {
    if w < 3 || h < 3 || img.len() != w * h {
        return 0.0;
    }
    let mut r = Vec::with_capacity((w - 2) * (h - 2));
    for y in 1..h - 1 {
        let (a, b, c) = (
            &img[(y - 1) * w..y * w],
            &img[y * w..(y + 1) * w],
            &img[(y + 1) * w..(y + 2) * w],
        );
        for x in 1..w - 1 {
            let v = (a[x - 1] + a[x + 1] + c[x - 1] + c[x + 1])
                - 2.0 * (a[x] + c[x] + b[x - 1] + b[x + 1])
                + 4.0 * b[x];
            if v.is_finite() {
                r.push(v.abs());
            }
        }
    }
    if r.is_empty() {
        return 0.0;
    }
    let mid = r.len() / 2;
    let median = *r.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1;
    // The median of |N(0, s)| is 0.6745 s.
    median / 0.674_49 / 6.0
}

/// The noise of a frame at the scale the network reads it: [`estimate`] after a blur of
/// [`LEVEL_BLUR_PX`]. Unitless (the image's own range); compare it with [`SMOOTH_ABOVE`].
pub fn level(img: &[f32], w: usize, h: usize) -> f32 {
    let mut b = img.to_vec();
    gaussian_blur(&mut b, w, h, LEVEL_BLUR_PX);
    estimate(&b, w, h)
}

/// The blur for a frame of noise `noise` ([`level`] of the network's input): none up to
/// [`SMOOTH_ABOVE`], rising linearly to [`SMOOTH_MAX_PX`] at [`SMOOTH_FULL_AT`] so that a
/// stream whose noise hovers at the threshold is not smoothed on one frame and not the next.
pub fn smoothing_px(noise: f32) -> f32 {
    if !noise.is_finite() {
        return 0.0;
    }
    let t = ((noise - SMOOTH_ABOVE) / (SMOOTH_FULL_AT - SMOOTH_ABOVE)).clamp(0.0, 1.0);
    t * SMOOTH_MAX_PX
}

/// What the network's input preparation found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct InputNoise {
    /// [`level`] of the normalised input, before smoothing.
    pub noise: f32,
    /// The Gaussian blur applied, sigma in model-input pixels (0: none).
    pub smoothed_px: f32,
}

impl InputNoise {
    /// The noise relative to the top of the training data's range ([`SMOOTH_ABOVE`]).
    pub fn relative(&self) -> f32 {
        self.noise / SMOOTH_ABOVE
    }
}

/// Separable Gaussian blur with clamped edges (sigma in pixels; none when not above 0).
pub fn gaussian_blur(img: &mut [f32], w: usize, h: usize, sigma: f64) {
    if sigma <= 0.0 || !sigma.is_finite() || w == 0 || h == 0 || img.len() != w * h {
        return;
    }
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
    let mut tmp = vec![0.0f32; img.len()];
    for y in 0..h {
        let row = &img[y * w..(y + 1) * w];
        for x in 0..w {
            tmp[y * w + x] = (-r..=r)
                .map(|i| row[(x as i64 + i).clamp(0, w as i64 - 1) as usize] * k[(i + r) as usize])
                .sum();
        }
    }
    for y in 0..h {
        for x in 0..w {
            img[y * w + x] = (-r..=r)
                .map(|i| {
                    let yy = (y as i64 + i).clamp(0, h as i64 - 1) as usize;
                    tmp[yy * w + x] * k[(i + r) as usize]
                })
                .sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// A smooth "anatomy": a ramp and a broad bump, with a sharp edge through it.
    fn scene(w: usize, h: usize) -> Vec<f32> {
        let mut img = vec![0.0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let (u, v) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
                let edge = if x > w / 3 { 0.3 } else { 0.0 };
                img[y * w + x] = 0.2 + 0.3 * u + 0.4 * (-(u * u + v * v) * 8.0).exp() + edge;
            }
        }
        img
    }

    fn noisy(sigma: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = Normal::new(0.0f32, sigma).expect("a valid sigma");
        scene(128, 128)
            .into_iter()
            .map(|v| v + n.sample(&mut rng))
            .collect()
    }

    #[test]
    fn the_estimate_recovers_white_noise_through_anatomy_and_edges() {
        assert!(estimate(&scene(128, 128), 128, 128) < 1e-3);
        for sigma in [0.005f32, 0.02, 0.05] {
            let e = estimate(&noisy(sigma, 3), 128, 128);
            assert!(
                (e / sigma - 1.0).abs() < 0.08,
                "sigma {sigma}: estimated {e}"
            );
        }
        assert_eq!(estimate(&[1.0; 4], 2, 2), 0.0);
        assert_eq!(estimate(&[f32::NAN; 16], 4, 4), 0.0);
    }

    #[test]
    fn the_level_depends_less_than_the_estimate_on_how_sharp_the_noise_is() {
        let sharp = noisy(0.03, 4);
        let mut soft = sharp.clone();
        gaussian_blur(&mut soft, 128, 128, 0.5);
        let ratio = |f: fn(&[f32], usize, usize) -> f32| f(&sharp, 128, 128) / f(&soft, 128, 128);
        let (by_estimate, by_level) = (ratio(estimate), ratio(level));
        assert!(by_estimate > 2.0, "{by_estimate}");
        assert!(by_level < 1.6 && by_level > 1.0, "{by_level}");
        assert!(level(&scene(128, 128), 128, 128) < 1e-4);
    }

    #[test]
    fn smoothing_starts_above_the_training_noise_and_is_continuous() {
        assert_eq!(smoothing_px(0.0), 0.0);
        assert_eq!(smoothing_px(SMOOTH_ABOVE), 0.0);
        assert_eq!(smoothing_px(f32::NAN), 0.0);
        assert!((smoothing_px(SMOOTH_FULL_AT) - SMOOTH_MAX_PX).abs() < 1e-6);
        assert_eq!(smoothing_px(1.0), SMOOTH_MAX_PX);
        let mid = smoothing_px(0.5 * (SMOOTH_ABOVE + SMOOTH_FULL_AT));
        assert!((mid - 0.5 * SMOOTH_MAX_PX).abs() < 1e-4);
    }

    #[test]
    fn blur_keeps_mass_and_constant_and_lowers_the_noise() {
        let mut img = vec![0.0f32; 21 * 21];
        img[10 * 21 + 10] = 1.0;
        gaussian_blur(&mut img, 21, 21, 1.5);
        let mass: f32 = img.iter().sum();
        assert!((mass - 1.0).abs() < 1e-4, "{mass}");
        assert!(img[10 * 21 + 10] < 0.1 && img[10 * 21 + 11] > 0.0);
        let mut flat = vec![0.7f32; 64];
        gaussian_blur(&mut flat, 8, 8, 2.0);
        assert!(flat.iter().all(|v| (v - 0.7).abs() < 1e-5));
        let mut n = noisy(0.03, 9);
        let before = estimate(&n, 128, 128);
        gaussian_blur(&mut n, 128, 128, 1.0);
        assert!(estimate(&n, 128, 128) < 0.3 * before);
    }
}
