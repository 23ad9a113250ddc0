//! The production solver: robust P3P initialisation over landmark triplets, then
//! Levenberg-Marquardt on eq. 4 (weighted) with an analytic Jacobian.

use super::jacobian::{project_with_jacobian, projection_jacobian};
use super::p3p::p3p;
use super::{Problem, Solution, Status};
use crate::geometry::{Pose, rodrigues, rodrigues_log, skew};
use nalgebra::{Matrix2x6, Matrix3, Matrix6, Point3, Vector6};

/// Options of [`solve`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct LmOptions {
    /// Maximum Levenberg-Marquardt iterations.
    pub max_iterations: usize,
    /// A landmark whose reprojection error exceeds this (px) at the robust initial pose is
    /// treated as an outlier and left out of the refinement.
    pub outlier_px: f64,
    /// Stop when the relative step is below this.
    pub step_tolerance: f64,
    /// Stop when the gradient's largest component is below this.
    pub gradient_tolerance: f64,
}

impl Default for LmOptions {
    fn default() -> Self {
        Self { max_iterations: 100, outlier_px: 20.0, step_tolerance: 1e-12, gradient_tolerance: 1e-10 }
    }
}

/// Checks the input; returns the active landmark indices or the failure status.
fn precheck(pb: &Problem) -> Result<Vec<usize>, Status> {
    if pb.validate().is_err() {
        return Err(Status::InvalidInput);
    }
    let act = pb.active();
    if act.len() < 4 {
        return Err(Status::TooFewLandmarks);
    }
    // Collinear 3D points: the smallest two principal extents vanish.
    let c = act.iter().fold(nalgebra::Vector3::zeros(), |a, &i| a + pb.points3d[i].coords) / act.len() as f64;
    let cov = act.iter().fold(Matrix3::zeros(), |a, &i| {
        let d = pb.points3d[i].coords - c;
        a + d * d.transpose()
    });
    let mut ev = cov.symmetric_eigenvalues();
    ev.as_mut_slice().sort_by(f64::total_cmp);
    if ev[1] <= 1e-9 * ev[2].max(1e-300) {
        return Err(Status::Degenerate);
    }
    Ok(act)
}

/// Solves eq. 3-4 from a robust initial pose. See the module docs.
pub fn solve(pb: &Problem, opts: &LmOptions) -> Solution {
    let n = pb.points3d.len();
    let act = match precheck(pb) {
        Ok(a) => a,
        Err(s) => return Solution::failed(n, s),
    };
    let Some(init) = robust_init(pb, &act, opts) else {
        return Solution::failed(n, Status::Degenerate);
    };
    refine_with_inliers(pb, &act, init, opts)
}

/// Solves eq. 3-4 starting at `init` (all active landmarks trusted).
pub fn solve_from(pb: &Problem, init: &Pose, opts: &LmOptions) -> Solution {
    let n = pb.points3d.len();
    let act = match precheck(pb) {
        Ok(a) => a,
        Err(s) => return Solution::failed(n, s),
    };
    let mut inl = vec![false; n];
    for &i in &act {
        inl[i] = true;
    }
    levenberg_marquardt(pb, &inl, init, opts)
}

fn reproj_error(pb: &Problem, pose: &Pose, i: usize) -> f64 {
    let Some(l) = pb.points2d[i] else { return f64::INFINITY };
    let q = pose.camera_from_world(&pb.points3d[i]);
    if q.z <= 1e-3 {
        return f64::INFINITY;
    }
    (pb.camera.project_camera(&q) - l).norm()
}

/// Triplets in an order that tries well-spread landmarks first.
fn triplets(pb: &Problem, act: &[usize]) -> Vec<[usize; 3]> {
    let mut t = Vec::new();
    for a in 0..act.len() {
        for b in a + 1..act.len() {
            for c in b + 1..act.len() {
                t.push([act[a], act[b], act[c]]);
            }
        }
    }
    let area = |tr: &[usize; 3]| {
        let p = tr.map(|i| pb.points3d[i]);
        (p[1] - p[0]).cross(&(p[2] - p[0])).norm()
    };
    t.sort_by(|x, y| area(y).total_cmp(&area(x)));
    t
}

/// MSAC over landmark triplets: the P3P pose that most landmarks agree with.
fn robust_init(pb: &Problem, act: &[usize], opts: &LmOptions) -> Option<Pose> {
    let tau2 = opts.outlier_px * opts.outlier_px;
    let mut best: Option<(f64, usize, Pose)> = None;
    let all = triplets(pb, act);
    for (k, tr) in all.iter().enumerate() {
        let world = tr.map(|i| pb.points3d[i]);
        let Some(uv) = tr.iter().map(|&i| pb.points2d[i]).collect::<Option<Vec<_>>>() else { continue };
        for pose in p3p(pb.camera, world, [uv[0], uv[1], uv[2]]) {
            let mut cost = 0.0;
            let mut inl = 0;
            for &i in act {
                let e = reproj_error(pb, &pose, i);
                cost += pb.weight(i) * (e * e).min(tau2);
                inl += usize::from(e * e < tau2);
            }
            if best.as_ref().is_none_or(|b| cost < b.0) {
                best = Some((cost, inl, pose));
            }
        }
        // Stop early once the best hypothesis has all landmarks but at most one as inliers and
        // enough triplets were tried to have met an all-inlier one with high probability
        // (inlier ratio w: 1 - (1 - w³)^k > 0.999).
        if let Some((_, inl, _)) = &best {
            let w = *inl as f64 / act.len() as f64;
            let needed = (0.001f64.ln() / (1.0 - w.powi(3)).max(1e-12).ln()).ceil() as usize;
            if *inl + 1 >= act.len() && k + 1 >= needed.max(1) {
                break;
            }
        }
    }
    best.map(|b| b.2)
}

fn refine_with_inliers(pb: &Problem, act: &[usize], init: Pose, opts: &LmOptions) -> Solution {
    let n = pb.points3d.len();
    let mut inl = vec![false; n];
    for &i in act {
        inl[i] = reproj_error(pb, &init, i) < opts.outlier_px;
    }
    if inl.iter().filter(|b| **b).count() < 4 {
        for &i in act {
            inl[i] = true;
        }
    }
    let mut sol = levenberg_marquardt(pb, &inl, &init, opts);
    // A landmark rejected at the rough start may fit the refined pose: re-admit and refine once.
    if sol.status.ok() {
        let again: Vec<bool> = (0..n).map(|i| act.contains(&i) && reproj_error(pb, &sol.pose, i) < opts.outlier_px).collect();
        if again != inl && again.iter().filter(|b| **b).count() >= 4 {
            let iters = sol.iterations;
            sol = levenberg_marquardt(pb, &again, &sol.pose.clone(), opts);
            sol.iterations += iters;
        }
    }
    sol
}

/// Weighted residuals and the Jacobian with respect to a left rotation increment δ
/// (`R ← Exp(δ) R`) and the translation: `∂q/∂δ = -[R p]x`.
fn linearize(pb: &Problem, inl: &[bool], rm: &Matrix3<f64>, t: &nalgebra::Vector3<f64>) -> (f64, Matrix6<f64>, Vector6<f64>) {
    let mut h = Matrix6::zeros();
    let mut g = Vector6::zeros();
    let mut cost = 0.0;
    for i in (0..pb.points3d.len()).filter(|&i| inl[i]) {
        let (Some(l), w) = (pb.points2d[i], pb.weight(i)) else { continue };
        let rp = rm * pb.points3d[i].coords;
        let q = Point3::from(rp + t);
        let r = pb.camera.project_camera(&q) - l;
        let dq = projection_jacobian(pb.camera, &q);
        let mut j = Matrix2x6::zeros();
        j.fixed_view_mut::<2, 3>(0, 0).copy_from(&(dq * -skew(&rp)));
        j.fixed_view_mut::<2, 3>(0, 3).copy_from(&dq);
        h += j.transpose() * j * w;
        g += j.transpose() * r * w;
        cost += w * r.norm_squared();
    }
    (cost, h, g)
}

fn cost_at(pb: &Problem, inl: &[bool], rm: &Matrix3<f64>, t: &nalgebra::Vector3<f64>) -> f64 {
    (0..pb.points3d.len())
        .filter(|&i| inl[i])
        .filter_map(|i| pb.points2d[i].map(|l| (i, l)))
        .map(|(i, l)| {
            let q = Point3::from(rm * pb.points3d[i].coords + t);
            pb.weight(i) * (pb.camera.project_camera(&q) - l).norm_squared()
        })
        .sum()
}

fn levenberg_marquardt(pb: &Problem, inl: &[bool], init: &Pose, opts: &LmOptions) -> Solution {
    let n = pb.points3d.len();
    let mut rm = init.rotation_matrix();
    let mut t = init.translation_mm;
    let (mut cost, mut h, mut g) = linearize(pb, inl, &rm, &t);
    let mut lambda = 1e-3 * (0..6).map(|k| h[(k, k)]).fold(0.0, f64::max).max(1e-12);
    let mut nu = 2.0;
    let mut status = Status::MaxIterations;
    let mut iterations = 0;
    while iterations < opts.max_iterations {
        iterations += 1;
        if g.amax() < opts.gradient_tolerance {
            status = Status::Converged;
            break;
        }
        let mut a = h;
        for k in 0..6 {
            a[(k, k)] += lambda * h[(k, k)].max(1e-9);
        }
        let Some(delta) = a.cholesky().map(|c| c.solve(&-g)) else {
            lambda *= nu;
            nu *= 2.0;
            continue;
        };
        let rm_new = rodrigues(&delta.fixed_rows::<3>(0).into_owned()) * rm;
        let t_new = t + delta.fixed_rows::<3>(3);
        let cost_new = cost_at(pb, inl, &rm_new, &t_new);
        let predicted = -(delta.dot(&g) + 0.5 * delta.dot(&(h * delta)));
        let rho = (cost - cost_new) / predicted.max(1e-300);
        if cost_new < cost && cost_new.is_finite() {
            rm = rm_new;
            t = t_new;
            (cost, h, g) = linearize(pb, inl, &rm, &t);
            lambda *= (1.0f64 / 3.0).max(1.0 - (2.0 * rho - 1.0).powi(3));
            nu = 2.0;
            let scale = t.norm() + 1.0;
            if delta.norm() < opts.step_tolerance * scale {
                status = Status::Converged;
                break;
            }
        } else {
            lambda *= nu;
            nu *= 2.0;
            if lambda > 1e16 {
                // No step decreases the cost: at the optimum to machine precision.
                status = Status::Converged;
                break;
            }
        }
    }
    // Re-orthonormalise (products of rotations drift at 1e-16 per step).
    let pose = Pose::from_matrix(&nalgebra::Rotation3::from_matrix(&rm).into_inner(), t);
    let pose = Pose { rotation: rodrigues_log(&pose.rotation_matrix()), ..pose };
    finish(pb, inl, pose, iterations, status, n)
}

fn finish(pb: &Problem, inl: &[bool], pose: Pose, iterations: usize, status: Status, n: usize) -> Solution {
    let residual_px: Vec<Option<f64>> = (0..n).map(|i| pb.points2d[i].map(|_| reproj_error(pb, &pose, i))).collect();
    if (0..n).any(|i| pb.points2d[i].is_some() && pose.camera_from_world(&pb.points3d[i]).z <= 1e-3) {
        return Solution { pose, residual_px, inliers: inl.to_vec(), iterations, status: Status::BehindSource, ..Solution::failed(n, Status::BehindSource) };
    }
    let used: Vec<usize> = (0..n).filter(|&i| inl[i]).collect();
    let wsum: f64 = used.iter().map(|&i| pb.weight(i)).sum();
    let sse: f64 = used.iter().map(|&i| pb.weight(i) * residual_px[i].unwrap_or(0.0).powi(2)).sum();
    let rmse_px = if wsum > 0.0 { (sse / wsum).sqrt() } else { f64::NAN };
    // Covariance in (r, t) coordinates: σ² (Jᵀ W J)⁻¹, σ² from the residuals (2m - 6 dof).
    let mut jtj = Matrix6::zeros();
    for &i in &used {
        let (_, j) = project_with_jacobian(pb.camera, &pose, &pb.points3d[i]);
        jtj += j.transpose() * j * pb.weight(i);
    }
    let dof = (2 * used.len()).saturating_sub(6).max(1) as f64;
    let sigma2 = (sse / dof).max(1e-24);
    let covariance = jtj.try_inverse().map(|m| m * sigma2).unwrap_or_else(|| Matrix6::from_element(f64::INFINITY));
    let status = if jtj.try_inverse().is_none() { Status::Degenerate } else { status };
    Solution { pose, residual_px, rmse_px, inliers: inl.to_vec(), covariance, iterations, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Camera;
    use nalgebra::{Point2, Vector3};

    fn pelvis() -> Vec<Point3<f64>> {
        crate::volume::phantom::Phantom::new(&crate::volume::phantom::PhantomParams::default()).landmarks.all().unwrap().to_vec()
    }

    #[test]
    fn statuses_for_bad_input() {
        let cam = Camera::paper(512);
        let p3 = pelvis();
        let pose = crate::geometry::sampling::ap_pose(&Point3::origin(), 800.0);
        let mut p2: Vec<Option<Point2<f64>>> = p3.iter().map(|p| Some(cam.project(&pose, p))).collect();
        let o = LmOptions::default();
        let pb = |p2: &[Option<Point2<f64>>]| solve(&Problem { camera: &cam, points3d: &p3, points2d: p2, weights: None }, &o).status;
        assert_eq!(pb(&p2), Status::Converged);
        p2[0] = Some(Point2::new(f64::NAN, 1.0));
        assert_eq!(pb(&p2), Status::InvalidInput);
        for p in p2.iter_mut().take(5) {
            *p = None;
        }
        assert_eq!(pb(&p2), Status::TooFewLandmarks);
        let line: Vec<Point3<f64>> = (0..8).map(|i| Point3::new(i as f64 * 10.0, 0.0, 0.0)).collect();
        let p2l: Vec<_> = line.iter().map(|p| Some(cam.project(&pose, p))).collect();
        let s = solve(&Problem { camera: &cam, points3d: &line, points2d: &p2l, weights: None }, &o).status;
        assert_eq!(s, Status::Degenerate);
        let _ = Vector3::<f64>::zeros();
    }
}
