//! DICOM CT series: a folder of single-slice files, in any order, stacked into a [`Volume`].
//!
//! Slices are grouped by SeriesInstanceUID and sorted along the slice normal
//! (`row cosine x column cosine` from ImageOrientationPatient) by the projection of
//! ImagePositionPatient on it. RescaleSlope/Intercept are applied per slice (dicom-pixeldata's
//! modality LUT). Every transfer syntax dicom-rs decodes in pure Rust is accepted (uncompressed,
//! deflate, RLE, JPEG baseline/extended/lossless, JPEG 2000 through `openjp2`).
//!
//! Irregular stacks are detected and corrected, and the correction is reported in
//! [`VolumeMeta::warnings`](super::VolumeMeta):
//! - uneven slice spacing: resampled linearly onto the mean spacing;
//! - gantry tilt (slice positions not along the normal): each slice is shifted in-plane so that the
//!   grid becomes orthogonal, with air (-1000 HU) where no data exists.

use super::{MAX_VOXELS, Volume, VolumeError, VolumeMeta};
use dicom::core::{DataElement, PrimitiveValue, VR};
use dicom::dictionary_std::{tags, uids};
use dicom::object::{
    DefaultDicomObject, InMemDicomObject, OpenFileOptions, meta::FileMetaTableBuilder,
};
use dicom_pixeldata::PixelDecoder;
use nalgebra::{Matrix3, Vector3};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One series found in a folder.
#[derive(Clone, Debug, PartialEq)]
pub struct DicomSeriesInfo {
    /// SeriesInstanceUID.
    pub uid: String,
    /// Modality (CT, MR, ...).
    pub modality: String,
    /// SeriesDescription.
    pub description: String,
    /// The files of this series.
    pub files: Vec<PathBuf>,
}

/// The header fields of one slice that stacking needs.
#[derive(Clone, Debug)]
struct SliceHeader {
    path: PathBuf,
    position: Vector3<f64>,
    row_cos: Vector3<f64>,
    col_cos: Vector3<f64>,
    rows: usize,
    cols: usize,
    /// (row spacing = between rows, column spacing = between columns), mm.
    pixel_spacing: [f64; 2],
}

fn open_header(path: &Path) -> Result<DefaultDicomObject, VolumeError> {
    crate::io::check_dicom_lengths(path, true).map_err(|e| VolumeError::dicom(path, e))?;
    crate::io::catch_panic(|| {
        OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
    })
    .map_err(|p| VolumeError::dicom(path, format!("parser crashed: {p}")))?
    .map_err(|e| VolumeError::dicom(path, e))
}

fn text(obj: &InMemDicomObject, tag: dicom::core::Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().trim_end_matches('\0').to_string())
}

/// A multi-valued numeric attribute, when present and finite.
pub(crate) fn floats(obj: &InMemDicomObject, tag: dicom::core::Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.iter().all(|x| x.is_finite()))
}

fn uint(obj: &InMemDicomObject, tag: dicom::core::Tag) -> Option<usize> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u32>().ok())
        .map(|v| v as usize)
}

/// The SeriesInstanceUID of one file.
pub(crate) fn read_series_uid(path: &Path) -> Result<String, VolumeError> {
    let obj = open_header(path)?;
    text(&obj, tags::SERIES_INSTANCE_UID)
        .ok_or_else(|| VolumeError::dicom(path, "no SeriesInstanceUID"))
}

fn slice_header(path: &Path, obj: &InMemDicomObject) -> Result<SliceHeader, VolumeError> {
    let need = |what: &str| VolumeError::dicom(path, format!("missing or invalid {what}"));
    let ipp = floats(obj, tags::IMAGE_POSITION_PATIENT)
        .filter(|v| v.len() == 3)
        .ok_or_else(|| need("ImagePositionPatient"))?;
    let iop = floats(obj, tags::IMAGE_ORIENTATION_PATIENT)
        .filter(|v| v.len() == 6)
        .ok_or_else(|| need("ImageOrientationPatient"))?;
    let ps = floats(obj, tags::PIXEL_SPACING)
        .filter(|v| v.len() == 2 && v.iter().all(|s| *s > 0.0))
        .ok_or_else(|| need("PixelSpacing"))?;
    let rows = uint(obj, tags::ROWS)
        .filter(|r| *r > 0)
        .ok_or_else(|| need("Rows"))?;
    let cols = uint(obj, tags::COLUMNS)
        .filter(|c| *c > 0)
        .ok_or_else(|| need("Columns"))?;
    let row_cos = Vector3::new(iop[0], iop[1], iop[2]);
    let col_cos = Vector3::new(iop[3], iop[4], iop[5]);
    if (row_cos.norm() - 1.0).abs() > 1e-2
        || (col_cos.norm() - 1.0).abs() > 1e-2
        || row_cos.dot(&col_cos).abs() > 1e-2
    {
        return Err(VolumeError::dicom(
            path,
            format!("ImageOrientationPatient {iop:?} is not two orthonormal vectors"),
        ));
    }
    Ok(SliceHeader {
        path: path.to_owned(),
        position: Vector3::new(ipp[0], ipp[1], ipp[2]),
        row_cos: row_cos.normalize(),
        col_cos: col_cos.normalize(),
        rows,
        cols,
        pixel_spacing: [ps[0], ps[1]],
    })
}

fn list_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), VolumeError> {
    let rd = std::fs::read_dir(dir).map_err(|e| VolumeError::io(dir, e))?;
    for entry in rd.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if depth > 0 {
                list_files(&p, depth - 1, out)?;
            }
        } else if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Lists the DICOM series in a folder (and its subfolders, 4 levels deep). Files that are not
/// DICOM are skipped; a folder with no DICOM file at all is an error naming the first failure.
pub fn scan_dicom_folder(dir: &Path) -> Result<Vec<DicomSeriesInfo>, VolumeError> {
    let mut files = Vec::new();
    list_files(dir, 4, &mut files)?;
    files.sort();
    let mut series: BTreeMap<String, DicomSeriesInfo> = BTreeMap::new();
    let mut first_error = None;
    for f in files {
        match open_header(&f) {
            Ok(obj) => {
                let Some(uid) = text(&obj, tags::SERIES_INSTANCE_UID) else {
                    continue;
                };
                let s = series
                    .entry(uid.clone())
                    .or_insert_with(|| DicomSeriesInfo {
                        uid,
                        modality: text(&obj, tags::MODALITY).unwrap_or_default(),
                        description: text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
                        files: Vec::new(),
                    });
                s.files.push(f);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if series.is_empty() {
        return Err(match first_error {
            Some(e) => {
                VolumeError::dicom(dir, format!("no readable DICOM file; first failure: {e}"))
            }
            None => VolumeError::dicom(dir, "the folder holds no files"),
        });
    }
    Ok(series.into_values().collect())
}

/// Reads one CT series from a folder into a [`Volume`].
///
/// With several series present, `series_uid` picks one; without it the error lists them.
pub fn read_dicom_series(dir: &Path, series_uid: Option<&str>) -> Result<Volume, VolumeError> {
    let all = scan_dicom_folder(dir)?;
    let chosen = match series_uid {
        Some(uid) => {
            all.iter()
                .find(|s| s.uid == uid)
                .ok_or_else(|| VolumeError::SeveralSeries {
                    path: dir.to_owned(),
                    series: describe(&all),
                })?
        }
        None if all.len() == 1 => &all[0],
        None => {
            return Err(VolumeError::SeveralSeries {
                path: dir.to_owned(),
                series: describe(&all),
            });
        }
    };
    stack_series(dir, chosen)
}

/// Stacks the given files as one series (the files of one folder, or a single file).
pub(crate) fn read_dicom_files(
    label: &Path,
    files: &[PathBuf],
    uid: &str,
) -> Result<Volume, VolumeError> {
    let obj = open_header(&files[0])?;
    let info = DicomSeriesInfo {
        uid: uid.to_string(),
        modality: text(&obj, tags::MODALITY).unwrap_or_default(),
        description: text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
        files: files.to_vec(),
    };
    stack_series(label, &info)
}

fn describe(all: &[DicomSeriesInfo]) -> Vec<String> {
    all.iter()
        .map(|s| {
            format!(
                "  {}  {} \"{}\" ({} files)",
                s.uid,
                s.modality,
                s.description,
                s.files.len()
            )
        })
        .collect()
}

fn stack_series(dir: &Path, series: &DicomSeriesInfo) -> Result<Volume, VolumeError> {
    // Headers first (cheap), so geometry problems are found before any pixel is decoded.
    let mut slices = Vec::with_capacity(series.files.len());
    for f in &series.files {
        let obj = open_header(f)?;
        slices.push(slice_header(f, &obj)?);
    }
    let first = slices[0].clone();
    for s in &slices {
        if s.rows != first.rows || s.cols != first.cols {
            return Err(VolumeError::dicom(
                &s.path,
                format!(
                    "{}x{} pixels, but {} has {}x{}",
                    s.cols,
                    s.rows,
                    first.path.display(),
                    first.cols,
                    first.rows
                ),
            ));
        }
        if (s.row_cos - first.row_cos).norm() > 1e-3 || (s.col_cos - first.col_cos).norm() > 1e-3 {
            return Err(VolumeError::dicom(
                &s.path,
                "ImageOrientationPatient differs from the other slices of the series",
            ));
        }
        if (s.pixel_spacing[0] - first.pixel_spacing[0]).abs() > 1e-4
            || (s.pixel_spacing[1] - first.pixel_spacing[1]).abs() > 1e-4
        {
            return Err(VolumeError::dicom(
                &s.path,
                "PixelSpacing differs from the other slices of the series",
            ));
        }
    }
    let normal = first.row_cos.cross(&first.col_cos).normalize();
    slices.sort_by(|a, b| a.position.dot(&normal).total_cmp(&b.position.dot(&normal)));
    let z: Vec<f64> = slices.iter().map(|s| s.position.dot(&normal)).collect();
    for w in z.windows(2) {
        if (w[1] - w[0]).abs() < 1e-4 {
            return Err(VolumeError::dicom(
                dir,
                "two slices share one position (several acquisitions in one series?)",
            ));
        }
    }
    let (rows, cols) = (first.rows, first.cols);
    let n_out_guess = slices.len();
    if rows.saturating_mul(cols).saturating_mul(n_out_guess) > MAX_VOXELS {
        return Err(VolumeError::dicom(
            dir,
            "the series is larger than this reader accepts",
        ));
    }

    // Decode every slice (HU after the modality LUT).
    let mut planes: Vec<Vec<f32>> = Vec::with_capacity(slices.len());
    for s in &slices {
        planes.push(decode_slice(&s.path, rows, cols)?);
    }

    let mut warnings = Vec::new();
    // In-plane offsets of each slice relative to the first (gantry tilt), in pixels.
    let offsets: Vec<(f64, f64)> = slices
        .iter()
        .map(|s| {
            let d =
                s.position - first.position - normal * (s.position - first.position).dot(&normal);
            (
                d.dot(&first.row_cos) / first.pixel_spacing[1],
                d.dot(&first.col_cos) / first.pixel_spacing[0],
            )
        })
        .collect();
    let origin = slices[0].position;
    if slices.len() > 1 {
        let last = slices[slices.len() - 1].position - origin;
        let tilt_deg = last.angle(&normal).to_degrees();
        if tilt_deg > 0.05 {
            warnings.push(format!("gantry tilt of {tilt_deg:.2} degrees: slices shifted in-plane onto an orthogonal grid"));
        }
    }
    let (spacing_k, out_z) = if slices.len() > 1 {
        let gaps: Vec<f64> = z.windows(2).map(|w| w[1] - w[0]).collect();
        let (lo, hi) = gaps
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &g| (a.min(g), b.max(g)));
        let mean = (z[z.len() - 1] - z[0]) / (z.len() - 1) as f64;
        if hi - lo > 0.01 * mean.max(1e-6) {
            warnings.push(format!(
                "uneven slice spacing ({lo:.3}..{hi:.3} mm): resampled linearly to {mean:.3} mm"
            ));
        }
        (
            mean,
            (0..z.len())
                .map(|k| z[0] + k as f64 * mean)
                .collect::<Vec<_>>(),
        )
    } else {
        (1.0, vec![z[0]])
    };
    let needs_shift = offsets
        .iter()
        .any(|(a, b)| a.abs() > 1e-3 || b.abs() > 1e-3);
    let even = warnings.iter().all(|w| !w.starts_with("uneven"));

    let plane = rows * cols;
    let mut hu = vec![-1000.0f32; plane * out_z.len()];
    for (k, zk) in out_z.iter().enumerate() {
        // Bracketing input slices for this output position.
        let (a, t) = if even {
            (k, 0.0)
        } else {
            let idx = z.partition_point(|v| *v <= *zk).clamp(1, z.len() - 1) - 1;
            let t = ((zk - z[idx]) / (z[idx + 1] - z[idx])).clamp(0.0, 1.0);
            (idx, t)
        };
        let b = (a + 1).min(z.len() - 1);
        let out = &mut hu[k * plane..(k + 1) * plane];
        if !needs_shift && t == 0.0 {
            out.copy_from_slice(&planes[a]);
            continue;
        }
        let (oa, ob) = (offsets[a], offsets[b]);
        let off = (oa.0 + (ob.0 - oa.0) * t, oa.1 + (ob.1 - oa.1) * t);
        for j in 0..rows {
            for i in 0..cols {
                let (x, y) = (i as f64 - off.0, j as f64 - off.1);
                let va = bilinear(&planes[a], cols, rows, x, y);
                let vb = if t > 0.0 {
                    bilinear(&planes[b], cols, rows, x, y)
                } else {
                    va
                };
                out[j * cols + i] = (va as f64 * (1.0 - t) + vb as f64 * t) as f32;
            }
        }
    }
    let direction = Matrix3::from_columns(&[first.row_cos, first.col_cos, normal]);
    let spacing = [first.pixel_spacing[1], first.pixel_spacing[0], spacing_k];
    let mut vol = Volume::new([cols, rows, out_z.len()], spacing, origin, direction, hu)
        .map_err(|e| VolumeError::dicom(dir, e))?;
    let obj = open_header(&first.path)?;
    vol.meta = VolumeMeta {
        source: dir.display().to_string(),
        modality: series.modality.clone(),
        series_uid: Some(series.uid.clone()),
        description: text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default(),
        warnings,
    };
    Ok(vol)
}

fn bilinear(img: &[f32], w: usize, h: usize, x: f64, y: f64) -> f32 {
    if x < 0.0 || y < 0.0 || x > (w - 1) as f64 || y > (h - 1) as f64 {
        return -1000.0;
    }
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f64, y - y0 as f64);
    let p = |xx: usize, yy: usize| img[yy * w + xx] as f64;
    let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
    let bot = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
    (top * (1.0 - fy) + bot * fy) as f32
}

fn decode_slice(path: &Path, rows: usize, cols: usize) -> Result<Vec<f32>, VolumeError> {
    crate::io::check_dicom_lengths(path, false).map_err(|e| VolumeError::dicom(path, e))?;
    let obj = crate::io::catch_panic(|| dicom::object::open_file(path))
        .map_err(|p| VolumeError::dicom(path, format!("parser crashed: {p}")))?
        .map_err(|e| VolumeError::dicom(path, e))?;
    let decoded = crate::io::catch_panic(|| {
        obj.decode_pixel_data().and_then(|d| {
            let v = d.to_vec_frame::<f32>(0)?;
            Ok((d.samples_per_pixel(), v))
        })
    })
    .map_err(|p| VolumeError::dicom(path, format!("pixel decoder crashed: {p}")))?
    .map_err(|e| VolumeError::dicom(path, format!("pixel data: {e}")))?;
    let (spp, v) = decoded;
    if spp != 1 {
        return Err(VolumeError::dicom(
            path,
            format!("{spp} samples per pixel; a CT slice has 1"),
        ));
    }
    if v.len() != rows * cols {
        return Err(VolumeError::dicom(
            path,
            format!("{} pixels decoded, expected {rows}x{cols}", v.len()),
        ));
    }
    Ok(v)
}

/// How [`write_dicom_series`] encodes the slices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DicomCompression {
    /// Explicit VR little endian, uncompressed.
    #[default]
    None,
    /// Deflated explicit VR little endian (the whole data set zlib-compressed; lossless).
    Deflate,
}

/// Options of [`write_dicom_series`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DicomWriteOptions {
    /// Transfer syntax.
    pub compression: DicomCompression,
    /// SeriesInstanceUID (a fresh UID when `None`).
    pub series_uid: Option<String>,
    /// SeriesDescription.
    pub description: String,
    /// HU = stored * slope + intercept; stored values are int16.
    pub rescale_slope: f64,
    /// See `rescale_slope`.
    pub rescale_intercept: f64,
}

impl Default for DicomWriteOptions {
    fn default() -> Self {
        Self {
            compression: DicomCompression::None,
            series_uid: None,
            description: "fluoropose".into(),
            rescale_slope: 1.0,
            rescale_intercept: -1024.0,
        }
    }
}

fn fresh_uid() -> String {
    // UUID-derived OID (2.25.<128-bit integer>), as DICOM PS3.5 B.2 allows.
    let n: u128 = rand::random();
    format!("2.25.{n}")
}

/// Writes a volume as a CT series, one file per `k` slice (`slice_0000.dcm`, ...), each written
/// atomically. Returns the files written.
pub fn write_dicom_series(
    vol: &Volume,
    dir: &Path,
    opts: &DicomWriteOptions,
) -> Result<Vec<PathBuf>, VolumeError> {
    std::fs::create_dir_all(dir).map_err(|e| VolumeError::io(dir, e))?;
    let [nx, ny, nz] = vol.dims();
    let d = vol.direction();
    let s = vol.spacing_mm();
    let series_uid = opts.series_uid.clone().unwrap_or_else(fresh_uid);
    let study_uid = fresh_uid();
    let for_uid = fresh_uid();
    let ts = match opts.compression {
        DicomCompression::None => uids::EXPLICIT_VR_LITTLE_ENDIAN,
        DicomCompression::Deflate => uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    };
    let iop: Vec<f64> = vec![
        d[(0, 0)],
        d[(1, 0)],
        d[(2, 0)],
        d[(0, 1)],
        d[(1, 1)],
        d[(2, 1)],
    ];
    let mut written = Vec::with_capacity(nz);
    for k in 0..nz {
        let pos = vol.voxel_to_world(nalgebra::Point3::new(0.0, 0.0, k as f64));
        let stored: Vec<i16> = vol.hu()[k * nx * ny..(k + 1) * nx * ny]
            .iter()
            .map(|&h| {
                ((h as f64 - opts.rescale_intercept) / opts.rescale_slope)
                    .round()
                    .clamp(i16::MIN as f64, i16::MAX as f64) as i16
            })
            .collect();
        let sop_uid = fresh_uid();
        let ds = |v: f64| format!("{v:.6}");
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(uids::CT_IMAGE_STORAGE),
            ),
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(sop_uid.as_str()),
            ),
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(study_uid.as_str()),
            ),
            DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(series_uid.as_str()),
            ),
            DataElement::new(
                tags::FRAME_OF_REFERENCE_UID,
                VR::UI,
                PrimitiveValue::from(for_uid.as_str()),
            ),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
            DataElement::new(
                tags::SERIES_DESCRIPTION,
                VR::LO,
                PrimitiveValue::from(opts.description.as_str()),
            ),
            DataElement::new(
                tags::PATIENT_NAME,
                VR::PN,
                PrimitiveValue::from("FLUOROPOSE^PHANTOM"),
            ),
            DataElement::new(
                tags::INSTANCE_NUMBER,
                VR::IS,
                PrimitiveValue::from((k + 1).to_string()),
            ),
            DataElement::new(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs([ds(pos.x), ds(pos.y), ds(pos.z)].into_iter().collect()),
            ),
            DataElement::new(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                PrimitiveValue::Strs(iop.iter().map(|v| ds(*v)).collect()),
            ),
            DataElement::new(
                tags::PIXEL_SPACING,
                VR::DS,
                PrimitiveValue::Strs([ds(s[1]), ds(s[0])].into_iter().collect()),
            ),
            DataElement::new(
                tags::SLICE_THICKNESS,
                VR::DS,
                PrimitiveValue::from(ds(s[2])),
            ),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("MONOCHROME2"),
            ),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(ny as u16)),
            DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(nx as u16)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16)),
            DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(1u16),
            ),
            DataElement::new(
                tags::RESCALE_INTERCEPT,
                VR::DS,
                PrimitiveValue::from(ds(opts.rescale_intercept)),
            ),
            DataElement::new(
                tags::RESCALE_SLOPE,
                VR::DS,
                PrimitiveValue::from(ds(opts.rescale_slope)),
            ),
            DataElement::new(tags::RESCALE_TYPE, VR::LO, PrimitiveValue::from("HU")),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(stored.iter().map(|v| *v as u16).collect()),
            ),
        ]);
        let file_obj = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(ts))
            .map_err(|e| VolumeError::dicom(dir, e))?;
        let path = dir.join(format!("slice_{k:04}.dcm"));
        crate::io::atomic_write_with(&path, |tmp| {
            file_obj.write_to_file(tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| VolumeError::dicom(&path, format!("writing: {e}")))?;
        written.push(path);
    }
    Ok(written)
}
