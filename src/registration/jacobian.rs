//! Residuals of eq. 4 and their analytic derivatives with respect to θ = (r, t).

use crate::geometry::{Camera, Pose, rodrigues, skew};
use nalgebra::{Matrix2x3, Matrix2x6, Matrix3, Point2, Point3, RealField, Vector3};

/// eq. 8's clamp on z'.
const Z_MIN_MM: f64 = 1e-3;

/// The right Jacobian of SO(3) at `r`: `R(r + δ) ≈ R(r) Exp(J_r(r) δ)`.
/// `J_r = I - (1 - cos θ)/θ² [r]x + (θ - sin θ)/θ³ [r]x²`, with Taylor series near θ = 0.
pub fn right_jacobian<T: RealField + Copy>(r: &Vector3<T>) -> Matrix3<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let t2 = r.norm_squared();
    let (a, b) = if t2 < c(1e-8) {
        (c(0.5) - t2 / c(24.0), c(1.0 / 6.0) - t2 / c(120.0))
    } else {
        let t = t2.sqrt();
        ((T::one() - t.cos()) / t2, (t - t.sin()) / (t2 * t))
    };
    let k = skew(r);
    Matrix3::identity() - k * a + k * k * b
}

/// `∂π/∂q` of eq. 8 at camera point `q` (zero along z where z' is clamped).
pub fn projection_jacobian<T: RealField + Copy>(camera: &Camera, q: &Point3<T>) -> Matrix2x3<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let (fx, fy) = camera.focal_px();
    let (fx, fy, z0) = (c(fx), c(fy), T::zero());
    if q.z <= c(Z_MIN_MM) {
        let iz = c(1.0 / Z_MIN_MM);
        return Matrix2x3::new(fx * iz, z0, z0, z0, fy * iz, z0);
    }
    let iz = T::one() / q.z;
    Matrix2x3::new(
        fx * iz,
        z0,
        -fx * q.x * iz * iz,
        z0,
        fy * iz,
        -fy * q.y * iz * iz,
    )
}

/// Eq. 8 in any float type.
pub fn project_camera_t<T: RealField + Copy>(camera: &Camera, q: &Point3<T>) -> Point2<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let (fx, fy) = camera.focal_px();
    let z = q.z.max(c(Z_MIN_MM));
    Point2::new(
        c(fx) * q.x / z + c(camera.cx_px),
        c(fy) * q.y / z + c(camera.cy_px),
    )
}

/// [`project_with_jacobian`] in any float type, on raw (r, t).
pub fn project_with_jacobian_t<T: RealField + Copy>(
    camera: &Camera,
    r: &Vector3<T>,
    t: &Vector3<T>,
    p: &Point3<T>,
) -> (Point2<T>, Matrix2x6<T>) {
    let rm = rodrigues(r);
    let q = Point3::from(rm * p.coords + t);
    let dq = projection_jacobian(camera, &q);
    // ∂(R(r) p)/∂r = -R [p]x J_r(r)
    let dr = dq * (-rm * skew(&p.coords) * right_jacobian(r));
    let mut j = Matrix2x6::zeros();
    j.fixed_view_mut::<2, 3>(0, 0).copy_from(&dr);
    j.fixed_view_mut::<2, 3>(0, 3).copy_from(&dq);
    (project_camera_t(camera, &q), j)
}

/// The projection of `p` and `∂π/∂(r, t)` (2x6), for the Rodrigues parameters of eqs. 5-7.
pub fn project_with_jacobian(
    camera: &Camera,
    pose: &Pose,
    p: &Point3<f64>,
) -> (Point2<f64>, Matrix2x6<f64>) {
    project_with_jacobian_t(camera, &pose.rotation, &pose.translation_mm, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analytic_jacobian_matches_finite_differences() {
        let cam = Camera::new(1020.0, 512, 400, 0.75, 0.8);
        for (r, p) in [
            (Vector3::new(0.3, -1.2, 0.4), Point3::new(40.0, -20.0, 15.0)),
            (
                Vector3::new(1e-9, 0.0, -1e-9),
                Point3::new(-60.0, 10.0, 5.0),
            ),
            (Vector3::new(2.8, 0.5, 0.1), Point3::new(10.0, 80.0, -35.0)),
        ] {
            let pose = Pose::new(r, Vector3::new(12.0, -7.0, 800.0));
            let (_, j) = project_with_jacobian(&cam, &pose, &p);
            let h = 1e-6;
            for k in 0..6 {
                let mut a = pose.params();
                let mut b = pose.params();
                a[k] += h;
                b[k] -= h;
                let d = (cam.project(&Pose::from_params(&a), &p)
                    - cam.project(&Pose::from_params(&b), &p))
                    / (2.0 * h);
                for row in 0..2 {
                    let scale = j[(row, k)].abs().max(1.0);
                    assert!(
                        (d[row] - j[(row, k)]).abs() < 1e-5 * scale,
                        "k={k} row={row}: {} vs {}",
                        d[row],
                        j[(row, k)]
                    );
                }
            }
        }
    }
}
