//! Writing float images: `.npy` (float32, row 0 at the top, as DiffDRR's `img[0, 0]`),
//! 16-bit PNG or 16-bit TIFF (min-max scaled), by extension; all atomic.

use std::path::Path;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageWriteError {
    /// Width x height does not match the data.
    #[error("{path}: {got} values for a {width}x{height} image")]
    Shape {
        /// The file.
        path: String,
        /// Width.
        width: usize,
        /// Height.
        height: usize,
        /// Values given.
        got: usize,
    },
    /// Unknown extension.
    #[error("{0}: unknown image type (use .npy, .png, .tif or .tiff)")]
    Extension(String),
    /// The file system or the encoder said no.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The `.npy` bytes (format version 1.0, little-endian float32, C order) of an image.
pub fn npy_bytes(data: &[f32], width: usize, height: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({height}, {width}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a 2D float32 (or float64) little-endian `.npy`, returning (data, width, height).
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, usize, usize), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_npy(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// See [`read_npy`].
pub fn parse_npy(bytes: &[u8]) -> Result<(Vec<f32>, usize, usize), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|_| "header is not text")?;
    if header.contains("'fortran_order': True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let descr = if header.contains("'<f4'") {
        4
    } else if header.contains("'<f8'") {
        8
    } else {
        return Err(format!("dtype in {header} is not little-endian float"));
    };
    let shape_txt = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let dims: Vec<usize> = shape_txt
        .trim_start_matches([' ', '('])
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad shape {shape_txt}"))
        })
        .collect::<Result<_, _>>()?;
    let (h, w) = match dims.as_slice() {
        [h, w] => (*h, *w),
        [1, h, w] | [1, 1, h, w] => (*h, *w),
        _ => return Err(format!("shape {dims:?} is not a 2D image")),
    };
    let body = &bytes[start + hlen..];
    let n = h.checked_mul(w).ok_or("shape overflows")?;
    if body.len() < n * descr {
        return Err("truncated data".into());
    }
    let data = if descr == 4 {
        body[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        body[..n * 8]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    };
    Ok((data, w, h))
}

/// Min-max scales to 16 bits (a constant image becomes 0).
pub fn to_u16(data: &[f32]) -> Vec<u16> {
    let (lo, hi) = data
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    data.iter()
        .map(|&v| {
            if v.is_finite() {
                (((v - lo) / span) * 65535.0).round() as u16
            } else {
                0
            }
        })
        .collect()
}

/// Writes an image by extension (`.npy`, `.png`, `.tif`, `.tiff`), atomically.
pub fn write_image(
    path: &Path,
    data: &[f32],
    width: usize,
    height: usize,
) -> Result<(), ImageWriteError> {
    let p = path.display().to_string();
    if data.len() != width * height {
        return Err(ImageWriteError::Shape {
            path: p,
            width,
            height,
            got: data.len(),
        });
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let wr = |e: String| ImageWriteError::Write {
        path: p.clone(),
        reason: e,
    };
    match ext.as_str() {
        "npy" => crate::io::atomic_write(path, &npy_bytes(data, width, height))
            .map_err(|e| wr(e.to_string())),
        "png" | "tif" | "tiff" => {
            let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(
                width as u32,
                height as u32,
                to_u16(data),
            )
            .ok_or_else(|| wr("image buffer size".into()))?;
            let fmt = if ext == "png" {
                image::ImageFormat::Png
            } else {
                image::ImageFormat::Tiff
            };
            crate::io::atomic_write_with(path, |tmp| {
                img.save_with_format(tmp, fmt)
                    .map_err(std::io::Error::other)
            })
            .map_err(|e| wr(e.to_string()))
        }
        _ => Err(ImageWriteError::Extension(p)),
    }
}

/// Display window `(lo, hi)`: the 0.5th and 99.5th percentiles of the finite values.
pub fn percentile_window(data: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_by(f32::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (at(0.005), at(0.995));
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// An 8-bit RGB picture of a DRR (percentile window) with coloured rings at `points`.
pub fn overlay_rgb(
    data: &[f32],
    width: usize,
    height: usize,
    points: &[(nalgebra::Point2<f64>, [u8; 3])],
) -> image::RgbImage {
    let (lo, hi) = percentile_window(data);
    let mut img = image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let v = data[y as usize * width + x as usize];
        let g = (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([g, g, g])
    });
    let r = (width.max(height) as f64 / 90.0).max(3.0);
    for (p, c) in points {
        if !(p.x.is_finite() && p.y.is_finite()) {
            continue;
        }
        let (x0, x1) = (
            (p.x - r - 2.0).floor().max(0.0) as i64,
            (p.x + r + 2.0).ceil() as i64,
        );
        let (y0, y1) = (
            (p.y - r - 2.0).floor().max(0.0) as i64,
            (p.y + r + 2.0).ceil() as i64,
        );
        for y in y0..=y1.min(height as i64 - 1) {
            for x in x0..=x1.min(width as i64 - 1) {
                let d = ((x as f64 + 0.5 - p.x).powi(2) + (y as f64 + 0.5 - p.y).powi(2)).sqrt();
                if (d - r).abs() < 1.0 || d < 1.2 {
                    img.put_pixel(x as u32, y as u32, image::Rgb(*c));
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let data: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 1.0).collect();
        let bytes = npy_bytes(&data, 4, 3);
        assert_eq!(
            (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
            0
        );
        let (back, w, h) = parse_npy(&bytes).unwrap();
        assert_eq!((back, w, h), (data, 4, 3));
        assert!(parse_npy(&bytes[..20]).is_err());
        assert!(parse_npy(b"not numpy").is_err());
    }
}
