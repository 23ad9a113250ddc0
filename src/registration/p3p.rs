//! The perspective-three-point problem (Grunert 1841, in the form of Haralick et al. 1994,
//! "Review and analysis of solutions of the three point perspective pose estimation problem"):
//! up to four exact poses from three 2D-3D correspondences, the building block of the robust
//! initialisation. Then the absolute orientation (Kabsch/Horn) of the recovered camera points.

use crate::geometry::{Camera, Pose};
use nalgebra::{Matrix3, Point2, Point3, Vector3};

/// Unit bearing vector of the ray through pixel `uv` (camera frame).
pub fn bearing(camera: &Camera, uv: &Point2<f64>) -> Vector3<f64> {
    let (fx, fy) = camera.focal_px();
    Vector3::new((uv.x - camera.cx_px) / fx, (uv.y - camera.cy_px) / fy, 1.0).normalize()
}

/// Real roots of `a4 v⁴ + a3 v³ + a2 v² + a1 v + a0`, in closed form (Ferrari: the depressed
/// quartic split into two quadratics through a root of its resolvent cubic), Newton-polished.
/// Closed form rather than a companion-matrix eigensolver: this runs for every landmark
/// triplet of every frame.
pub fn quartic_roots(c: [f64; 5]) -> Vec<f64> {
    let [a4, a3, a2, a1, a0] = c;
    let f = |v: f64| (((a4 * v + a3) * v + a2) * v + a1) * v + a0;
    let df = |v: f64| ((4.0 * a4 * v + 3.0 * a3) * v + 2.0 * a2) * v + a1;
    let scale = a4
        .abs()
        .max(a3.abs())
        .max(a2.abs())
        .max(a1.abs())
        .max(a0.abs());
    if scale == 0.0 || a4.abs() < 1e-14 * scale {
        return Vec::new();
    }
    let (b, c2, d, e) = (a3 / a4, a2 / a4, a1 / a4, a0 / a4);
    // v = y - b/4: y⁴ + p y² + q y + r = 0.
    let p = c2 - 3.0 * b * b / 8.0;
    let q = d - b * c2 / 2.0 + b * b * b / 8.0;
    let r = e - b * d / 4.0 + b * b * c2 / 16.0 - 3.0 * b.powi(4) / 256.0;
    let mut ys: Vec<f64> = Vec::with_capacity(4);
    let push_quadratic = |ys: &mut Vec<f64>, bb: f64, cc: f64| {
        // y² + bb y + cc = 0
        let disc = bb * bb - 4.0 * cc;
        if disc >= -1e-12 * (bb * bb + cc.abs()).max(1e-300) {
            let s = disc.max(0.0).sqrt();
            ys.push((-bb + s) / 2.0);
            ys.push((-bb - s) / 2.0);
        }
    };
    if q.abs() < 1e-14 * (p.abs() + r.abs()).max(1e-300) {
        // Biquadratic: z = y², z² + p z + r = 0.
        let mut zs = Vec::new();
        push_quadratic(&mut zs, p, r);
        for z in zs {
            if z >= 0.0 {
                ys.push(z.sqrt());
                ys.push(-z.sqrt());
            }
        }
    } else {
        // Resolvent cubic in m: 8m³ + 8p m² + (2p² − 8r) m − q² = 0; take its largest real root
        // (positive, since the cubic is −q² < 0 at m = 0).
        let (cb, cc, cd) = (p, p * p / 4.0 - r, -q * q / 8.0);
        let m = largest_cubic_root(cb, cc, cd);
        if m <= 0.0 {
            return Vec::new();
        }
        let s = (2.0 * m).sqrt();
        // y² ± s y + (p/2 + m ∓ q/(2s)) = 0
        push_quadratic(&mut ys, s, p / 2.0 + m - q / (2.0 * s));
        push_quadratic(&mut ys, -s, p / 2.0 + m + q / (2.0 * s));
    }
    ys.into_iter()
        .map(|y| {
            let mut v = y - b / 4.0;
            for _ in 0..3 {
                let dv = df(v);
                if dv.abs() < 1e-300 {
                    break;
                }
                v -= f(v) / dv;
            }
            v
        })
        .filter(|v| v.is_finite())
        .collect()
}

/// The largest real root of `m³ + b m² + c m + d` (Cardano / trigonometric form), polished.
fn largest_cubic_root(b: f64, c: f64, d: f64) -> f64 {
    let p = c - b * b / 3.0;
    let q = 2.0 * b * b * b / 27.0 - b * c / 3.0 + d;
    let disc = q * q / 4.0 + p * p * p / 27.0;
    let t = if disc > 0.0 {
        let s = disc.sqrt();
        (-q / 2.0 + s).cbrt() + (-q / 2.0 - s).cbrt()
    } else {
        let r = (-p / 3.0).max(0.0).sqrt();
        let phi = if r > 0.0 {
            (-q / (2.0 * r * r * r)).clamp(-1.0, 1.0).acos()
        } else {
            0.0
        };
        2.0 * r * (phi / 3.0).cos()
    };
    let mut m = t - b / 3.0;
    for _ in 0..2 {
        let fm = ((m + b) * m + c) * m + d;
        let dfm = (3.0 * m + 2.0 * b) * m + c;
        if dfm.abs() > 1e-300 {
            m -= fm / dfm;
        }
    }
    m
}

/// Rotation and translation taking three points onto three others exactly congruent to them
/// (P3P's output): orthonormal frames built on each triangle, `R = F_to F_fromᵀ`.
fn triangle_orientation(
    from: &[Point3<f64>; 3],
    to: &[Point3<f64>; 3],
) -> Option<(Matrix3<f64>, Vector3<f64>)> {
    let frame = |p: &[Point3<f64>; 3]| -> Option<Matrix3<f64>> {
        let e1 = (p[1] - p[0]).try_normalize(1e-12)?;
        let e3 = e1.cross(&(p[2] - p[0])).try_normalize(1e-12)?;
        Some(Matrix3::from_columns(&[e1, e3.cross(&e1), e3]))
    };
    let r = frame(to)? * frame(from)?.transpose();
    let cf = (from[0].coords + from[1].coords + from[2].coords) / 3.0;
    let ct = (to[0].coords + to[1].coords + to[2].coords) / 3.0;
    Some((r, ct - r * cf))
}

/// Rigid transform taking `from` onto `to` in the least-squares sense (Kabsch), as a pose
/// (`to = R from + t`). `None` when the points are degenerate.
pub fn absolute_orientation(from: &[Point3<f64>], to: &[Point3<f64>]) -> Option<Pose> {
    let n = from.len() as f64;
    let cf = from.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / n;
    let ct = to.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / n;
    let h = from.iter().zip(to).fold(Matrix3::zeros(), |a, (p, q)| {
        a + (p.coords - cf) * (q.coords - ct).transpose()
    });
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
    p3p_bearings(world, uv.map(|p| bearing(camera, &p)))
        .into_iter()
        .map(|(r, t)| Pose::from_matrix(&r, t))
        .collect()
}

/// [`p3p`] on unit bearing vectors, returning rotation matrices and translations.
pub fn p3p_bearings(
    world: [Point3<f64>; 3],
    j: [Vector3<f64>; 3],
) -> Vec<(Matrix3<f64>, Vector3<f64>)> {
    let a2 = (world[1] - world[2]).norm_squared();
    let b2 = (world[0] - world[2]).norm_squared();
    let c2 = (world[0] - world[1]).norm_squared();
    if a2 < 1e-12 || b2 < 1e-12 || c2 < 1e-12 {
        return Vec::new();
    }
    let (ca, cb, cg) = (j[1].dot(&j[2]), j[0].dot(&j[2]), j[0].dot(&j[1]));
    let (amc, apc, bmc, bma) = (
        (a2 - c2) / b2,
        (a2 + c2) / b2,
        (b2 - c2) / b2,
        (b2 - a2) / b2,
    );
    let coeffs = [
        (amc - 1.0).powi(2) - 4.0 * c2 / b2 * ca * ca,
        4.0 * (amc * (1.0 - amc) * cb - (1.0 - apc) * ca * cg + 2.0 * c2 / b2 * ca * ca * cb),
        2.0 * (amc * amc - 1.0 + 2.0 * amc * amc * cb * cb + 2.0 * bmc * ca * ca
            - 4.0 * apc * ca * cb * cg
            + 2.0 * bma * cg * cg),
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
        if s1_2.is_nan() || s1_2 <= 0.0 {
            continue;
        }
        let s1 = s1_2.sqrt();
        let cam = [
            Point3::from(j[0] * s1),
            Point3::from(j[1] * (u * s1)),
            Point3::from(j[2] * (v * s1)),
        ];
        if let Some(rt) = triangle_orientation(&world, &cam) {
            out.push(rt);
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
        let world = [
            Point3::new(117.0, -42.0, 62.0),
            Point3::new(0.0, -44.0, -24.0),
            Point3::new(-46.0, -30.0, -66.0),
        ];
        for _ in 0..50 {
            let pose = PoseRange::default().sample(&mut rng, &iso);
            let uv = world.map(|p| cam.project(&pose, &p));
            let sols = p3p(&cam, world, uv);
            assert!(!sols.is_empty());
            let best = sols
                .iter()
                .map(|s| {
                    (s.rotation_matrix() - pose.rotation_matrix()).norm()
                        + (s.translation_mm - pose.translation_mm).norm() * 1e-3
                })
                .fold(f64::INFINITY, f64::min);
            assert!(best < 1e-6, "closest P3P solution is off by {best}");
        }
    }

    #[test]
    fn quartic_roots_of_known_polynomials() {
        // (v-1)(v-2)(v+3)(v-0.5) = v⁴ - 0.5v³ - 7v² + 9.5v - 3
        let mut r = quartic_roots([1.0, -0.5, -7.0, 9.5, -3.0]);
        r.sort_by(f64::total_cmp);
        for (a, b) in r.iter().zip([-3.0, 0.5, 1.0, 2.0]) {
            assert!((a - b).abs() < 1e-10, "{r:?}");
        }
        // v⁴ + 1 has no real root; (v² - 4)(v² + 1) has two.
        assert!(quartic_roots([1.0, 0.0, 0.0, 0.0, 1.0]).is_empty());
        let mut r = quartic_roots([1.0, 0.0, -3.0, 0.0, -4.0]);
        r.sort_by(f64::total_cmp);
        assert!(
            r.len() == 2 && (r[0] + 2.0).abs() < 1e-12 && (r[1] - 2.0).abs() < 1e-12,
            "{r:?}"
        );
    }

    #[test]
    fn kabsch_is_exact_for_rigid_motion() {
        let pose = Pose::new(Vector3::new(0.4, -0.2, 1.1), Vector3::new(3.0, 4.0, 500.0));
        let from = [
            Point3::new(1.0, 2.0, 3.0),
            Point3::new(-4.0, 0.0, 1.0),
            Point3::new(0.0, 5.0, -2.0),
            Point3::new(2.0, -3.0, 0.5),
        ];
        let to = from.map(|p| pose.camera_from_world(&p));
        let got = absolute_orientation(&from, &to).unwrap();
        assert!(
            (got.rotation - pose.rotation).norm() < 1e-12
                && (got.translation_mm - pose.translation_mm).norm() < 1e-9
        );
    }
}
