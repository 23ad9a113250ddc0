//! The perspective-three-point problem (Grunert 1841, in the form of Haralick et al. 1994,
//! "Review and analysis of solutions of the three point perspective pose estimation problem"):
//! up to four exact poses from three 2D-3D correspondences, the building block of the robust
//! initialisation. Then the absolute orientation (Kabsch/Horn) of the recovered camera points.

use crate::geometry::{Camera, Pose};
use nalgebra::{Matrix3, Matrix4, Point2, Point3, Vector3};

/// Unit bearing vector of the ray through pixel `uv` (camera frame).
pub fn bearing(camera: &Camera, uv: &Point2<f64>) -> Vector3<f64> {
    let (fx, fy) = camera.focal_px();
    Vector3::new((uv.x - camera.cx_px) / fx, (uv.y - camera.cy_px) / fy, 1.0).normalize()
}

/// Real roots of `a4 v⁴ + a3 v³ + a2 v² + a1 v + a0` (companion-matrix eigenvalues, then
/// Newton-polished).
fn quartic_roots(c: [f64; 5]) -> Vec<f64> {
    let [a4, a3, a2, a1, a0] = c;
    if a4.abs() < 1e-14 * (a3.abs() + a2.abs() + a1.abs() + a0.abs()).max(1e-300) {
        return Vec::new();
    }
    let m = Matrix4::new(
        -a3 / a4, -a2 / a4, -a1 / a4, -a0 / a4,
        1.0, 0.0, 0.0, 0.0,
        0.0, 1.0, 0.0, 0.0,
        0.0, 0.0, 1.0, 0.0,
    );
    let f = |v: f64| (((a4 * v + a3) * v + a2) * v + a1) * v + a0;
    let df = |v: f64| ((4.0 * a4 * v + 3.0 * a3) * v + 2.0 * a2) * v + a1;
    m.complex_eigenvalues()
        .iter()
        .filter(|z| z.im.abs() < 1e-6 * (1.0 + z.re.abs()))
        .map(|z| {
            let mut v = z.re;
            for _ in 0..4 {
                let d = df(v);
                if d.abs() < 1e-300 {
                    break;
                }
                v -= f(v) / d;
            }
            v
        })
        .filter(|v| v.is_finite())
        .collect()
}

/// Rigid transform taking `from` onto `to` in the least-squares sense (Kabsch), as a pose
/// (`to = R from + t`). `None` when the points are degenerate.
pub fn absolute_orientation(from: &[Point3<f64>], to: &[Point3<f64>]) -> Option<Pose> {
    let n = from.len() as f64;
    let cf = from.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / n;
    let ct = to.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / n;
    let h = from.iter().zip(to).fold(Matrix3::zeros(), |a, (p, q)| a + (p.coords - cf) * (q.coords - ct).transpose());
    let svd = h.svd(true, true);
    let (u, vt) = (svd.u?, svd.v_t?);
    let v = vt.transpose();
    let d = (v * u.transpose()).determinant().signum();
    let r = v * Matrix3::from_diagonal(&Vector3::new(1.0, 1.0, d)) * u.transpose();
    if !r.iter().all(|x| x.is_finite()) {
        return None;
    }
    Some(Pose::from_matrix(&r, ct - r * cf))
}

/// Up to four poses that project `world[i]` exactly onto `uv[i]` (i = 0, 1, 2).
pub fn p3p(camera: &Camera, world: [Point3<f64>; 3], uv: [Point2<f64>; 3]) -> Vec<Pose> {
    let j = uv.map(|p| bearing(camera, &p));
    let a2 = (world[1] - world[2]).norm_squared();
    let b2 = (world[0] - world[2]).norm_squared();
    let c2 = (world[0] - world[1]).norm_squared();
    if a2 < 1e-12 || b2 < 1e-12 || c2 < 1e-12 {
        return Vec::new();
    }
    let (ca, cb, cg) = (j[1].dot(&j[2]), j[0].dot(&j[2]), j[0].dot(&j[1]));
    let (amc, apc, bmc, bma) = ((a2 - c2) / b2, (a2 + c2) / b2, (b2 - c2) / b2, (b2 - a2) / b2);
    let coeffs = [
        (amc - 1.0).powi(2) - 4.0 * c2 / b2 * ca * ca,
        4.0 * (amc * (1.0 - amc) * cb - (1.0 - apc) * ca * cg + 2.0 * c2 / b2 * ca * ca * cb),
        2.0 * (amc * amc - 1.0 + 2.0 * amc * amc * cb * cb + 2.0 * bmc * ca * ca - 4.0 * apc * ca * cb * cg + 2.0 * bma * cg * cg),
        4.0 * (-amc * (1.0 + amc) * cb + 2.0 * a2 / b2 * cg * cg * cb - (1.0 - apc) * ca * cg),
        (1.0 + amc).powi(2) - 4.0 * a2 / b2 * cg * cg,
    ];
    let mut out = Vec::with_capacity(4);
    for v in quartic_roots(coeffs) {
        if v <= 0.0 {
            continue;
        }
        let den = 2.0 * (cg - v * ca);
        if den.abs() < 1e-12 {
            continue;
        }
        let u = ((amc - 1.0) * v * v - 2.0 * amc * cb * v + 1.0 + amc) / den;
        if u <= 0.0 {
            continue;
        }
        let s1_2 = c2 / (1.0 + u * u - 2.0 * u * cg);
        if !(s1_2 > 0.0) {
            continue;
        }
        let s1 = s1_2.sqrt();
        let cam = [Point3::from(j[0] * s1), Point3::from(j[1] * (u * s1)), Point3::from(j[2] * (v * s1))];
        if let Some(pose) = absolute_orientation(&world, &cam) {
            out.push(pose);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::sampling::PoseRange;
    use rand::SeedableRng;

    #[test]
    fn p3p_recovers_the_true_pose_among_its_solutions() {
        let cam = Camera::paper(512);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let iso = Point3::new(0.0, 0.0, 0.0);
        let world = [Point3::new(117.0, -42.0, 62.0), Point3::new(0.0, -44.0, -24.0), Point3::new(-46.0, -30.0, -66.0)];
        for _ in 0..50 {
            let pose = PoseRange::default().sample(&mut rng, &iso);
            let uv = world.map(|p| cam.project(&pose, &p));
            let sols = p3p(&cam, world, uv);
            assert!(!sols.is_empty());
            let best = sols
                .iter()
                .map(|s| (s.rotation_matrix() - pose.rotation_matrix()).norm() + (s.translation_mm - pose.translation_mm).norm() * 1e-3)
                .fold(f64::INFINITY, f64::min);
            assert!(best < 1e-6, "closest P3P solution is off by {best}");
        }
    }

    #[test]
    fn kabsch_is_exact_for_rigid_motion() {
        let pose = Pose::new(Vector3::new(0.4, -0.2, 1.1), Vector3::new(3.0, 4.0, 500.0));
        let from = [Point3::new(1.0, 2.0, 3.0), Point3::new(-4.0, 0.0, 1.0), Point3::new(0.0, 5.0, -2.0), Point3::new(2.0, -3.0, 0.5)];
        let to = from.map(|p| pose.camera_from_world(&p));
        let got = absolute_orientation(&from, &to).unwrap();
        assert!((got.rotation - pose.rotation).norm() < 1e-12 && (got.translation_mm - pose.translation_mm).norm() < 1e-9);
    }
}
