//! X-ray and fluoroscopy DICOM: single images (CR/DX/XA/RF) and multi-frame cines, with the
//! C-arm geometry of the header where present.
//!
//! Headerless files (ACR-NEMA style: no preamble, no file meta group) are read as implicit VR
//! little endian, as the standard's predecessor wrote them.

use crate::volume::dicom::floats;
use dicom::dictionary_std::{tags, uids};
use dicom::object::{InMemDicomObject, meta::FileMetaTableBuilder};
use dicom_pixeldata::PixelDecoder;
use std::path::{Path, PathBuf};

/// Why frames could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The file system said no.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a readable X-ray image.
    #[error("{path}: not a usable X-ray image: {reason}")]
    Dicom {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn err(path: &Path, reason: impl std::fmt::Display) -> FrameError {
    FrameError::Dicom {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The C-arm geometry a header states (each field only when present).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CarmHeader {
    /// DistanceSourceToDetector, mm.
    pub sdd_mm: Option<f64>,
    /// DistanceSourceToPatient, mm.
    pub sod_mm: Option<f64>,
    /// ImagerPixelSpacing (at the detector), else PixelSpacing: (between rows, between columns), mm.
    pub pixel_spacing_mm: Option<(f64, f64)>,
    /// PositionerPrimaryAngle (LAO+ / RAO-), degrees.
    pub primary_angle_deg: Option<f64>,
    /// PositionerSecondaryAngle (cranial+ / caudal-), degrees.
    pub secondary_angle_deg: Option<f64>,
}

impl CarmHeader {
    /// The camera of a `width x height` frame: the header's SDD and detector pixel spacing where
    /// present, else the paper's C-arm (SDD 1020 mm, a 384 mm detector spread over the frame).
    pub fn camera(&self, width: u32, height: u32) -> crate::geometry::Camera {
        let sdd = self.sdd_mm.unwrap_or(crate::geometry::PAPER_SDD_MM);
        let (dely, delx) = self
            .pixel_spacing_mm
            .unwrap_or((384.0 / height.max(1) as f64, 384.0 / width.max(1) as f64));
        crate::geometry::Camera::new(sdd, width, height, delx, dely)
    }
}

/// Decoded frames of one file, as f32 after the modality LUT. Where the header says how the
/// values relate to the beam's intensity (Pixel Intensity Relationship, as XA and RF files do),
/// they are mapped to line integrals, larger where more is absorbed, as DRRs are
/// ([`IntensityRelationship`]); otherwise MONOCHROME1 is inverted so that larger is always
/// brighter.
#[derive(Clone, Debug)]
pub struct XrayFrames {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// One `height x width` image per frame, row 0 at the top.
    pub frames: Vec<Vec<f32>>,
    /// FrameTime, ms, for cines.
    pub frame_time_ms: Option<f64>,
    /// Geometry from the header.
    pub geometry: CarmHeader,
    /// Modality (XA, RF, CR, DX, OT...).
    pub modality: String,
    /// How the stored values related to the beam's intensity, when the header said so (the
    /// frames are then line integrals).
    pub intensity: Option<IntensityRelationship>,
}

/// Pixel Intensity Relationship (0028,1040) with its Sign (0028,1041): how an X-ray image's
/// stored values relate to the intensity of the beam that reached the detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntensityRelationship {
    /// `LIN`: proportional to the intensity; `true` when higher values mean less intensity
    /// (sign -1).
    Lin(bool),
    /// `LOG`: proportional to its logarithm; `true` when higher values mean less intensity.
    Log(bool),
}

impl IntensityRelationship {
    /// From the header's two attributes (`DISP` or anything else: `None`).
    pub fn parse(relationship: &str, sign: Option<f64>) -> Option<Self> {
        let less = sign.is_some_and(|s| s < 0.0);
        match relationship.trim() {
            "LIN" => Some(Self::Lin(less)),
            "LOG" => Some(Self::Log(less)),
            _ => None,
        }
    }

    /// A stored value as a line integral up to a gain and an offset (which neither the
    /// network's quantile normalisation nor the refinement's correlations see): Beer-Lambert,
    /// `-ln(I)`. `full` is the largest value the file can store (for `LIN` with sign -1, whose
    /// intensity is `full - v`).
    pub fn line_integral(self, v: f32, full: f32) -> f32 {
        match self {
            // Half a count keeps a dark (fully absorbed) pixel finite.
            Self::Lin(false) => -(v.max(0.0) + 0.5).ln(),
            Self::Lin(true) => -((full - v).max(0.0) + 0.5).ln(),
            Self::Log(false) => -v,
            Self::Log(true) => v,
        }
    }
}

fn float(obj: &InMemDicomObject, tag: dicom::core::Tag) -> Option<f64> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_float64().ok())
        .filter(|v| v.is_finite())
}

/// Reads every frame of an X-ray DICOM file.
pub fn read_xray_dicom(path: &Path) -> Result<XrayFrames, FrameError> {
    std::fs::metadata(path).map_err(|e| FrameError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    crate::io::check_dicom_lengths(path, false).map_err(|e| err(path, e))?;
    let file_obj = match crate::io::catch_panic(|| dicom::object::open_file(path))
        .map_err(|p| err(path, format!("parser crashed: {p}")))?
    {
        Ok(o) => o,
        Err(first) => {
            // No preamble and no meta group: an ACR-NEMA style data set in implicit VR LE.
            let bytes = std::fs::read(path).map_err(|e| FrameError::Io {
                path: path.to_owned(),
                source: e,
            })?;
            let ds = crate::io::catch_panic(|| {
                InMemDicomObject::read_dataset_with_ts(
                    &bytes[..],
                    &dicom::transfer_syntax::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                )
            })
            .map_err(|p| err(path, format!("parser crashed: {p}")))?
            .map_err(|e| err(path, format!("{first}; read without a meta group: {e}")))?;
            if ds.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
                return Err(err(
                    path,
                    format!("{first} (and no pixel data as a headerless data set)"),
                ));
            }
            ds.with_meta(
                FileMetaTableBuilder::new().transfer_syntax(uids::IMPLICIT_VR_LITTLE_ENDIAN),
            )
            .map_err(|e| err(path, e))?
        }
    };
    let decoded = crate::io::catch_panic(|| file_obj.decode_pixel_data())
        .map_err(|p| err(path, format!("pixel decoder crashed: {p}")))?
        .map_err(|e| err(path, format!("pixel data: {e}")))?;
    if decoded.samples_per_pixel() != 1 {
        return Err(err(
            path,
            format!(
                "{} samples per pixel: not a grey-scale X-ray",
                decoded.samples_per_pixel()
            ),
        ));
    }
    let (width, height) = (decoded.columns() as usize, decoded.rows() as usize);
    let obj: &InMemDicomObject = &file_obj;
    let intensity = obj
        .element_opt(tags::PIXEL_INTENSITY_RELATIONSHIP)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .and_then(|r| {
            IntensityRelationship::parse(&r, float(obj, tags::PIXEL_INTENSITY_RELATIONSHIP_SIGN))
        });
    let full = ((1u64 << decoded.bits_stored().clamp(1, 32)) - 1) as f32;
    let invert = decoded.photometric_interpretation().as_str() == "MONOCHROME1";
    let mut frames = Vec::with_capacity(decoded.number_of_frames() as usize);
    for f in 0..decoded.number_of_frames() {
        let mut v: Vec<f32> = crate::io::catch_panic(|| decoded.to_vec_frame::<f32>(f))
            .map_err(|p| err(path, format!("pixel decoder crashed: {p}")))?
            .map_err(|e| err(path, format!("frame {f}: {e}")))?;
        if v.len() != width * height {
            return Err(err(
                path,
                format!("frame {f}: {} pixels for {width}x{height}", v.len()),
            ));
        }
        if let Some(rel) = intensity {
            // The beam's physics, not the display: MONOCHROME1 says only how to show it.
            for x in &mut v {
                *x = rel.line_integral(*x, full);
            }
        } else if invert {
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in &mut v {
                *x = hi - *x;
            }
        }
        frames.push(v);
    }
    let spacing = floats(obj, tags::IMAGER_PIXEL_SPACING)
        .or_else(|| floats(obj, tags::PIXEL_SPACING))
        .filter(|v| v.len() == 2 && v[0] > 0.0 && v[1] > 0.0);
    let geometry = CarmHeader {
        sdd_mm: float(obj, tags::DISTANCE_SOURCE_TO_DETECTOR).filter(|v| *v > 0.0),
        sod_mm: float(obj, tags::DISTANCE_SOURCE_TO_PATIENT).filter(|v| *v > 0.0),
        pixel_spacing_mm: spacing.map(|v| (v[0], v[1])),
        primary_angle_deg: float(obj, tags::POSITIONER_PRIMARY_ANGLE),
        secondary_angle_deg: float(obj, tags::POSITIONER_SECONDARY_ANGLE),
    };
    let modality = obj
        .element_opt(tags::MODALITY)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Ok(XrayFrames {
        width,
        height,
        frames,
        frame_time_ms: float(obj, tags::FRAME_TIME),
        geometry,
        modality,
        intensity,
    })
}
