//! The camera intrinsics and the perspective projection of paper eq. 8.

use super::Pose;
use nalgebra::{Point2, Point3, Vector3};
use serde::{Deserialize, Serialize};

/// The paper's source-to-detector distance (section 3.1), mm.
pub const PAPER_SDD_MM: f64 = 1020.0;
/// The paper's detector size in pixels (768 x 768) ...
pub const PAPER_DETECTOR_PX: u32 = 768;
/// ... rescaled to the U-Net's 512 x 512 input.
pub const PAPER_TRAINING_PX: u32 = 512;

/// Paper eq. 8's `z'` clamp, mm.
const Z_MIN_MM: f64 = 1e-3;

/// A flat-panel C-arm: source-to-detector distance, detector size and pixel spacing, principal
/// point. `K11 = sdd/delx`, `K22 = sdd/dely`, `K13 = cx`, `K23 = cy` in eq. 8.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Camera {
    /// Source-to-detector distance, mm.
    pub sdd_mm: f64,
    /// Detector columns.
    pub width_px: u32,
    /// Detector rows.
    pub height_px: u32,
    /// Pixel spacing along columns (x), mm.
    pub delx_mm: f64,
    /// Pixel spacing along rows (y), mm.
    pub dely_mm: f64,
    /// Principal point, pixels (default: the detector centre, `width/2`).
    pub cx_px: f64,
    /// Principal point, pixels (default: `height/2`).
    pub cy_px: f64,
}

impl Camera {
    /// A camera whose principal point is the detector centre.
    pub fn new(sdd_mm: f64, width_px: u32, height_px: u32, delx_mm: f64, dely_mm: f64) -> Self {
        Self {
            sdd_mm,
            width_px,
            height_px,
            delx_mm,
            dely_mm,
            cx_px: width_px as f64 / 2.0,
            cy_px: height_px as f64 / 2.0,
        }
    }

    /// The paper's C-arm at a given square image size: SDD 1020 mm and a 768-pixel detector
    /// (0.5 mm pixels, a 384 mm panel), rescaled to `size_px`.
    pub fn paper(size_px: u32) -> Self {
        Self::new(PAPER_SDD_MM, PAPER_DETECTOR_PX, PAPER_DETECTOR_PX, 0.5, 0.5)
            .rescaled(size_px as f64 / PAPER_DETECTOR_PX as f64)
    }

    /// Checks that the numbers describe a camera.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !ok(self.sdd_mm) || !ok(self.delx_mm) || !ok(self.dely_mm) {
            return Err(format!("SDD and pixel spacing must be positive: {self:?}"));
        }
        if self.width_px == 0 || self.height_px == 0 {
            return Err("the detector needs at least one pixel".into());
        }
        if !self.cx_px.is_finite() || !self.cy_px.is_finite() {
            return Err("the principal point is not finite".into());
        }
        Ok(())
    }

    /// Focal lengths in pixels, `(K11, K22)`.
    pub fn focal_px(&self) -> (f64, f64) {
        (self.sdd_mm / self.delx_mm, self.sdd_mm / self.dely_mm)
    }

    /// The same physical detector sampled with `scale` times as many pixels per side
    /// (the paper's 768 -> 512 is `scale = 512/768`): the image covers the same field of view.
    pub fn rescaled(&self, scale: f64) -> Self {
        Self {
            sdd_mm: self.sdd_mm,
            width_px: (self.width_px as f64 * scale).round() as u32,
            height_px: (self.height_px as f64 * scale).round() as u32,
            delx_mm: self.delx_mm / scale,
            dely_mm: self.dely_mm / scale,
            cx_px: self.cx_px * scale,
            cy_px: self.cy_px * scale,
        }
    }

    /// Paper eq. 8: a point in camera coordinates to pixels, with `z'` clamped at 1e-3 mm.
    pub fn project_camera(&self, p: &Point3<f64>) -> Point2<f64> {
        let (fx, fy) = self.focal_px();
        let z = p.z.max(Z_MIN_MM);
        Point2::new(fx * p.x / z + self.cx_px, fy * p.y / z + self.cy_px)
    }

    /// Paper eqs. 7-8: a world point seen from `pose`, in pixels.
    pub fn project(&self, pose: &Pose, p: &Point3<f64>) -> Point2<f64> {
        self.project_camera(&pose.camera_from_world(p))
    }

    /// [`Self::project`], or `None` for a point at or behind the source (where eq. 8 has no
    /// image).
    pub fn project_in_front(&self, pose: &Pose, p: &Point3<f64>) -> Option<Point2<f64>> {
        let q = pose.camera_from_world(p);
        (q.z > Z_MIN_MM).then(|| self.project_camera(&q))
    }

    /// The camera-frame direction (not normalised, z = sdd) of the ray through pixel position
    /// `uv`: the point on the detector plane.
    pub fn detector_point(&self, uv: &Point2<f64>) -> Point3<f64> {
        Point3::new(
            (uv.x - self.cx_px) * self.delx_mm,
            (uv.y - self.cy_px) * self.dely_mm,
            self.sdd_mm,
        )
    }

    /// The world point at camera depth `z_mm` that projects to `uv`.
    pub fn backproject(&self, pose: &Pose, uv: &Point2<f64>, z_mm: f64) -> Point3<f64> {
        let d: Vector3<f64> = self.detector_point(uv).coords * (z_mm / self.sdd_mm);
        pose.world_from_camera(&Point3::from(d))
    }
}

/// Paper section 3.1: a point predicted on the 512 x 512 image, in the 768-pixel detector frame
/// centred at the detector centre with y up: `x * 768/512 - 384`, `-(y * 768/512 - 384)`.
pub fn to_paper_centred(uv_512: &Point2<f64>) -> Point2<f64> {
    let s = PAPER_DETECTOR_PX as f64 / PAPER_TRAINING_PX as f64;
    let half = PAPER_DETECTOR_PX as f64 / 2.0;
    Point2::new(uv_512.x * s - half, -(uv_512.y * s - half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projected_then_backprojected_returns() {
        let cam = Camera::new(1020.0, 300, 200, 1.5, 1.2);
        let pose = Pose::new(
            Vector3::new(0.2, -0.4, 0.1),
            Vector3::new(10.0, -20.0, 700.0),
        );
        let p = Point3::new(30.0, -45.0, 12.0);
        let uv = cam.project(&pose, &p);
        let z = pose.camera_from_world(&p).z;
        assert!((cam.backproject(&pose, &uv, z) - p).norm() < 1e-9);
    }

    #[test]
    fn principal_ray_hits_the_principal_point() {
        let cam = Camera::paper(512);
        let uv = cam.project_camera(&Point3::new(0.0, 0.0, 800.0));
        assert_eq!((uv.x, uv.y), (256.0, 256.0));
        // 1 mm at the detector is 1/delx pixels.
        let uv = cam.project_camera(&Point3::new(cam.delx_mm, 0.0, cam.sdd_mm));
        assert!((uv.x - 257.0).abs() < 1e-12);
    }

    #[test]
    fn rescale_keeps_the_field_of_view() {
        let c768 = Camera::paper(768);
        let c512 = Camera::paper(512);
        let p = Point3::new(40.0, -25.0, 750.0);
        let a = c768.project_camera(&p);
        let b = c512.project_camera(&p);
        assert!(
            (a.x * 512.0 / 768.0 - b.x).abs() < 1e-9 && (a.y * 512.0 / 768.0 - b.y).abs() < 1e-9
        );
    }

    #[test]
    fn z_is_clamped_not_divided_by_zero() {
        let cam = Camera::paper(256);
        let uv = cam.project_camera(&Point3::new(1.0, 1.0, 0.0));
        assert!(uv.x.is_finite() && uv.y.is_finite());
    }

    #[test]
    fn paper_centring() {
        let c = to_paper_centred(&Point2::new(256.0, 0.0));
        assert_eq!((c.x, c.y), (0.0, 384.0));
    }
}
