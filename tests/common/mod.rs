//! Helpers shared by the integration tests: where the real data lives, and whether its absence
//! is a failure (CI, `FLUOROPOSE_REQUIRE_DATA=1`) or a skip (a developer's machine).
#![allow(dead_code)]

use std::path::PathBuf;

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require() -> bool {
    std::env::var("FLUOROPOSE_REQUIRE_DATA").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

fn found_or_skip(p: PathBuf, how: &str) -> Option<PathBuf> {
    if p.exists() {
        return Some(p);
    }
    if require() {
        panic!("{} is missing ({how})", p.display());
    }
    eprintln!("SKIP: {} is missing ({how})", p.display());
    None
}

/// A file under `../shared/data` (real CT, X-ray and fluoroscopy files beside the project).
pub fn shared(rel: &str) -> Option<PathBuf> {
    let base = std::env::var("FLUOROPOSE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("../shared/data"));
    found_or_skip(base.join(rel), "the shared data folder beside the project")
}

/// A file fetched from the package registries by `scripts/fetch-data.sh` into `data/registry`.
pub fn registry(rel: &str) -> Option<PathBuf> {
    found_or_skip(
        root().join("data/registry").join(rel),
        "run scripts/fetch-data.sh",
    )
}

/// Normalised cross-correlation of two images.
pub fn ncc(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|v| *v as f64).sum::<f64>() / n;
    let mb = b.iter().map(|v| *v as f64).sum::<f64>() / n;
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (*x as f64 - ma, *y as f64 - mb);
        ab += dx * dy;
        aa += dx * dx;
        bb += dy * dy;
    }
    ab / (aa * bb).sqrt()
}

/// `bytes` of a DICOM file with its pixel data's value length set to `len`, whatever the file
/// holds (a hostile or corrupt length): explicit VR (`OB`/`OW`, 4 length bytes after 2 reserved
/// ones) or implicit (4 length bytes right after the tag).
#[allow(dead_code)] // not every test binary uses every helper
pub fn with_pixel_data_length(bytes: &[u8], len: u32) -> Vec<u8> {
    let at = bytes
        .windows(4)
        .rposition(|w| w == [0xe0, 0x7f, 0x10, 0x00])
        .expect("a pixel data element");
    let mut out = bytes.to_vec();
    let off = if matches!(&bytes[at + 4..at + 6], b"OB" | b"OW") {
        8
    } else {
        4
    };
    out[at + off..at + off + 4].copy_from_slice(&len.to_le_bytes());
    out
}
