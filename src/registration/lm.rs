//! The production solver: robust P3P initialisation over landmark triplets, then
//! Levenberg-Marquardt on eq. 4 (weighted) with an analytic Jacobian.

use super::jacobian::{project_with_jacobian, projection_jacobian};
use super::{Problem, Solution, Status};
use crate::geometry::{Pose, rodrigues, rodrigues_log, skew};
use nalgebra::{Matrix2x6, Matrix3, Matrix6, Point3, Vector6};

/// Options of [`solve`].
#[derive(Clone, Copy, Debug, PartialEq)]
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
        Self {
            max_iterations: 100,
            outlier_px: 20.0,
            step_tolerance: 1e-12,
            gradient_tolerance: 1e-10,
        }
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
    let c = act.iter().fold(nalgebra::Vector3::zeros(), |a, &i| {
        a + pb.points3d[i].coords
    }) / act.len() as f64;
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

/// The robust initial hypotheses alone (for benchmarks).
pub fn robust_hypotheses(pb: &Problem, opts: &LmOptions) -> usize {
    precheck(pb)
        .map(|act| hypotheses(pb, &act, opts, 3).len())
        .unwrap_or(0)
}

/// Solves eq. 3-4 from a robust initial pose. See the module docs.
pub fn solve(pb: &Problem, opts: &LmOptions) -> Solution {
    let n = pb.points3d.len();
    let act = match precheck(pb) {
        Ok(a) => a,
        Err(s) => return Solution::failed(n, s),
    };
    // Refine the few best distinct hypotheses briefly; keep the one whose refined pose scores
    // best, then let it converge. (A P3P pose from three noisy landmarks can score worse than a
    // wrong pose before refinement, and better after.) Hypotheses far worse than the best are
    // not worth refining.
    let hyps = hypotheses(pb, &act, opts, 3);
    let floor = hyps.first().map_or(0.0, |h| h.0);
    let brief = LmOptions {
        max_iterations: 15,
        ..*opts
    };
    let mut best: Option<(f64, Solution)> = None;
    for (cost0, init) in hyps {
        if cost0 > 4.0 * floor + act.len() as f64 {
            continue;
        }
        let sol = refine_with_inliers(pb, &act, init, &brief);
        if !sol.status.ok() {
            continue;
        }
        let cost = msac(
            pb,
            &act,
            &sol.pose.rotation_matrix(),
            &sol.pose.translation_mm,
            opts.outlier_px,
            f64::INFINITY,
        );
        if best.as_ref().is_none_or(|b| cost < b.0) {
            best = Some((cost, sol));
        }
    }
    let best = best.map(|(c, sol)| {
        if sol.status == Status::MaxIterations {
            let more = levenberg_marquardt(pb, &sol.inliers, &sol.pose, opts);
            let iterations = sol.iterations + more.iterations;
            (c, Solution { iterations, ..more })
        } else {
            (c, sol)
        }
    });
    best.map_or_else(|| Solution::failed(n, Status::Degenerate), |b| b.1)
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
    reproj_error_rt(pb, &pose.rotation_matrix(), &pose.translation_mm, i)
}

fn reproj_error_rt(pb: &Problem, rm: &Matrix3<f64>, t: &nalgebra::Vector3<f64>, i: usize) -> f64 {
    let Some(l) = pb.points2d[i] else {
        return f64::INFINITY;
    };
    let q = Point3::from(rm * pb.points3d[i].coords + t);
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
    // The slimmest triangles give ill-conditioned P3P poses and add nothing but time. Keeping
    // the widest 24 still leaves, for 8 landmarks with one outlier, at least 24 - C(7,2) = 3
    // outlier-free triplets.
    t.truncate(24.max(act.len()));
    t
}

/// MSAC score of a pose: `Σ w min(e², τ²)` over the active landmarks. Scoring stops as soon
/// as the partial sum reaches `give_up` (the hypothesis cannot be kept anyway).
fn msac(
    pb: &Problem,
    act: &[usize],
    rm: &Matrix3<f64>,
    t: &nalgebra::Vector3<f64>,
    tau: f64,
    give_up: f64,
) -> f64 {
    let tau2 = tau * tau;
    let mut cost = 0.0;
    for &i in act {
        let e = reproj_error_rt(pb, rm, t, i);
        cost += pb.weight(i) * (e * e).min(tau2);
        if cost >= give_up {
            return f64::INFINITY;
        }
    }
    cost
}

/// P3P hypotheses from every landmark triplet, best MSAC score first (at most `keep` of them,
/// all distinct). Every triplet is tried: a hypothesis that fits all landmarks loosely can still
/// be the wrong one (a near-planar pelvis can match one gross outlier with a pose 45° away),
/// so there is no early exit on the inlier count.
fn hypotheses(pb: &Problem, act: &[usize], opts: &LmOptions, keep: usize) -> Vec<(f64, Pose)> {
    let bearings: Vec<Option<nalgebra::Vector3<f64>>> = pb
        .points2d
        .iter()
        .map(|p| p.map(|p| super::p3p::bearing(pb.camera, &p)))
        .collect();
    let mut best: Vec<(f64, Matrix3<f64>, nalgebra::Vector3<f64>)> = Vec::with_capacity(keep + 1);
    for tr in triplets(pb, act) {
        let world = tr.map(|i| pb.points3d[i]);
        let (Some(a), Some(b), Some(c)) = (bearings[tr[0]], bearings[tr[1]], bearings[tr[2]])
        else {
            continue;
        };
        for (rm, t) in super::p3p::p3p_bearings(world, [a, b, c]) {
            let give_up = if best.len() == keep {
                best[keep - 1].0
            } else {
                f64::INFINITY
            };
            let cost = msac(pb, act, &rm, &t, opts.outlier_px, give_up);
            if !cost.is_finite() {
                continue;
            }
            // Near-duplicates of a kept hypothesis (same basin) only replace it when better.
            if let Some(k) = best.iter().position(|(_, r, _)| (r - rm).norm() < 0.05) {
                if cost < best[k].0 {
                    best[k] = (cost, rm, t);
                }
            } else {
                best.push((cost, rm, t));
            }
            best.sort_by(|a, b| a.0.total_cmp(&b.0));
            best.truncate(keep);
        }
    }
    best.into_iter()
        .map(|(c, r, t)| (c, Pose::from_matrix(&r, t)))
        .collect()
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
        let again: Vec<bool> = (0..n)
            .map(|i| act.contains(&i) && reproj_error(pb, &sol.pose, i) < opts.outlier_px)
            .collect();
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
fn linearize(
    pb: &Problem,
    inl: &[bool],
    rm: &Matrix3<f64>,
    t: &nalgebra::Vector3<f64>,
) -> (f64, Matrix6<f64>, Vector6<f64>) {
    let mut h = Matrix6::zeros();
    let mut g = Vector6::zeros();
    let mut cost = 0.0;
    for i in (0..pb.points3d.len()).filter(|&i| inl[i]) {
        let (Some(l), w) = (pb.points2d[i], pb.weight(i)) else {
            continue;
        };
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
    // Starts close to Gauss-Newton: the robust start is already in the right basin.
    let mut lambda = 1e-6;
    let mut nu = 2.0;
    let mut status = Status::MaxIterations;
    let mut iterations = 0;
    while iterations < opts.max_iterations {
        iterations += 1;
        if g.amax() < opts.gradient_tolerance {
            status = Status::Converged;
            break;
        }
        // Marquardt's scaling: damping proportional to the curvature of each parameter.
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
    let pose = Pose {
        rotation: rodrigues_log(&pose.rotation_matrix()),
        ..pose
    };
    finish(pb, inl, pose, iterations, status, n)
}

fn finish(
    pb: &Problem,
    inl: &[bool],
    pose: Pose,
    iterations: usize,
    status: Status,
    n: usize,
) -> Solution {
    let residual_px: Vec<Option<f64>> = (0..n)
        .map(|i| pb.points2d[i].map(|_| reproj_error(pb, &pose, i)))
        .collect();
    if (0..n).any(|i| pb.points2d[i].is_some() && pose.camera_from_world(&pb.points3d[i]).z <= 1e-3)
    {
        return Solution {
            pose,
            residual_px,
            inliers: inl.to_vec(),
            iterations,
            status: Status::BehindSource,
            ..Solution::failed(n, Status::BehindSource)
        };
    }
    let used: Vec<usize> = (0..n).filter(|&i| inl[i]).collect();
    let wsum: f64 = used.iter().map(|&i| pb.weight(i)).sum();
    let sse: f64 = used
        .iter()
        .map(|&i| pb.weight(i) * residual_px[i].unwrap_or(0.0).powi(2))
        .sum();
    let rmse_px = if wsum > 0.0 {
        (sse / wsum).sqrt()
    } else {
        f64::NAN
    };
    // Covariance in (r, t) coordinates: σ² (Jᵀ W J)⁻¹, σ² from the residuals (2m - 6 dof).
    let mut jtj = Matrix6::zeros();
    for &i in &used {
        let (_, j) = project_with_jacobian(pb.camera, &pose, &pb.points3d[i]);
        jtj += j.transpose() * j * pb.weight(i);
    }
    let dof = (2 * used.len()).saturating_sub(6).max(1) as f64;
    let sigma2 = (sse / dof).max(1e-24);
    let covariance = jtj
        .try_inverse()
        .map(|m| m * sigma2)
        .unwrap_or_else(|| Matrix6::from_element(f64::INFINITY));
    let status = if jtj.try_inverse().is_none() {
        Status::Degenerate
    } else {
        status
    };
    Solution {
        pose,
        residual_px,
        rmse_px,
        inliers: inl.to_vec(),
        covariance,
        information: jtj,
        iterations,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Camera;
    use nalgebra::{Point2, Vector3};

    fn pelvis() -> Vec<Point3<f64>> {
        crate::volume::phantom::Phantom::new(&crate::volume::phantom::PhantomParams::default())
            .landmarks
            .all()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn statuses_for_bad_input() {
        let cam = Camera::paper(512);
        let p3 = pelvis();
        let pose = crate::geometry::sampling::ap_pose(&Point3::origin(), 800.0);
        let mut p2: Vec<Option<Point2<f64>>> =
            p3.iter().map(|p| Some(cam.project(&pose, p))).collect();
        let o = LmOptions::default();
        let pb = |p2: &[Option<Point2<f64>>]| {
            solve(
                &Problem {
                    camera: &cam,
                    points3d: &p3,
                    points2d: p2,
                    weights: None,
                },
                &o,
            )
            .status
        };
        assert_eq!(pb(&p2), Status::Converged);
        p2[0] = Some(Point2::new(f64::NAN, 1.0));
        assert_eq!(pb(&p2), Status::InvalidInput);
        for p in p2.iter_mut().take(5) {
            *p = None;
        }
        assert_eq!(pb(&p2), Status::TooFewLandmarks);
        let line: Vec<Point3<f64>> = (0..8)
            .map(|i| Point3::new(i as f64 * 10.0, 0.0, 0.0))
            .collect();
        let p2l: Vec<_> = line.iter().map(|p| Some(cam.project(&pose, p))).collect();
        let s = solve(
            &Problem {
                camera: &cam,
                points3d: &line,
                points2d: &p2l,
                weights: None,
            },
            &o,
        )
        .status;
        assert_eq!(s, Status::Degenerate);
        let _ = Vector3::<f64>::zeros();
    }
}
