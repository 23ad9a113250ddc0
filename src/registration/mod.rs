//! Landmark-based 2D/3D registration (paper eqs. 3-8): the pose θ = (r, t) that projects the CT's
//! 3D landmarks onto the 2D landmarks found on a frame.
//!
//! - [`solve`]: the production solver. Every triplet of landmarks gives up to four exact poses
//!   (P3P, [`p3p`]); the one most landmarks agree with (MSAC over triplets, so one grossly wrong
//!   landmark cannot pull the pose) starts a Levenberg-Marquardt refinement of eq. 4 with an
//!   analytic Jacobian and per-landmark weights. It returns the pose, reprojection errors,
//!   the pose covariance and a status.
//! - [`paper`]: the paper's own solver for comparison (Adam, lr 1e-3, 100 iterations from
//!   r = t = 0) and its L-BFGS variant, generic over f32/f64.
//! - [`implicit`]: dθ*/dl by the implicit function theorem, for the pose estimation loss.
//! - [`intensity`]: beyond the paper, the landmark pose refined by matching the frame against
//!   DRRs of the CT (gradient correlation, coarse to fine).
//! - [`metrics`]: eq. 10's L_pose, rotation/translation errors, TRE, RMSE.
//!
//! Units: pixels for 2D points, LPS millimetres for 3D points; the pose is camera_from_world.

pub mod consensus;
pub mod implicit;
pub mod intensity;
pub mod jacobian;
pub mod layer;
mod lm;
pub mod metrics;
pub mod p3p;
pub mod paper;
pub mod tracking;

pub use lm::{LmOptions, robust_hypotheses, solve, solve_from};

use crate::geometry::{Camera, Pose};
use nalgebra::{Matrix6, Point2, Point3};
use serde::Serialize;

/// One registration problem: N 3D points, N 2D points (absent = `None`), optional weights.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    /// The C-arm intrinsics (eq. 8's K).
    pub camera: &'a Camera,
    /// The CT's landmarks, LPS mm.
    pub points3d: &'a [Point3<f64>],
    /// The frame's landmarks, pixels; `None` = not visible.
    pub points2d: &'a [Option<Point2<f64>>],
    /// Per-landmark weights (e.g. heatmap confidence); `None` = all 1.
    pub weights: Option<&'a [f64]>,
}

impl Problem<'_> {
    /// Weight of landmark `i` (0 when it is absent).
    pub fn weight(&self, i: usize) -> f64 {
        if self.points2d[i].is_none() {
            return 0.0;
        }
        self.weights.map_or(1.0, |w| w[i])
    }

    /// Indices of the landmarks that take part (present, weight > 0).
    pub fn active(&self) -> Vec<usize> {
        (0..self.points3d.len())
            .filter(|&i| self.weight(i) > 0.0)
            .collect()
    }

    /// Checks sizes and finiteness.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.points3d.len();
        if self.points2d.len() != n {
            return Err(format!(
                "{n} 3D points but {} 2D points",
                self.points2d.len()
            ));
        }
        if let Some(w) = self.weights {
            if w.len() != n {
                return Err(format!("{n} points but {} weights", w.len()));
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err("weights must be finite and non-negative".into());
            }
        }
        if self
            .points3d
            .iter()
            .any(|p| !p.coords.iter().all(|v| v.is_finite()))
        {
            return Err("a 3D point is not finite".into());
        }
        if self
            .points2d
            .iter()
            .flatten()
            .any(|p| !(p.x.is_finite() && p.y.is_finite()))
        {
            return Err(
                "a 2D point is NaN or infinite (mark absent landmarks as absent instead)".into(),
            );
        }
        self.camera.validate()
    }
}

/// How a solve ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The optimum was reached (gradient or step below tolerance).
    Converged,
    /// The iteration limit came first; the pose is the best found.
    MaxIterations,
    /// Fewer than 4 usable landmarks: the pose is not determined.
    TooFewLandmarks,
    /// The landmarks are collinear (in 3D or in the image): no unique pose.
    Degenerate,
    /// The best pose puts landmarks behind the source: no physical solution.
    BehindSource,
    /// NaN, infinite or mismatched input.
    InvalidInput,
}

impl Status {
    /// Whether the pose can be used.
    pub fn ok(self) -> bool {
        matches!(self, Status::Converged | Status::MaxIterations)
    }
}

/// What a solve returns.
#[derive(Clone, Debug)]
pub struct Solution {
    /// The pose (meaningful only when `status.ok()`).
    pub pose: Pose,
    /// Reprojection error per landmark, px (`None` for absent ones).
    pub residual_px: Vec<Option<f64>>,
    /// Root mean square reprojection error over the inliers, px.
    pub rmse_px: f64,
    /// Landmarks the solution trusts (false: absent, zero weight, or rejected as an outlier).
    pub inliers: Vec<bool>,
    /// Covariance of (rx, ry, rz, tx, ty, tz) from the residual variance and `(Jᵀ W J)⁻¹`.
    pub covariance: Matrix6<f64>,
    /// `Jᵀ W J` at the pose (per px²): the covariance for landmarks of a known noise σ (px) is
    /// `σ² (Jᵀ W J)⁻¹` ([`tracking`] weighs frames so).
    pub information: Matrix6<f64>,
    /// Levenberg-Marquardt iterations.
    pub iterations: usize,
    /// How it ended.
    pub status: Status,
}

impl Solution {
    pub(crate) fn failed(n: usize, status: Status) -> Self {
        Self {
            pose: Pose::default(),
            residual_px: vec![None; n],
            rmse_px: f64::NAN,
            inliers: vec![false; n],
            covariance: Matrix6::from_element(f64::NAN),
            information: Matrix6::zeros(),
            iterations: 0,
            status,
        }
    }
}

/// Solves the pose from detected 2D landmarks (with confidences as weights) and a CT's 3D
/// landmarks (absent ones do not take part): from `init` when given (the previous frame's
/// pose), falling back to the robust global start when that does not converge well.
pub fn solve_detections(
    camera: &Camera,
    points3d: &[Option<Point3<f64>>],
    detections: &[(Point2<f64>, f64)],
    init: Option<&Pose>,
) -> Solution {
    let pts: Vec<Point3<f64>> = points3d.iter().map(|p| p.unwrap_or_default()).collect();
    let p2: Vec<Option<Point2<f64>>> = detections.iter().map(|d| Some(d.0)).collect();
    let w: Vec<f64> = detections
        .iter()
        .zip(points3d)
        .map(|(d, p)| if p.is_some() { d.1.max(1e-3) } else { 0.0 })
        .collect();
    let pb = Problem {
        camera,
        points3d: &pts,
        points2d: &p2,
        weights: Some(&w),
    };
    let opts = LmOptions::default();
    if let Some(prev) = init {
        let s = solve_from(&pb, prev, &opts);
        if s.status.ok() && s.rmse_px <= 5.0 {
            return s;
        }
    }
    solve(&pb, &opts)
}
