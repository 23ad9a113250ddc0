//! Pose and landmark error measures.

use crate::geometry::Pose;
use nalgebra::{Point2, Point3};

/// Paper eq. 10: `L_pose = sqrt(1/6 Σ_j (θ_j − θ*_j)²)` over (rx, ry, rz, tx, ty, tz) (rad, mm).
pub fn pose_loss(a: &Pose, b: &Pose) -> f64 {
    let (pa, pb) = (a.params(), b.params());
    (pa.iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        / 6.0)
        .sqrt()
}

/// Geodesic angle between the two rotations, degrees.
pub fn rotation_error_deg(a: &Pose, b: &Pose) -> f64 {
    let d = a.rotation_matrix().transpose() * b.rotation_matrix();
    // atan2 of (sin, cos) rather than acos(cos): accurate for tiny angles too.
    let sin = nalgebra::Vector3::new(
        d[(2, 1)] - d[(1, 2)],
        d[(0, 2)] - d[(2, 0)],
        d[(1, 0)] - d[(0, 1)],
    )
    .norm()
        / 2.0;
    sin.atan2((d.trace() - 1.0) / 2.0).to_degrees()
}

/// Distance between the two X-ray source positions, mm (independent of the world origin's
/// place in t, unlike |t_a - t_b|).
pub fn translation_error_mm(a: &Pose, b: &Pose) -> f64 {
    (a.source_world() - b.source_world()).norm()
}

/// Mean target registration error: how far the landmarks land in camera space under `a`
/// instead of `b`, mm.
pub fn mean_tre_mm(a: &Pose, b: &Pose, points: &[Point3<f64>]) -> f64 {
    if points.is_empty() {
        return f64::NAN;
    }
    points
        .iter()
        .map(|p| (a.camera_from_world(p) - b.camera_from_world(p)).norm())
        .sum::<f64>()
        / points.len() as f64
}

/// Root mean square distance between paired 2D points, skipping pairs where either is absent.
pub fn rmse_px(a: &[Option<Point2<f64>>], b: &[Option<Point2<f64>>]) -> f64 {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .filter_map(|(x, y)| Some((x.as_ref()? - y.as_ref()?).norm_squared()))
        .collect();
    if d.is_empty() {
        f64::NAN
    } else {
        (d.iter().sum::<f64>() / d.len() as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Vector3;

    #[test]
    fn errors_vanish_for_equal_poses_and_measure_known_offsets() {
        let a = Pose::new(Vector3::new(0.1, 0.2, 0.3), Vector3::new(1.0, 2.0, 800.0));
        assert_eq!(pose_loss(&a, &a), 0.0);
        let e0 = rotation_error_deg(&a, &a);
        assert!(e0 < 1e-12, "{e0}");
        let mut b = a;
        b.translation_mm.x += 6.0;
        assert!((pose_loss(&a, &b) - 6f64.sqrt()).abs() < 1e-12); // sqrt(6² / 6)
        assert!((translation_error_mm(&a, &b) - 6.0).abs() < 1e-9);
        assert!(
            (mean_tre_mm(&a, &b, &[Point3::origin(), Point3::new(5.0, 5.0, 5.0)]) - 6.0).abs()
                < 1e-9
        );
        let c = Pose::from_matrix(
            &(a.rotation_matrix()
                * nalgebra::Rotation3::from_axis_angle(&Vector3::x_axis(), 0.1).matrix()),
            a.translation_mm,
        );
        assert!((rotation_error_deg(&a, &c) - 0.1f64.to_degrees()).abs() < 1e-9);
    }
}
