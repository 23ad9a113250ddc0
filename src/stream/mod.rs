//! Frame sources: where X-ray frames come from (DICOM files and cines, PNG/TIFF images and
//! folders of them, and the simulated C-arm stream: DRRs along a smooth trajectory with quantum
//! noise), and the C-arm geometry
//! their headers carry.

mod image_file;
pub mod simulated;
mod xray_dicom;

pub use image_file::{frame_files, list_frames, read_image_file};
pub use xray_dicom::{CarmHeader, FrameError, IntensityRelationship, XrayFrames, read_xray_dicom};
