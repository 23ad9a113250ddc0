//! Single images from disk as frames: PNG and TIFF (8- or 16-bit grey; colour is converted to
//! luminance), float32 `.npy` (what `fluoropose simulate` and `render` write) and DICOM, and the
//! ordered list of frames in a folder.

use super::{FrameError, XrayFrames, read_xray_dicom};
use std::path::{Path, PathBuf};

fn is_raster(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    matches!(ext.as_str(), "png" | "tif" | "tiff" | "npy")
}

/// Reads one image file: PNG/TIFF/NPY by extension, anything else as DICOM.
pub fn read_image_file(path: &Path) -> Result<XrayFrames, FrameError> {
    if !is_raster(path) {
        return read_xray_dicom(path);
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
    {
        let (data, width, height) =
            crate::drr::image_io::read_npy(path).map_err(|reason| FrameError::Dicom {
                path: path.to_owned(),
                reason,
            })?;
        return Ok(one_frame(width, height, data));
    }
    let img = image::open(path).map_err(|e| match e {
        image::ImageError::IoError(source) => FrameError::Io {
            path: path.to_owned(),
            source,
        },
        other => FrameError::Dicom {
            path: path.to_owned(),
            reason: format!("not a readable image: {other}"),
        },
    })?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    // 16-bit grey keeps its values; everything else becomes 16-bit luminance of its 8-bit
    // values (so that 8-bit inputs keep 0..255).
    let data: Vec<f32> = match img {
        image::DynamicImage::ImageLuma16(b) => b.into_raw().into_iter().map(f32::from).collect(),
        other => other
            .into_luma8()
            .into_raw()
            .into_iter()
            .map(f32::from)
            .collect(),
    };
    Ok(one_frame(width, height, data))
}

/// One frame with no header (image files carry no C-arm geometry).
fn one_frame(width: usize, height: usize, data: Vec<f32>) -> XrayFrames {
    XrayFrames {
        width,
        height,
        frames: vec![data],
        frame_time_ms: None,
        geometry: Default::default(),
        modality: String::new(),
        intensity: None,
    }
}

/// Splits a name into text and number runs so that "frame_2" sorts before "frame_10".
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for c in name.chars() {
        match (c.to_digit(10), num) {
            (Some(d), Some(n)) => num = Some(n.saturating_mul(10).saturating_add(d as u64)),
            (Some(d), None) => num = Some(d as u64),
            (None, Some(n)) => {
                out.push((std::mem::take(&mut text), n));
                num = None;
                text.push(c);
            }
            (None, None) => text.push(c),
        }
    }
    out.push((text, num.unwrap_or(0)));
    out
}

/// What a frames argument names: a folder's frame files ([`list_frames`]), or the one file.
pub fn frame_files(path: &Path) -> Result<Vec<PathBuf>, FrameError> {
    if path.is_dir() {
        list_frames(path)
    } else {
        Ok(vec![path.to_owned()])
    }
}

/// The frame files of a folder (not recursive, hidden files and non-images skipped: PNG, TIFF,
/// NPY, `.dcm` and extension-less files, which is how DICOM often comes), in natural name order.
pub fn list_frames(dir: &Path) -> Result<Vec<PathBuf>, FrameError> {
    let rd = std::fs::read_dir(dir).map_err(|e| FrameError::Io {
        path: dir.to_owned(),
        source: e,
    })?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| {
            let ext = p
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            is_raster(p) || matches!(ext.as_deref(), None | Some("dcm") | Some("dicom"))
        })
        .collect();
    files.sort_by_key(|p| {
        natural_key(
            &p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )
    });
    if files.is_empty() {
        return Err(FrameError::Dicom {
            path: dir.to_owned(),
            reason: "no image files (PNG, TIFF, NPY, DICOM) in the folder".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_frames_as_simulate_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = (5, 3);
        for k in 0..3 {
            let px: Vec<f32> = (0..w * h).map(|i| (i * 10 + k) as f32 * 0.5).collect();
            std::fs::write(
                dir.path().join(format!("frame_{k:04}.npy")),
                crate::drr::image_io::npy_bytes(&px, w, h),
            )
            .unwrap();
        }
        // Not a frame: the recording's geometry.
        std::fs::write(dir.path().join("camera.json"), "{}").unwrap();
        let files = list_frames(dir.path()).unwrap();
        assert_eq!(files.len(), 3);
        let x = read_image_file(&files[2]).unwrap();
        assert_eq!((x.width, x.height, x.frames.len()), (w, h, 1));
        assert_eq!(x.frames[0][7], (7 * 10 + 2) as f32 * 0.5);
        // A truncated array is an error that names the file, not a panic.
        let bad = dir.path().join("bad.npy");
        std::fs::write(
            &bad,
            &crate::drr::image_io::npy_bytes(&[1.0; 15], w, h)[..100],
        )
        .unwrap();
        let e = read_image_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.npy"), "{e}");
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["f10.png", "f2.png", "f1.png", "a.png", "f2b.png"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, vec!["a.png", "f1.png", "f2.png", "f2b.png", "f10.png"]);
    }
}
