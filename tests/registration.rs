//! The production solver over the paper's pose range: exact recovery, the global optimum under
//! noise, robustness to a gross outlier, and the implicit gradient against finite differences.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

use fluoropose::geometry::sampling::PoseRange;
use fluoropose::geometry::{Camera, Pose};
use fluoropose::registration::implicit::{SecondOrder, pose_jacobian_wrt_points};
use fluoropose::registration::metrics::{rotation_error_deg, translation_error_mm};
use fluoropose::registration::{LmOptions, Problem, Status, paper, solve, solve_from};
use fluoropose::volume::phantom::{Phantom, PhantomParams};
use nalgebra::{Point2, Point3};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Landmarks of a few phantom subjects (different sizes and tilts), each with its isocentre.
fn subjects() -> Vec<(Vec<Point3<f64>>, Point3<f64>)> {
    (0..5)
        .map(|id| {
            let lm = Phantom::new(&PhantomParams::subject(id))
                .landmarks
                .all()
                .unwrap()
                .to_vec();
            let c = lm
                .iter()
                .fold(Point3::origin(), |a, p| a + p.coords / lm.len() as f64);
            (lm, c)
        })
        .collect()
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller.
    let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn observe(
    cam: &Camera,
    pose: &Pose,
    pts: &[Point3<f64>],
    noise: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Option<Point2<f64>>> {
    pts.iter()
        .map(|p| {
            Some(cam.project(pose, p) + nalgebra::Vector2::new(gauss(rng), gauss(rng)) * noise)
        })
        .collect()
}

#[test]
fn noise_free_poses_are_recovered_exactly_over_the_paper_range() {
    let cam = Camera::paper(512);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let range = PoseRange::default();
    let (mut worst_deg, mut worst_mm) = (0.0f64, 0.0f64);
    for (pts, iso) in subjects() {
        for _ in 0..60 {
            let truth = range.sample(&mut rng, &iso);
            let l = observe(&cam, &truth, &pts, 0.0, &mut rng);
            let s = solve(
                &Problem {
                    camera: &cam,
                    points3d: &pts,
                    points2d: &l,
                    weights: None,
                },
                &LmOptions::default(),
            );
            assert_eq!(s.status, Status::Converged);
            worst_deg = worst_deg.max(rotation_error_deg(&s.pose, &truth));
            worst_mm = worst_mm.max((s.pose.translation_mm - truth.translation_mm).norm());
        }
    }
    eprintln!(
        "noise-free: worst rotation error {worst_deg:.2e} deg, translation {worst_mm:.2e} mm"
    );
    assert!(
        worst_deg < 1e-3 && worst_mm < 1e-3,
        "{worst_deg} deg, {worst_mm} mm"
    );
}

#[test]
fn with_two_pixel_noise_the_solver_finds_the_global_optimum() {
    let cam = Camera::paper(512);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let range = PoseRange::default();
    for (pts, iso) in subjects() {
        for _ in 0..40 {
            let truth = range.sample(&mut rng, &iso);
            let l = observe(&cam, &truth, &pts, 2.0, &mut rng);
            let pb = Problem {
                camera: &cam,
                points3d: &pts,
                points2d: &l,
                weights: None,
            };
            let s = solve(&pb, &LmOptions::default());
            let reference = solve_from(&pb, &truth, &LmOptions::default());
            assert!(s.status.ok() && reference.status.ok());
            assert!(
                s.inliers.iter().all(|b| *b),
                "a 2 px landmark was taken for an outlier"
            );
            let d = (s.pose.rotation - reference.pose.rotation).norm()
                + (s.pose.translation_mm - reference.pose.translation_mm).norm() * 1e-3;
            assert!(d < 1e-7, "not the global optimum: {d}");
            assert!(s.rmse_px < 4.0);
        }
    }
}

#[test]
fn one_landmark_off_by_100_px_moves_the_pose_no_more_than_noise() {
    let cam = Camera::paper(512);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let range = PoseRange::default();
    let (mut by_noise, mut by_outlier) = (Vec::new(), Vec::new());
    for (pts, iso) in subjects() {
        for k in 0..40 {
            let truth = range.sample(&mut rng, &iso);
            let l = observe(&cam, &truth, &pts, 2.0, &mut rng);
            let clean = solve(
                &Problem {
                    camera: &cam,
                    points3d: &pts,
                    points2d: &l,
                    weights: None,
                },
                &LmOptions::default(),
            );
            let mut bad = l.clone();
            let a = rng.random_range(0.0..std::f64::consts::TAU);
            let i = k % pts.len();
            bad[i] = bad[i].map(|p| p + nalgebra::Vector2::new(a.cos(), a.sin()) * 100.0);
            let s = solve(
                &Problem {
                    camera: &cam,
                    points3d: &pts,
                    points2d: &bad,
                    weights: None,
                },
                &LmOptions::default(),
            );
            assert!(s.status.ok());
            assert!(
                !s.inliers[i],
                "case {k}: the moved landmark was not rejected"
            );
            // Rejected means ignored: the same pose as with that landmark absent.
            let mut without = l.clone();
            without[i] = None;
            let w = solve(
                &Problem {
                    camera: &cam,
                    points3d: &pts,
                    points2d: &without,
                    weights: None,
                },
                &LmOptions::default(),
            );
            // (Same minimum, reached from different starts: equal to LM's precision; distinct
            // minima of this problem lie degrees apart.)
            assert!(
                (s.pose.rotation - w.pose.rotation).norm() < 1e-6
                    && (s.pose.translation_mm - w.pose.translation_mm).norm() < 1e-3
            );
            // How far each moves the pose, in units of the pose's own uncertainty (Mahalanobis
            // distance under the clean solve's covariance).
            let info = clean.covariance.try_inverse().unwrap();
            let d = |a: &Pose, b: &Pose| {
                let v = nalgebra::Vector6::from(a.params()) - nalgebra::Vector6::from(b.params());
                (v.transpose() * info * v)[(0, 0)].sqrt()
            };
            by_noise.push(d(&clean.pose, &truth));
            by_outlier.push(d(&s.pose, &clean.pose));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mn, mo) = (median(&mut by_noise), median(&mut by_outlier));
    eprintln!(
        "median Mahalanobis shift: 2 px noise {mn:.2}, plus a 100 px outlier (rejected) {mo:.2}"
    );
    assert!(
        mo <= mn,
        "the outlier moved the pose more than the noise did"
    );
}

#[test]
fn weights_pull_the_pose_towards_trusted_landmarks() {
    let cam = Camera::paper(512);
    let (pts, iso) = subjects().remove(0);
    let truth = fluoropose::geometry::sampling::ap_pose(&iso, 800.0);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut l = observe(&cam, &truth, &pts, 0.0, &mut rng);
    l[0] = l[0].map(|p| p + nalgebra::Vector2::new(8.0, -6.0)); // off, but not an outlier
    let run = |w: Option<&[f64]>| {
        solve(
            &Problem {
                camera: &cam,
                points3d: &pts,
                points2d: &l,
                weights: w,
            },
            &LmOptions::default(),
        )
    };
    let even = run(None);
    let low = [0.01, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    let trusted = run(Some(&low));
    assert!(
        translation_error_mm(&trusted.pose, &truth)
            < 0.2 * translation_error_mm(&even.pose, &truth)
    );
}

#[test]
fn implicit_gradient_matches_finite_differences_of_the_solve() {
    let cam = Camera::paper(512);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (pts, iso) = subjects().remove(2);
    let tight = LmOptions {
        max_iterations: 200,
        step_tolerance: 1e-15,
        gradient_tolerance: 1e-13,
        ..LmOptions::default()
    };
    for case in 0..4 {
        let truth = PoseRange::default().sample(&mut rng, &iso);
        let l = observe(&cam, &truth, &pts, 2.0, &mut rng);
        let w: Vec<f64> = (0..8).map(|i| 0.5 + 0.1 * i as f64).collect();
        let pb = Problem {
            camera: &cam,
            points3d: &pts,
            points2d: &l,
            weights: Some(&w),
        };
        let s = solve_from(&pb, &truth, &tight);
        let g = pose_jacobian_wrt_points(&pb, &s.inliers, &s.pose, SecondOrder::Full).unwrap();
        let h = 1e-2;
        let mut fd = nalgebra::DMatrix::zeros(6, 16);
        for i in 0..8 {
            for k in 0..2 {
                let shifted = |d: f64| {
                    let mut m = l.clone();
                    m[i] = m[i].map(|p| {
                        if k == 0 {
                            Point2::new(p.x + d, p.y)
                        } else {
                            Point2::new(p.x, p.y + d)
                        }
                    });
                    let pb2 = Problem { points2d: &m, ..pb };
                    solve_from(&pb2, &s.pose, &tight).pose.params()
                };
                let (a, b) = (shifted(h), shifted(-h));
                for r in 0..6 {
                    fd[(r, 2 * i + k)] = (a[r] - b[r]) / (2.0 * h);
                }
            }
        }
        let rel = (&g - &fd).norm() / fd.norm();
        eprintln!("case {case}: |IFT - FD| / |FD| = {rel:.2e}");
        assert!(rel < 1e-4, "{rel}");
        // Gauss-Newton drops the residual curvature: close, but only exact without noise.
        let gn =
            pose_jacobian_wrt_points(&pb, &s.inliers, &s.pose, SecondOrder::GaussNewton).unwrap();
        assert!((&gn - &fd).norm() / fd.norm() < 0.05);
    }
}

#[test]
fn paper_solvers_are_deterministic_in_both_precisions() {
    let cam = Camera::paper(512);
    let (pts, iso) = subjects().remove(0);
    let truth = fluoropose::geometry::sampling::ap_pose(&iso, 800.0);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let l = observe(&cam, &truth, &pts, 0.0, &mut rng);
    let pb = Problem {
        camera: &cam,
        points3d: &pts,
        points2d: &l,
        weights: None,
    };
    let o = paper::PaperOptions::default();
    assert_eq!(
        paper::adam::<f64>(&pb, [0.0; 6], &o),
        paper::adam::<f64>(&pb, [0.0; 6], &o)
    );
    assert_eq!(
        paper::adam::<f32>(&pb, [0.0; 6], &o),
        paper::adam::<f32>(&pb, [0.0; 6], &o)
    );
    assert_eq!(
        paper::lbfgs::<f64>(&pb, [0.0; 6], &o),
        paper::lbfgs::<f64>(&pb, [0.0; 6], &o)
    );
    // Started near the truth, both descend: eq. 4 falls.
    let near = {
        let mut p = truth.params();
        p[0] += 0.02;
        p[5] += 5.0;
        p
    };
    let (l0, _) = paper::loss_and_grad::<f64>(&pb, &nalgebra::Vector6::from(near));
    assert!(paper::adam::<f64>(&pb, near, &o).loss < l0);
    assert!(paper::lbfgs::<f64>(&pb, near, &o).loss < 1e-3 * l0);
    assert!(paper::lbfgs::<f32>(&pb, near, &o).loss < 1e-2 * l0 as f32);
}

#[test]
fn candle_layer_backpropagates_the_implicit_gradient() {
    use candle_core::{DType, Device, Tensor, Var};
    use fluoropose::registration::layer::RegistrationLayer;
    let cam = Camera::paper(512);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let subj = subjects();
    let mut items = Vec::new();
    let mut flat = Vec::new();
    for (pts, iso) in subj.iter().take(3) {
        let truth = PoseRange::default().sample(&mut rng, iso);
        let l = observe(&cam, &truth, pts, 2.0, &mut rng);
        flat.extend(l.iter().flat_map(|p| [p.unwrap().x, p.unwrap().y]));
        items.push(pts.clone());
    }
    let layer = RegistrationLayer::new(cam, items.clone());
    let x = Var::from_tensor(&Tensor::from_vec(flat.clone(), (3, 8, 2), &Device::Cpu).unwrap())
        .unwrap();
    let theta = layer.forward(x.as_tensor()).unwrap();
    assert_eq!(theta.dims(), &[3, 6]);
    // A loss that weights every pose parameter differently.
    let c = Tensor::from_vec(
        (0..18).map(|k| 0.3 + k as f64 * 0.1).collect::<Vec<_>>(),
        (3, 6),
        &Device::Cpu,
    )
    .unwrap();
    let loss = (&theta * &c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Finite differences of the whole layer (each forward solves from scratch).
    let cv: Vec<f64> = c.flatten_all().unwrap().to_vec1().unwrap();
    let f = |v: &[f64]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), (3, 8, 2), &Device::Cpu).unwrap();
        let th: Vec<f64> = layer
            .forward(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        th.iter().zip(&cv).map(|(a, b)| a * b).sum()
    };
    let h = 1e-2;
    let mut num = 0.0;
    let mut den = 0.0;
    for k in 0..flat.len() {
        let (mut a, mut b) = (flat.clone(), flat.clone());
        a[k] += h;
        b[k] -= h;
        let fd = (f(&a) - f(&b)) / (2.0 * h);
        num += (fd - g[k]).powi(2);
        den += fd * fd;
    }
    let rel = (num / den).sqrt();
    eprintln!("candle layer gradient vs finite differences: {rel:.2e}");
    assert!(rel < 1e-4, "{rel}");
    // f32 input works too and gives the same poses to f32 precision.
    let t32 = Tensor::from_vec(flat, (3, 8, 2), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let th32: Vec<f32> = layer
        .forward(&t32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let th64: Vec<f64> = theta.flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in th32.iter().zip(&th64) {
        assert!((*a as f64 - b).abs() < 1e-3 * b.abs().max(1.0));
    }
}

/// The app's and the evaluation's entry point: detections with confidences, 3D landmarks with
/// one absent, a bad previous pose to start from: the true pose comes back anyway.
#[test]
fn solve_detections_recovers_the_pose_from_a_bad_start_and_an_absent_landmark() {
    use fluoropose::registration::solve_detections;
    let cam = Camera::paper(256);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (pts, iso) in subjects().into_iter().take(5) {
        let truth = PoseRange::default().sample(&mut rng, &iso);
        let det: Vec<(Point2<f64>, f64)> =
            pts.iter().map(|p| (cam.project(&truth, p), 0.9)).collect();
        let mut p3: Vec<Option<Point3<f64>>> = pts.iter().map(|p| Some(*p)).collect();
        p3[4] = None;
        let wrong = PoseRange::default().sample(&mut rng, &iso);
        let s = solve_detections(&cam, &p3, &det, Some(&wrong));
        assert!(s.status.ok(), "{:?}", s.status);
        assert!(rotation_error_deg(&s.pose, &truth) < 1e-4);
        assert!(translation_error_mm(&s.pose, &truth) < 1e-3);
        assert!(!s.inliers[4], "an absent 3D landmark takes no part");
    }
}
