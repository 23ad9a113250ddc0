//! The simulated C-arm: DRRs of a CT along a smooth pose trajectory, seen through a detector
//! with X-ray quantum noise and the datasets' unsharpness, so that the whole pipeline can be
//! watched (and measured against the true pose) with no scanner.

use crate::geometry::sampling::perturbed_pose;
use crate::geometry::{Camera, Pose};
use nalgebra::{Point3, Vector3};
use rand::SeedableRng;
use rand_distr::{Distribution, Poisson};

pub use crate::drr::{CpuDrr, DrrSource};

/// A smooth, periodic C-arm motion around the AP view: each rotation and translation component
/// oscillates with its own incommensurate frequency (a Lissajous path), so the stream visits many
/// poses without repeating itself quickly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trajectory {
    /// The point the C-arm turns about (LPS mm), usually the CT's isocentre.
    pub isocenter: Point3<f64>,
    /// Source-to-isocentre distance, mm.
    pub sod_mm: f64,
    /// Rotation amplitude about each patient axis, radians.
    pub rotation_amplitude_rad: Vector3<f64>,
    /// Translation amplitude along each camera axis, mm.
    pub translation_amplitude_mm: Vector3<f64>,
    /// Period of the slowest component, seconds.
    pub period_s: f64,
}

impl Trajectory {
    /// A gentle default: ±15° tilts, ±20 mm shifts, a 20 s cycle.
    pub fn around(isocenter: Point3<f64>) -> Self {
        Self {
            isocenter,
            sod_mm: 800.0,
            rotation_amplitude_rad: Vector3::new(
                15f64.to_radians(),
                12f64.to_radians(),
                10f64.to_radians(),
            ),
            translation_amplitude_mm: Vector3::new(20.0, 20.0, 40.0),
            period_s: 20.0,
        }
    }

    /// The pose at time `t_s`.
    pub fn pose_at(&self, t_s: f64) -> Pose {
        let w = std::f64::consts::TAU / self.period_s.max(1e-3);
        // Frequency ratios 1 : φ : √2 ... keep the components out of step.
        let f = [
            1.0,
            1.618_033_988_75,
            std::f64::consts::SQRT_2,
            std::f64::consts::FRAC_1_SQRT_2,
            1.324_717_957_24,
            0.866_025_403_78,
        ];
        let s = |k: usize| (w * f[k] * t_s + k as f64).sin();
        let rot = Vector3::new(s(0), s(1), s(2)).component_mul(&self.rotation_amplitude_rad);
        let shift = Vector3::new(s(3), s(4), s(5)).component_mul(&self.translation_amplitude_mm);
        perturbed_pose(&self.isocenter, self.sod_mm, &rot, &shift)
    }
}

/// X-ray quantum noise: each detector pixel counts `Poisson(N0 e^{-∫μ})` photons; the frame is
/// the noisy line integral `-ln(counts / N0)` (zero counts clamped to half a photon).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantumNoise {
    /// Photons per pixel with nothing in the beam (fluoroscopy: a few hundred to a few thousand).
    pub photons_per_pixel: f64,
}

impl QuantumNoise {
    /// Adds noise to a line-integral image (physical attenuation, per mm x mm).
    pub fn apply(&self, integral: &[f32], rng: &mut impl rand::Rng) -> Vec<f32> {
        let n0 = self.photons_per_pixel.max(1.0);
        integral
            .iter()
            .map(|&a| {
                let lambda = n0 * (-(a.max(0.0) as f64)).exp();
                let counts = Poisson::new(lambda.max(1e-9))
                    .map(|p| p.sample(rng))
                    .unwrap_or(lambda);
                (-(counts.max(0.5) / n0).ln()) as f32
            })
            .collect()
    }
}

/// The simulated detector: quantum noise at a dose, then the detector's unsharpness.
///
/// Its blur is the training datasets' (`dataset --blur 0.5` at 256 px: 0.75 mm on the paper's
/// detector), so that a dose in photons per pixel means the same noise live as in a dataset: the
/// app's smoothing thresholds, `eval`'s and `bench pipeline`'s noise levels and the low-dose
/// numbers of the model card are then on one scale. Without it a live frame at a given dose was
/// 1.7-2.2x as noisy as a dataset image at that dose (stop 40's measurement).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detector {
    /// Quantum noise.
    pub noise: QuantumNoise,
    /// Gaussian unsharpness, sigma in mm at the detector; 0 = none.
    pub blur_mm: f64,
}

impl Detector {
    /// The datasets' unsharpness: 0.5 px at 256 px of the 768 x 0.5 mm paper detector.
    pub const DATASET_BLUR_MM: f64 = 0.75;

    /// The datasets' detector at a dose.
    pub fn at_dose(photons_per_pixel: f64) -> Self {
        Self {
            noise: QuantumNoise { photons_per_pixel },
            blur_mm: Self::DATASET_BLUR_MM,
        }
    }

    /// A frame of line integrals as this detector records it: noise, then blur (the order
    /// `dataset` applies them in).
    pub fn apply(&self, integral: &[f32], camera: &Camera, rng: &mut impl rand::Rng) -> Vec<f32> {
        let mut out = self.noise.apply(integral, rng);
        let (w, h) = (camera.width_px as usize, camera.height_px as usize);
        // Square pixels in every camera here; the mean spacing covers any that are not.
        let sigma_px = self.blur_mm / (0.5 * (camera.delx_mm + camera.dely_mm));
        crate::model::noise::gaussian_blur(&mut out, w, h, sigma_px);
        out
    }
}

/// One frame of a simulated stream.
#[derive(Clone, Debug)]
pub struct SimFrame {
    /// Frame number.
    pub index: u64,
    /// Time in the stream, seconds.
    pub time_s: f64,
    /// The pose the frame was rendered at (the ground truth).
    pub pose: Pose,
    /// Noisy line integrals, `height x width`, row 0 at the top.
    pub pixels: Vec<f32>,
}

/// The simulated C-arm: a trajectory, a renderer, noise, a frame rate, a seed.
pub struct SimulatedStream<R: DrrSource> {
    /// The C-arm's motion.
    pub trajectory: Trajectory,
    /// The detector.
    pub camera: Camera,
    /// Frames per second of stream time.
    pub fps: f64,
    /// The detector; `None` for clean DRRs.
    pub detector: Option<Detector>,
    renderer: R,
    rng: rand_chacha::ChaCha8Rng,
    next: u64,
}

impl<R: DrrSource> SimulatedStream<R> {
    /// A stream starting at frame 0.
    pub fn new(
        trajectory: Trajectory,
        camera: Camera,
        renderer: R,
        fps: f64,
        detector: Option<Detector>,
        seed: u64,
    ) -> Self {
        Self {
            trajectory,
            camera,
            fps: fps.max(1e-3),
            detector,
            renderer,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            next: 0,
        }
    }

    /// Jumps to frame `index` (seek).
    pub fn seek(&mut self, index: u64) {
        self.next = index;
    }

    /// Renders the next frame.
    pub fn next_frame(&mut self) -> Result<SimFrame, String> {
        let index = self.next;
        let time_s = index as f64 / self.fps;
        let pose = self.trajectory.pose_at(time_s);
        let clean = self.renderer.render(&self.camera, &pose)?;
        let pixels = match &self.detector {
            Some(d) => d.apply(&clean, &self.camera, &mut self.rng),
            None => clean,
        };
        self.next += 1;
        Ok(SimFrame {
            index,
            time_s,
            pose,
            pixels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trajectory_is_smooth_and_bounded() {
        let t = Trajectory::around(Point3::new(10.0, -20.0, 30.0));
        let ap = perturbed_pose(&t.isocenter, t.sod_mm, &Vector3::zeros(), &Vector3::zeros());
        let mut prev = t.pose_at(0.0);
        for k in 1..2000 {
            let p = t.pose_at(k as f64 * 0.01);
            // 10 ms apart: at most a small step.
            assert!(crate::registration::metrics::rotation_error_deg(&p, &prev) < 0.5);
            assert!((p.source_world() - prev.source_world()).norm() < 10.0);
            // Never further from AP than the amplitudes allow (|rot| <= 15+12+10 deg).
            assert!(crate::registration::metrics::rotation_error_deg(&p, &ap) < 37.1);
            prev = p;
        }
    }

    #[test]
    fn quantum_noise_has_poisson_statistics() {
        let n = QuantumNoise {
            photons_per_pixel: 1000.0,
        };
        let a = 1.0f32; // e^-1 of the photons get through: λ ≈ 368
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let out = n.apply(&vec![a; 20000], &mut rng);
        let counts: Vec<f64> = out.iter().map(|v| 1000.0 * (-(*v as f64)).exp()).collect();
        let mean = counts.iter().sum::<f64>() / counts.len() as f64;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
        let lambda = 1000.0 * (-1.0f64).exp();
        assert!((mean - lambda).abs() < 1.0, "{mean}");
        assert!((var / lambda - 1.0).abs() < 0.05, "{var} vs {lambda}");
        // Same seed, same noise.
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        assert_eq!(n.apply(&[0.5; 10], &mut r1), n.apply(&[0.5; 10], &mut r2));
    }
}
