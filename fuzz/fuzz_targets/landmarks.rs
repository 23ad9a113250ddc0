//! The landmark parsers (Slicer markups JSON, .fcsv, 3D CSV, the 2D annotation CSV).
#![no_main]
use fluoropose::landmarks::{Landmarks2d, Landmarks3d};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Landmarks3d::from_fcsv(text);
    let _ = Landmarks3d::from_csv(text);
    let _ = Landmarks2d::parse_csv(text);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = Landmarks3d::from_markups_json(&v);
    }
});
