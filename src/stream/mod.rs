//! Frame sources: where X-ray frames come from (DICOM files and cines today; the simulated
//! C-arm stream and image folders with the app), and the C-arm geometry their headers carry.

mod xray_dicom;

pub use xray_dicom::{CarmHeader, FrameError, XrayFrames, read_xray_dicom};
