//! The paper's eight pelvic landmarks, and 2D/3D landmark sets with their file formats.
//!
//! Order and numbering follow the paper (Fig. 2, after Grupp et al. 2020):
//! 1 L ASIS, 2 L IOF, 3 L MOF, 4 SPS, 5 IPS, 6 R MOF, 7 R IOF, 8 R ASIS.
//! 3D points are patient LPS millimetres (Slicer's RAS files are converted on reading);
//! 2D points are pixels with the origin at the top-left corner of the top-left pixel, x right,
//! y down. A landmark that is absent (not visible, not annotated, NaN in a file) is `None`.
//!
//! Formats: 3D Slicer markups JSON (`.mrk.json`), Slicer `.fcsv` (4.x and 5.x), CSV;
//! 2D: JSON per image and the wide CSV that pelvic annotation tools write
//! (`image_name,image_width,image_height,n_landmarks,landmark_1_x,landmark_1_y,...`).

use nalgebra::{Point2, Point3};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Number of landmarks.
pub const N_LANDMARKS: usize = 8;

/// One row of the landmark table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LandmarkInfo {
    /// 1-based number as in the paper.
    pub number: usize,
    /// Short code (`L-ASIS`).
    pub code: &'static str,
    /// Full anatomical name.
    pub name: &'static str,
    /// Display colour, sRGB.
    pub color: [u8; 3],
}

/// The eight landmarks, in the paper's order (index = number - 1).
pub const LANDMARKS: [LandmarkInfo; N_LANDMARKS] = [
    LandmarkInfo {
        number: 1,
        code: "L-ASIS",
        name: "left anterior superior iliac spine",
        color: [230, 25, 75],
    },
    LandmarkInfo {
        number: 2,
        code: "L-IOF",
        name: "left inferior obturator foramen",
        color: [245, 130, 48],
    },
    LandmarkInfo {
        number: 3,
        code: "L-MOF",
        name: "left medial obturator foramen",
        color: [255, 225, 25],
    },
    LandmarkInfo {
        number: 4,
        code: "SPS",
        name: "superior pubic symphysis",
        color: [60, 180, 75],
    },
    LandmarkInfo {
        number: 5,
        code: "IPS",
        name: "inferior pubic symphysis",
        color: [70, 240, 240],
    },
    LandmarkInfo {
        number: 6,
        code: "R-MOF",
        name: "right medial obturator foramen",
        color: [0, 130, 200],
    },
    LandmarkInfo {
        number: 7,
        code: "R-IOF",
        name: "right inferior obturator foramen",
        color: [145, 30, 180],
    },
    LandmarkInfo {
        number: 8,
        code: "R-ASIS",
        name: "right anterior superior iliac spine",
        color: [240, 50, 230],
    },
];

/// The landmark each one becomes when the image is mirrored left-right (the pelvis is
/// bilaterally symmetric: left and right swap, the symphysis points stay).
pub const MIRROR: [usize; N_LANDMARKS] = [7, 6, 5, 3, 4, 2, 1, 0];

/// Errors of the landmark readers and writers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LandmarkError {
    /// The file system said no.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file's content is not a landmark set this reader understands.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn fmt_err(path: &Path, reason: impl std::fmt::Display) -> LandmarkError {
    LandmarkError::Format {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, LandmarkError> {
    std::fs::read_to_string(path).map_err(|e| LandmarkError::Io {
        path: path.to_owned(),
        source: e,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), LandmarkError> {
    crate::io::atomic_write(path, text.as_bytes()).map_err(|e| LandmarkError::Io {
        path: path.to_owned(),
        source: e,
    })
}

/// Finds the landmark a free-text label names: the code, the number, or common spellings
/// ("L ASIS", "ASIS_L", "left ASIS", "Left inferior obturator foramen", "landmark_3"...).
pub fn landmark_from_label(label: &str) -> Option<usize> {
    let norm: String = label
        .to_ascii_uppercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { ' ' })
        .collect();
    let words: Vec<&str> = norm.split_whitespace().collect();
    if words.is_empty() {
        return None;
    }
    // A bare number or "landmark N"/"L N"/"F-N" style.
    if let Some(n) = words.last().and_then(|w| w.parse::<usize>().ok())
        && words.len() <= 2
        && (1..=N_LANDMARKS).contains(&n)
    {
        return Some(n - 1);
    }
    let has = |w: &str| words.contains(&w);
    let left = has("L") || has("LEFT") || has("LT");
    let right = has("R") || has("RIGHT") || has("RT");
    let joined = words.join("");
    let side = |l: usize, r: usize| match (left, right) {
        (true, false) => Some(l),
        (false, true) => Some(r),
        _ => None,
    };
    if has("ASIS") || joined.contains("ANTERIORSUPERIORILIAC") {
        return side(0, 7);
    }
    if has("IOF") || joined.contains("INFERIOROBTURATOR") {
        return side(1, 6);
    }
    if has("MOF") || joined.contains("MEDIALOBTURATOR") {
        return side(2, 5);
    }
    if has("SPS") || joined.contains("SUPERIORPUBIC") {
        return Some(3);
    }
    if has("IPS") || joined.contains("INFERIORPUBIC") {
        return Some(4);
    }
    None
}

/// The eight landmarks of one CT, in LPS millimetres.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Landmarks3d {
    /// Index = paper number - 1.
    pub points: [Option<Point3<f64>>; N_LANDMARKS],
}

/// The coordinate system a Slicer file states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlicerFrame {
    /// Slicer's own world frame (the default before 4.11).
    Ras,
    /// DICOM's frame (the default from Slicer 4.11 on).
    Lps,
}

fn flip_xy(p: Point3<f64>) -> Point3<f64> {
    Point3::new(-p.x, -p.y, p.z)
}

impl Landmarks3d {
    /// The landmarks that are placed, in order (absent ones skipped).
    pub fn present(&self) -> Vec<Point3<f64>> {
        self.points.iter().flatten().copied().collect()
    }

    /// Where `camera` at `pose` sees each landmark, in pixels; `None` where it is absent or
    /// falls outside the image (`[0, width) x [0, height)`, docs/geometry.md).
    pub fn seen_from(
        &self,
        camera: &crate::geometry::Camera,
        pose: &crate::geometry::Pose,
    ) -> [Option<Point2<f64>>; N_LANDMARKS] {
        let (w, h) = (camera.width_px as f64, camera.height_px as f64);
        std::array::from_fn(|i| {
            let q = camera.project(pose, &self.points[i]?);
            (q.x >= 0.0 && q.y >= 0.0 && q.x < w && q.y < h).then_some(q)
        })
    }

    /// All eight present, in order, or `None`.
    pub fn all(&self) -> Option<[Point3<f64>; N_LANDMARKS]> {
        let mut out = [Point3::origin(); N_LANDMARKS];
        for (o, p) in out.iter_mut().zip(&self.points) {
            *o = (*p)?;
        }
        Some(out)
    }

    /// Reads `.mrk.json`, `.fcsv`, `.csv` or a JSON array `[[x,y,z],...]` by extension.
    pub fn read(path: &Path) -> Result<Self, LandmarkError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        let text = read_text(path)?;
        if name.ends_with(".fcsv") {
            Self::from_fcsv(&text).map_err(|r| fmt_err(path, r))
        } else if name.ends_with(".csv") {
            Self::from_csv(&text).map_err(|r| fmt_err(path, r))
        } else {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| fmt_err(path, format!("invalid JSON: {e}")))?;
            if v.is_array() {
                Self::from_json_array(&v)
            } else {
                Self::from_markups_json(&v)
            }
            .map_err(|r| fmt_err(path, r))
        }
    }

    /// Writes by extension: `.mrk.json` (LPS), `.fcsv` (LPS, Slicer 5 layout) or `.csv`. Atomic.
    pub fn write(&self, path: &Path) -> Result<(), LandmarkError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        let text = if name.ends_with(".fcsv") {
            self.to_fcsv()
        } else if name.ends_with(".csv") {
            self.to_csv()
        } else {
            serde_json::to_string_pretty(&self.to_markups_json(SlicerFrame::Lps))
                .unwrap_or_default()
        };
        write_text(path, &text)
    }

    /// Places points given in file order, or by their labels when every label names a landmark.
    fn assign(entries: Vec<(String, Option<Point3<f64>>)>) -> Result<Self, String> {
        let mut out = Self::default();
        let by_label: Option<Vec<usize>> = entries
            .iter()
            .map(|(l, _)| landmark_from_label(l))
            .collect();
        match by_label {
            Some(idx) => {
                for ((label, p), i) in entries.iter().zip(idx) {
                    if out.points[i].is_some() {
                        return Err(format!(
                            "landmark {} given twice (label \"{label}\")",
                            LANDMARKS[i].code
                        ));
                    }
                    out.points[i] = *p;
                }
            }
            None => {
                if entries.len() != N_LANDMARKS {
                    return Err(format!(
                        "{} points whose labels do not name the 8 landmarks; expected 8 points in the paper's order",
                        entries.len()
                    ));
                }
                for (o, (_, p)) in out.points.iter_mut().zip(entries) {
                    *o = p;
                }
            }
        }
        Ok(out)
    }

    fn from_json_array(v: &Value) -> Result<Self, String> {
        let pts = parse_points::<3>(v)?;
        if pts.len() != N_LANDMARKS {
            return Err(format!(
                "{} points; expected 8 points in the paper's order (null for an absent one)",
                pts.len()
            ));
        }
        Self::assign(
            pts.into_iter()
                .enumerate()
                .map(|(i, p)| ((i + 1).to_string(), p.map(Point3::from)))
                .collect(),
        )
    }

    /// Parses Slicer's markups JSON (schema v1.0.x): the first markup's control points, in its
    /// stated `coordinateSystem` (LPS or RAS). Undefined or NaN positions are absent landmarks.
    pub fn from_markups_json(v: &Value) -> Result<Self, String> {
        let markup = v
            .get("markups")
            .and_then(|m| m.as_array())
            .and_then(|m| m.first())
            .ok_or("no \"markups\" array: not a Slicer markups file")?;
        let frame = match markup
            .get("coordinateSystem")
            .and_then(|c| c.as_str())
            .unwrap_or("LPS")
        {
            "LPS" => SlicerFrame::Lps,
            "RAS" => SlicerFrame::Ras,
            other => return Err(format!("coordinateSystem \"{other}\" is not LPS or RAS")),
        };
        let cps = markup
            .get("controlPoints")
            .and_then(|c| c.as_array())
            .ok_or("the markup has no \"controlPoints\"")?;
        let mut entries = Vec::new();
        for (i, cp) in cps.iter().enumerate() {
            let label = cp
                .get("label")
                .and_then(|l| l.as_str())
                .unwrap_or("")
                .to_string();
            let undefined = cp.get("positionStatus").and_then(|s| s.as_str()) == Some("undefined");
            let p = match cp.get("position") {
                Some(pos) if !undefined => {
                    let a =
                        parse_vec::<3>(pos).map_err(|e| format!("control point {}: {e}", i + 1))?;
                    a.map(|a| {
                        let p = Point3::from(a);
                        if frame == SlicerFrame::Ras {
                            flip_xy(p)
                        } else {
                            p
                        }
                    })
                }
                _ => None,
            };
            entries.push((label, p));
        }
        Self::assign(entries)
    }

    /// Slicer markups JSON as Slicer 5 writes it, in the chosen frame.
    pub fn to_markups_json(&self, frame: SlicerFrame) -> Value {
        let cps: Vec<Value> = LANDMARKS
            .iter()
            .zip(&self.points)
            .map(|(info, p)| {
                let pos = p.map(|p| {
                    if frame == SlicerFrame::Ras {
                        flip_xy(p)
                    } else {
                        p
                    }
                });
                json!({
                    "id": info.number.to_string(),
                    "label": info.code,
                    "description": info.name,
                    "associatedNodeID": "",
                    "position": pos.map(|p| vec![p.x, p.y, p.z]).unwrap_or_default(),
                    "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": if pos.is_some() { "defined" } else { "undefined" }
                })
            })
            .collect();
        json!({
            "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{
                "type": "Fiducial",
                "coordinateSystem": if frame == SlicerFrame::Ras { "RAS" } else { "LPS" },
                "coordinateUnits": "mm",
                "locked": false,
                "fixedNumberOfControlPoints": false,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": N_LANDMARKS,
                "controlPoints": cps,
                "measurements": []
            }]
        })
    }

    /// Parses a Slicer `.fcsv`: `# CoordinateSystem = 0|1|RAS|LPS` (4.x wrote numbers, 5.x names;
    /// absent means RAS as in 4.x) and the `# columns =` line (default
    /// `id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID`).
    pub fn from_fcsv(text: &str) -> Result<Self, String> {
        let mut frame = SlicerFrame::Ras;
        let mut columns: Vec<String> =
            "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
                .split(',')
                .map(String::from)
                .collect();
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim();
                if let Some(cs) = comment.strip_prefix("CoordinateSystem") {
                    let cs = cs.trim_start_matches([' ', '=']).trim();
                    frame = match cs {
                        "0" | "RAS" => SlicerFrame::Ras,
                        "1" | "LPS" => SlicerFrame::Lps,
                        other => {
                            return Err(format!("CoordinateSystem \"{other}\" is not RAS or LPS"));
                        }
                    };
                } else if let Some(cols) = comment.strip_prefix("columns") {
                    columns = cols
                        .trim_start_matches([' ', '='])
                        .split(',')
                        .map(|c| c.trim().to_string())
                        .collect();
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let mut rdr = csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(line.as_bytes());
            let rec = rdr
                .records()
                .next()
                .ok_or("empty record")?
                .map_err(|e| format!("bad CSV record \"{line}\": {e}"))?;
            let col = |name: &str| {
                columns
                    .iter()
                    .position(|c| c == name)
                    .and_then(|i| rec.get(i))
            };
            let num = |name: &str| -> Result<f64, String> {
                col(name)
                    .ok_or(format!("record \"{line}\" has no {name} column"))?
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("record \"{line}\": {name} is not a number"))
            };
            let p = Point3::new(num("x")?, num("y")?, num("z")?);
            let p = p.iter().all(|v| v.is_finite()).then(|| {
                if frame == SlicerFrame::Ras {
                    flip_xy(p)
                } else {
                    p
                }
            });
            entries.push((col("label").unwrap_or("").to_string(), p));
        }
        Self::assign(entries)
    }

    /// `.fcsv` as Slicer 5 writes it (LPS). Absent landmarks are written as NaN.
    pub fn to_fcsv(&self) -> String {
        let mut s = String::from(
            "# Markups fiducial file version = 5.6\n# CoordinateSystem = LPS\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n",
        );
        for (info, p) in LANDMARKS.iter().zip(&self.points) {
            let p = p.unwrap_or(Point3::new(f64::NAN, f64::NAN, f64::NAN));
            s.push_str(&format!(
                "{},{},{},{},0,0,0,1,1,1,0,{},{},\n",
                info.number, p.x, p.y, p.z, info.code, info.name
            ));
        }
        s
    }

    /// CSV with a header `code,x_lps_mm,y_lps_mm,z_lps_mm`; empty fields for absent landmarks.
    pub fn from_csv(text: &str) -> Result<Self, String> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let mut entries = Vec::new();
        for rec in rdr.records() {
            let rec = rec.map_err(|e| format!("bad CSV: {e}"))?;
            if rec.len() < 4 {
                return Err(format!(
                    "row {:?} needs 4 fields: code,x,y,z",
                    rec.iter().collect::<Vec<_>>()
                ));
            }
            let coords: Result<Vec<Option<f64>>, String> =
                (1..4).map(|i| parse_opt_f64(&rec[i])).collect();
            let c = coords?;
            let p = match (c[0], c[1], c[2]) {
                (Some(x), Some(y), Some(z)) => Some(Point3::new(x, y, z)),
                _ => None,
            };
            entries.push((rec[0].to_string(), p));
        }
        Self::assign(entries)
    }

    /// See [`Landmarks3d::from_csv`].
    pub fn to_csv(&self) -> String {
        let mut s = String::from("code,x_lps_mm,y_lps_mm,z_lps_mm\n");
        for (info, p) in LANDMARKS.iter().zip(&self.points) {
            match p {
                Some(p) => s.push_str(&format!("{},{},{},{}\n", info.code, p.x, p.y, p.z)),
                None => s.push_str(&format!("{},,,\n", info.code)),
            }
        }
        s
    }
}

fn parse_opt_f64(s: &str) -> Result<Option<f64>, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("nan") {
        return Ok(None);
    }
    let v: f64 = s.parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    Ok(v.is_finite().then_some(v))
}

/// Parses `[a, b, ...]` of N numbers; null or non-finite entries make the point absent.
fn parse_vec<const N: usize>(v: &Value) -> Result<Option<[f64; N]>, String> {
    let arr = v.as_array().ok_or("a point must be an array of numbers")?;
    if arr.is_empty() {
        return Ok(None);
    }
    if arr.len() != N {
        return Err(format!(
            "a point must have {N} coordinates, found {}",
            arr.len()
        ));
    }
    let mut out = [0.0; N];
    for (o, x) in out.iter_mut().zip(arr) {
        match x.as_f64() {
            Some(f) if f.is_finite() => *o = f,
            _ if x.is_null() || x.as_str().is_some_and(|s| s.eq_ignore_ascii_case("nan")) => {
                return Ok(None);
            }
            _ => return Err(format!("{x} is not a number")),
        }
    }
    Ok(Some(out))
}

/// Parses a JSON array of points `[[..], ...]`; `null` entries are absent points.
pub fn parse_points<const N: usize>(v: &Value) -> Result<Vec<Option<[f64; N]>>, String> {
    v.as_array()
        .ok_or("expected a JSON array of points")?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.is_null() {
                Ok(None)
            } else {
                parse_vec::<N>(p).map_err(|e| format!("point {}: {e}", i + 1))
            }
        })
        .collect()
}

/// The eight landmarks of one image, in pixels (origin at the top-left corner, y down).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Landmarks2d {
    /// The image file name (as the CSV's `image_name`).
    pub image: String,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Index = paper number - 1; `None` = not visible / not annotated.
    #[serde(with = "points2d_serde")]
    pub points: [Option<Point2<f64>>; N_LANDMARKS],
}

mod points2d_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        p: &[Option<Point2<f64>>; N_LANDMARKS],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let v: Vec<Option<[f64; 2]>> = p.iter().map(|p| p.map(|p| [p.x, p.y])).collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[Option<Point2<f64>>; N_LANDMARKS], D::Error> {
        let v = Value::deserialize(d)?;
        let pts = parse_points::<2>(&v).map_err(serde::de::Error::custom)?;
        if pts.len() != N_LANDMARKS {
            return Err(serde::de::Error::custom(format!(
                "expected {N_LANDMARKS} points, found {}",
                pts.len()
            )));
        }
        let mut out = [None; N_LANDMARKS];
        for (o, p) in out.iter_mut().zip(pts) {
            *o = p.map(Point2::from);
        }
        Ok(out)
    }
}

impl Landmarks2d {
    /// Reads one image's landmarks from JSON.
    pub fn read_json(path: &Path) -> Result<Self, LandmarkError> {
        let text = read_text(path)?;
        serde_json::from_str(&text)
            .map_err(|e| fmt_err(path, format!("invalid landmarks JSON: {e}")))
    }

    /// Writes one image's landmarks as JSON, atomically.
    pub fn write_json(&self, path: &Path) -> Result<(), LandmarkError> {
        write_text(
            path,
            &serde_json::to_string_pretty(self).unwrap_or_default(),
        )
    }

    /// Reads the annotation tools' CSV: `image_name,image_width,image_height,n_landmarks,
    /// landmark_1_x,landmark_1_y,...`, one image per row. Empty or NaN coordinates are absent.
    pub fn read_csv(path: &Path) -> Result<Vec<Self>, LandmarkError> {
        let text = read_text(path)?;
        Self::parse_csv(&text).map_err(|r| fmt_err(path, r))
    }

    /// See [`Landmarks2d::read_csv`].
    pub fn parse_csv(text: &str) -> Result<Vec<Self>, String> {
        let mut rdr = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(text.as_bytes());
        let headers = rdr
            .headers()
            .map_err(|e| format!("bad CSV header: {e}"))?
            .clone();
        let col = |name: &str| {
            headers
                .iter()
                .position(|h| h == name)
                .ok_or(format!("the CSV has no \"{name}\" column"))
        };
        let (ci, cw, ch) = (
            col("image_name")?,
            col("image_width")?,
            col("image_height")?,
        );
        let cxy: Vec<(usize, usize)> = (1..=N_LANDMARKS)
            .map(|i| {
                Ok((
                    col(&format!("landmark_{i}_x"))?,
                    col(&format!("landmark_{i}_y"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let mut out = Vec::new();
        for (row, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| format!("row {}: {e}", row + 2))?;
            let get = |c: usize| rec.get(c).unwrap_or("");
            let dim = |c: usize| {
                get(c)
                    .parse::<u32>()
                    .map_err(|_| format!("row {}: \"{}\" is not an image size", row + 2, get(c)))
            };
            let mut lm = Self {
                image: get(ci).to_string(),
                width: dim(cw)?,
                height: dim(ch)?,
                points: [None; N_LANDMARKS],
            };
            for (p, &(cx, cy)) in lm.points.iter_mut().zip(&cxy) {
                let x = parse_opt_f64(get(cx)).map_err(|e| format!("row {}: {e}", row + 2))?;
                let y = parse_opt_f64(get(cy)).map_err(|e| format!("row {}: {e}", row + 2))?;
                *p = x.zip(y).map(|(x, y)| Point2::new(x, y));
            }
            out.push(lm);
        }
        Ok(out)
    }

    /// The wide CSV for many images (see [`Landmarks2d::read_csv`]); absent points are empty.
    pub fn to_csv(sets: &[Self]) -> String {
        let mut s = String::from("image_name,image_width,image_height,n_landmarks");
        for i in 1..=N_LANDMARKS {
            s.push_str(&format!(",landmark_{i}_x,landmark_{i}_y"));
        }
        s.push('\n');
        for lm in sets {
            let name = if lm.image.contains([',', '"']) {
                format!("\"{}\"", lm.image.replace('"', "\"\""))
            } else {
                lm.image.clone()
            };
            s.push_str(&format!("{name},{},{},{N_LANDMARKS}", lm.width, lm.height));
            for p in &lm.points {
                match p {
                    Some(p) => s.push_str(&format!(",{},{}", p.x, p.y)),
                    None => s.push_str(",,"),
                }
            }
            s.push('\n');
        }
        s
    }

    /// Writes [`Landmarks2d::to_csv`] atomically.
    pub fn write_csv(sets: &[Self], path: &Path) -> Result<(), LandmarkError> {
        write_text(path, &Self::to_csv(sets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample3d() -> Landmarks3d {
        let mut l = Landmarks3d::default();
        for (i, p) in l.points.iter_mut().enumerate() {
            *p = Some(Point3::new(
                i as f64 * 10.5 - 40.0,
                -3.25 * i as f64,
                100.0 + i as f64,
            ));
        }
        l.points[4] = None;
        l
    }

    #[test]
    fn labels_name_landmarks() {
        assert_eq!(landmark_from_label("L-ASIS"), Some(0));
        assert_eq!(landmark_from_label("ASIS_R"), Some(7));
        assert_eq!(
            landmark_from_label("Left inferior obturator foramen"),
            Some(1)
        );
        assert_eq!(landmark_from_label("r mof"), Some(5));
        assert_eq!(landmark_from_label("SPS"), Some(3));
        assert_eq!(landmark_from_label("inferior pubic symphysis"), Some(4));
        assert_eq!(landmark_from_label("F-3"), Some(2));
        assert_eq!(landmark_from_label("ASIS"), None);
        assert_eq!(landmark_from_label("F-12"), None);
    }

    #[test]
    fn three_d_round_trips_through_every_format() {
        let l = sample3d();
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.mrk.json", "a.fcsv", "a.csv"] {
            let p = dir.path().join(name);
            l.write(&p).unwrap();
            let r = Landmarks3d::read(&p).unwrap();
            assert_eq!(r, l, "{name}");
        }
        let ras = Landmarks3d::from_markups_json(&l.to_markups_json(SlicerFrame::Ras)).unwrap();
        assert_eq!(ras, l);
    }

    #[test]
    fn fcsv_from_slicer_4_in_ras_with_numeric_frame() {
        let text = "# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n\
            vtkMRMLMarkupsFiducialNode_0,10,20,30,0,0,0,1,1,1,0,R ASIS,,vtkMRMLScalarVolumeNode1\n\
            vtkMRMLMarkupsFiducialNode_1,-10,20,30,0,0,0,1,1,1,0,L ASIS,,vtkMRMLScalarVolumeNode1\n";
        let l = Landmarks3d::from_fcsv(text).unwrap();
        assert_eq!(l.points[7], Some(Point3::new(-10.0, -20.0, 30.0)));
        assert_eq!(l.points[0], Some(Point3::new(10.0, -20.0, 30.0)));
        assert_eq!(l.points[1], None);
    }

    #[test]
    fn two_d_csv_and_json_round_trip_with_missing_points() {
        let mut a = Landmarks2d {
            image: "img, 1.png".into(),
            width: 512,
            height: 512,
            points: [None; 8],
        };
        for (i, p) in a.points.iter_mut().enumerate() {
            *p = Some(Point2::new(10.25 * i as f64, 500.0 - i as f64));
        }
        a.points[2] = None;
        let b = Landmarks2d {
            image: "b.png".into(),
            width: 768,
            height: 600,
            points: [None; 8],
        };
        let back = Landmarks2d::parse_csv(&Landmarks2d::to_csv(&[a.clone(), b.clone()])).unwrap();
        assert_eq!(back, vec![a.clone(), b]);
        let json = serde_json::to_string(&a).unwrap();
        let back: Landmarks2d = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(Landmarks2d::parse_csv("image_name,image_width\nx,1\n").is_err());
        assert!(Landmarks3d::from_fcsv("1,abc,2,3,0,0,0,1,1,1,0,SPS,,\n").is_err());
        assert!(
            Landmarks3d::from_markups_json(
                &json!({"markups": [{"controlPoints": [{"position": [1, 2]}]}]})
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<Landmarks2d>(
                r#"{"image":"a","width":1,"height":1,"points":[[1,2]]}"#
            )
            .is_err()
        );
        // NaN landmarks are absent, not errors.
        let l = Landmarks3d::from_csv("code,x,y,z\nSPS,nan,1,2\nIPS,1,2,3\n").unwrap();
        assert_eq!(l.points[3], None);
        assert_eq!(l.points[4], Some(Point3::new(1.0, 2.0, 3.0)));
    }
}
