//! Gradients through the solver: dθ*/dl by the implicit function theorem.
//!
//! At the optimum of `F(θ, l) = Σ_i w_i ||π_i(θ) − l_i||²` (eq. 4, weighted), the gradient
//! `g(θ, l) = Σ_i w_i J_iᵀ (π_i(θ) − l_i)` vanishes. Differentiating `g(θ*(l), l) = 0`:
//!
//! `∂g/∂θ · dθ*/dl + ∂g/∂l = 0`, with `∂g/∂l_i = −w_i J_iᵀ` and
//! `∂g/∂θ = Σ_i w_i (J_iᵀ J_i + Σ_k r_ik ∇²π_ik)` (r = π − l), so
//!
//! `dθ*/dl_i = H⁻¹ w_i J_iᵀ`.
//!
//! [`SecondOrder::GaussNewton`] keeps only `Jᵀ W J` in H (exact when the residuals vanish, as
//! for noise-free landmarks); [`SecondOrder::Full`] keeps the residual-curvature terms too,
//! obtained as central differences of the analytic gradient `g` (exact to ~1e-9), which is what
//! matches finite differences of the whole solve. J is taken in the Rodrigues parameters of
//! eqs. 5-7, the θ of eq. 10.

use super::Problem;
use super::jacobian::project_with_jacobian;
use crate::geometry::Pose;
use nalgebra::{DMatrix, Matrix6, Vector6};

/// Which terms of `∂g/∂θ` to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondOrder {
    /// `H = Jᵀ W J`.
    GaussNewton,
    /// `H = Jᵀ W J + Σ w r ∇²π` (exact Hessian of eq. 4 / 2).
    Full,
}

fn gradient(pb: &Problem, inliers: &[bool], pose: &Pose) -> Vector6<f64> {
    let mut g = Vector6::zeros();
    for i in (0..pb.points3d.len()).filter(|&i| inliers[i]) {
        let Some(l) = pb.points2d[i] else { continue };
        let (uv, j) = project_with_jacobian(pb.camera, pose, &pb.points3d[i]);
        g += j.transpose() * (uv - l) * pb.weight(i);
    }
    g
}

/// `dθ*/dl` as a 6 x 2N matrix (columns: u_1, v_1, u_2, ...); zero columns for landmarks that
/// did not take part. `None` when H is singular.
pub fn pose_jacobian_wrt_points(
    pb: &Problem,
    inliers: &[bool],
    pose: &Pose,
    mode: SecondOrder,
) -> Option<DMatrix<f64>> {
    let n = pb.points3d.len();
    let mut jtwj = Matrix6::zeros();
    let mut js = Vec::with_capacity(n);
    for (i, inlier) in inliers.iter().enumerate().take(n) {
        let active = *inlier && pb.points2d[i].is_some();
        let (_, j) = project_with_jacobian(pb.camera, pose, &pb.points3d[i]);
        if active {
            jtwj += j.transpose() * j * pb.weight(i);
        }
        js.push(active.then_some(j));
    }
    let h = match mode {
        SecondOrder::GaussNewton => jtwj,
        SecondOrder::Full => {
            let mut h = Matrix6::zeros();
            let p = pose.params();
            for k in 0..6 {
                let step = 1e-6 * p[k].abs().max(1.0);
                let (mut a, mut b) = (p, p);
                a[k] += step;
                b[k] -= step;
                let col = (gradient(pb, inliers, &Pose::from_params(&a))
                    - gradient(pb, inliers, &Pose::from_params(&b)))
                    / (2.0 * step);
                h.set_column(k, &col);
            }
            (h + h.transpose()) * 0.5
        }
    };
    let hinv = h.try_inverse()?;
    let mut out = DMatrix::zeros(6, 2 * n);
    for (i, j) in js.iter().enumerate() {
        if let Some(j) = j {
            let block = hinv * j.transpose() * pb.weight(i);
            out.view_mut((0, 2 * i), (6, 2)).copy_from(&block);
        }
    }
    Some(out)
}
