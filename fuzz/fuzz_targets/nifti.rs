//! The NIfTI loader's entry point on arbitrary bytes, as `.nii` and as `.nii.gz`: it must return
//! a volume or an error, never panic, hang or exhaust memory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    for name in ["x.nii", "x.nii.gz"] {
        let p = dir.path().join(name);
        if std::fs::write(&p, data).is_ok() {
            let _ = fluoropose::volume::read_nifti(&p);
        }
    }
});
