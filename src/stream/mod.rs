//! Frame sources: where X-ray frames come from (DICOM files and cines, PNG/TIFF images and
//! folders of them today; the simulated C-arm stream with the app), and the C-arm geometry
//! their headers carry.

mod image_file;
mod xray_dicom;

pub use image_file::{list_frames, read_image_file};
pub use xray_dicom::{CarmHeader, FrameError, XrayFrames, read_xray_dicom};
