//! Pose tracking over a stream, beyond the paper: a C-arm moves smoothly or not at all between
//! frames, so each frame's solved pose is one noisy measurement of a moving state. A Kalman
//! filter with a constant-velocity model fuses them: what one view measures poorly (depth, the
//! out-of-plane tilts) is averaged over frames; what it measures well follows at once.
//!
//! - State: the six pose parameters (Rodrigues r, t; as [`Pose::params`]) and their rates.
//! - Motion: white-noise acceleration of a set spectral density (rotation, translation).
//! - Measurement: the solve's pose, with covariance `σ² (JᵀWJ)⁻¹` for a set landmark noise σ in
//!   pixels ([`Solution::information`]) rather than the solve's own residual variance, which
//!   8 landmarks (10 degrees of freedom) estimate too noisily to weigh frames by.
//! - A measurement too far from the prediction (Mahalanobis distance beyond the gate) is a jump
//!   (the C-arm was moved, or the frame changed): the filter restarts there instead of dragging.
//! - A frame without a usable measurement (a failed solve, or one the caller holds back, such as
//!   a frame the network is unsure of) is predicted only; after [`TrackerOptions::max_gap_s`]
//!   of those the filter has nothing to say until the next measurement restarts it.

use super::Solution;
use crate::geometry::Pose;
use nalgebra::{Matrix6, SMatrix, SVector, Vector6};

type State = SVector<f64, 12>;
type Cov = SMatrix<f64, 12, 12>;

/// Settings of the filter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackerOptions {
    /// Landmark noise, pixels of the frame, for the measurement covariance.
    pub landmark_sigma_px: f64,
    /// Spectral density of the angular acceleration, (rad/s²)² s: how briskly the tilts may
    /// change speed.
    pub rotation_accel: f64,
    /// Spectral density of the linear acceleration, (mm/s²)² s.
    pub translation_accel: f64,
    /// Squared Mahalanobis distance beyond which a measurement restarts the filter (the 99.9%
    /// point of χ² with 6 degrees of freedom is 22.5).
    pub gate_chi2: f64,
    /// With no usable measurement for this long, the next one restarts the filter, s.
    pub max_gap_s: f64,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            landmark_sigma_px: 2.0,
            rotation_accel: 0.05,
            translation_accel: 2500.0,
            gate_chi2: 22.5,
            max_gap_s: 1.0,
        }
    }
}

/// The tracked pose of a frame.
#[derive(Clone, Copy, Debug)]
pub struct Tracked {
    /// The filtered pose.
    pub pose: Pose,
    /// Its covariance (rx, ry, rz, tx, ty, tz).
    pub covariance: Matrix6<f64>,
    /// This frame restarted the filter (first frame, a jump or a gap).
    pub restarted: bool,
    /// This frame's solve entered the filter; `false`: the pose is the prediction only.
    pub measured: bool,
}

/// The filter. Feed it every frame's solution in time order; [`PoseTracker::reset`] when the
/// source, camera or CT changes.
#[derive(Clone, Debug)]
pub struct PoseTracker {
    opts: TrackerOptions,
    x: State,
    p: Cov,
    t_s: Option<f64>,
    last_measured_s: f64,
}

impl PoseTracker {
    /// A filter with no state yet.
    pub fn new(opts: TrackerOptions) -> Self {
        Self {
            opts,
            x: State::zeros(),
            p: Cov::zeros(),
            t_s: None,
            last_measured_s: f64::NEG_INFINITY,
        }
    }

    /// Forgets the state: the next measurement starts afresh.
    pub fn reset(&mut self) {
        self.t_s = None;
    }

    /// Takes the frame at time `t_s` (seconds, increasing) and its solution (`None` or a
    /// failed solve: prediction only). Returns the tracked pose, or `None` before the first
    /// usable measurement and after [`TrackerOptions::max_gap_s`] without one (a prediction
    /// that far from its last measurement is a guess).
    pub fn update(&mut self, t_s: f64, solution: Option<&Solution>) -> Option<Tracked> {
        let measured = solution
            .filter(|s| s.status.ok() && s.pose.is_finite())
            .and_then(|s| Some((s.pose.params(), self.measurement_cov(s)?)));
        let stale = t_s - self.last_measured_s > self.opts.max_gap_s;
        let Some(prev_t) = self
            .t_s
            .filter(|p| t_s >= *p && !(stale && measured.is_some()))
        else {
            // First frame, time going backwards, or a long gap: restart at the measurement.
            let (z, r) = measured?;
            self.start(t_s, &z, &r);
            return Some(self.tracked(true, true));
        };
        self.predict(t_s - prev_t);
        self.t_s = Some(t_s);
        let Some((z, r)) = measured else {
            return (!stale).then(|| self.tracked(false, false));
        };
        let y = Vector6::from_row_slice(&z) - self.x.fixed_rows::<6>(0);
        let s = self.p.fixed_view::<6, 6>(0, 0) + r;
        let Some(s_inv) = s.try_inverse() else {
            return Some(self.tracked(false, false));
        };
        if (y.transpose() * s_inv * y)[(0, 0)] > self.opts.gate_chi2 {
            self.start(t_s, &z, &r);
            return Some(self.tracked(true, true));
        }
        // K = P Hᵀ S⁻¹ with H = [I 0].
        let k: SMatrix<f64, 12, 6> = self.p.fixed_columns::<6>(0) * s_inv;
        self.x += k * y;
        let kh_p: Cov = k * self.p.fixed_rows::<6>(0);
        self.p -= kh_p;
        self.p = (self.p + self.p.transpose()) * 0.5;
        self.last_measured_s = t_s;
        Some(self.tracked(false, true))
    }

    fn measurement_cov(&self, s: &Solution) -> Option<Matrix6<f64>> {
        let r = s.information.try_inverse()? * self.opts.landmark_sigma_px.powi(2);
        r.iter().all(|v| v.is_finite()).then_some(r)
    }

    fn start(&mut self, t_s: f64, z: &[f64; 6], r: &Matrix6<f64>) {
        self.x = State::zeros();
        self.x.fixed_rows_mut::<6>(0).copy_from_slice(z);
        self.p = Cov::zeros();
        self.p.fixed_view_mut::<6, 6>(0, 0).copy_from(r);
        // Rates unknown: a C-arm turns up to ~30°/s and moves up to ~100 mm/s.
        for i in 0..3 {
            self.p[(6 + i, 6 + i)] = 0.5f64.powi(2);
            self.p[(9 + i, 9 + i)] = 100f64.powi(2);
        }
        self.t_s = Some(t_s);
        self.last_measured_s = t_s;
    }

    fn predict(&mut self, dt: f64) {
        if dt <= 0.0 {
            return;
        }
        let mut f = Cov::identity();
        for i in 0..6 {
            f[(i, 6 + i)] = dt;
        }
        self.x = f * self.x;
        let mut q = Cov::zeros();
        for i in 0..6 {
            let qc = if i < 3 {
                self.opts.rotation_accel
            } else {
                self.opts.translation_accel
            };
            q[(i, i)] = qc * dt.powi(3) / 3.0;
            q[(i, 6 + i)] = qc * dt.powi(2) / 2.0;
            q[(6 + i, i)] = qc * dt.powi(2) / 2.0;
            q[(6 + i, 6 + i)] = qc * dt;
        }
        self.p = f * self.p * f.transpose() + q;
    }

    fn tracked(&self, restarted: bool, measured: bool) -> Tracked {
        let v = self.x.fixed_rows::<6>(0);
        Tracked {
            pose: Pose::from_params(&[v[0], v[1], v[2], v[3], v[4], v[5]]),
            covariance: self.p.fixed_view::<6, 6>(0, 0).into_owned(),
            restarted,
            measured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Camera;
    use crate::registration::{Problem, metrics, solve};
    use nalgebra::{Point2, Point3, Vector3};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// The solve of the phantom's landmarks seen at `pose`, each moved by `noise()` px per axis.
    fn solve_seen(
        camera: &Camera,
        p3: &[Point3<f64>],
        pose: &Pose,
        mut noise: impl FnMut() -> f64,
    ) -> Solution {
        let p2: Vec<Option<Point2<f64>>> = p3
            .iter()
            .map(|p| {
                let q = camera.project(pose, p);
                Some(Point2::new(q.x + noise(), q.y + noise()))
            })
            .collect();
        let pb = Problem {
            camera,
            points3d: p3,
            points2d: &p2,
            weights: None,
        };
        solve(&pb, &Default::default())
    }

    /// A C-arm gliding along a smooth path, 8 phantom landmarks seen with 2 px of noise per
    /// frame and solved per frame: the tracked pose is closer to the truth than the per-frame
    /// solves, and a sudden repositioning restarts the filter instead of being smoothed away.
    #[test]
    fn tracking_a_moving_c_arm_beats_per_frame_solves_and_follows_a_jump() {
        let camera = Camera::paper(256);
        let (vol, lm) = crate::volume::phantom::phantom_subject(5, Some(4.0));
        let p3: Vec<Point3<f64>> = lm.present();
        let iso = vol.center_mm();
        let path = |t: f64| {
            let rot = Vector3::new(0.2 * (0.3 * t).sin(), 0.15 * (0.2 * t).cos(), 0.1);
            let shift = Vector3::new(10.0 * (0.25 * t).sin(), 5.0, 20.0 * (0.3 * t).sin());
            crate::geometry::sampling::perturbed_pose(&iso, 800.0, &rot, &shift)
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let noise = Normal::new(0.0, 2.0).unwrap();
        let mut tracker = PoseTracker::new(TrackerOptions::default());
        let (mut raw, mut tracked) = (Vec::new(), Vec::new());
        let fps = 10.0;
        for k in 0..150 {
            let t = k as f64 / fps;
            // At 10 s the C-arm is swung 20° in one frame.
            let truth = if t >= 10.0 {
                Pose::from_matrix(
                    &(nalgebra::Rotation3::from_axis_angle(&Vector3::y_axis(), 0.35).matrix()
                        * path(t).rotation_matrix()),
                    path(t).translation_mm,
                )
            } else {
                path(t)
            };
            let sol = solve_seen(&camera, &p3, &truth, || noise.sample(&mut rng));
            assert!(sol.status.ok());
            let out = tracker.update(t, Some(&sol)).unwrap();
            if k == 0 {
                assert!(out.restarted);
            }
            if k == 100 {
                assert!(out.restarted, "the 20° swing restarts the filter");
            }
            // Skip the settling frames after each (re)start.
            if (20..100).contains(&k) || k >= 120 {
                raw.push(metrics::mean_tre_mm(&sol.pose, &truth, &p3));
                tracked.push(metrics::mean_tre_mm(&out.pose, &truth, &p3));
            }
            if k == 101 {
                // Right after the swing the tracked pose is already near the new pose.
                assert!(metrics::rotation_error_deg(&out.pose, &truth) < 5.0);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (r, t) = (mean(&raw), mean(&tracked));
        assert!(t < 0.7 * r, "tracked TRE {t:.2} mm vs per-frame {r:.2} mm");
    }

    #[test]
    fn no_measurement_means_no_pose_and_a_gap_restarts() {
        let mut tr = PoseTracker::new(TrackerOptions::default());
        assert!(tr.update(0.0, None).is_none());
        let camera = Camera::paper(256);
        let (_, lm) = crate::volume::phantom::phantom_subject(5, Some(4.0));
        let p3: Vec<Point3<f64>> = lm.present();
        let pose = crate::geometry::sampling::ap_pose(&Point3::origin(), 800.0);
        let sol = solve_seen(&camera, &p3, &pose, || 0.0);
        assert!(tr.update(0.0, Some(&sol)).unwrap().restarted);
        // Frames without a pose: the prediction carries on, and says so.
        let predicted = tr.update(0.1, None).unwrap();
        assert!(!predicted.restarted && !predicted.measured);
        let fused = tr.update(0.2, Some(&sol)).unwrap();
        assert!(!fused.restarted && fused.measured);
        assert!(!tr.update(1.0, None).unwrap().restarted);
        // Over a second without a pose: no pose, and the next one restarts.
        assert!(tr.update(1.3, None).is_none());
        assert!(tr.update(2.5, Some(&sol)).unwrap().restarted);
        tr.reset();
        assert!(tr.update(2.6, Some(&sol)).unwrap().restarted);
    }
}
