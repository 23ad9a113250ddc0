//! The DICOM series loader's entry point on a folder holding one arbitrary file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join("slice.dcm"), data).is_ok() {
        let _ = fluoropose::volume::read_dicom_series(dir.path(), None);
    }
});
