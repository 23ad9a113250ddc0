//! NIfTI-1 (`.nii`, `.nii.gz`) reading and writing through the `nifti` crate.
//!
//! NIfTI's world frame is RAS (+x right, +y anterior, +z superior); this project's is LPS, so the
//! affine is multiplied by `diag(-1, -1, 1)` on the way in and again on the way out.
//! The affine is chosen as NIfTI readers do: sform when `sform_code > 0`, else qform when
//! `qform_code > 0`, else the shape/zoom fallback. `scl_slope`/`scl_inter` are applied
//! (slope 0 means "no scaling", as the standard says).

use super::{MAX_VOXELS, Volume, VolumeError, VolumeMeta};
use crate::io::atomic_write_with;
use nalgebra::{Matrix3, Matrix4, Vector3};
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiType, ReaderOptions};
use std::path::Path;

/// `diag(-1, -1, 1, 1)`: RAS <-> LPS (its own inverse).
fn ras_lps() -> Matrix4<f64> {
    Matrix4::from_diagonal(&nalgebra::Vector4::new(-1.0, -1.0, 1.0, 1.0))
}

/// Reads a NIfTI-1 CT volume (HU after scl_slope/scl_inter) into LPS space.
pub fn read_nifti(path: &Path) -> Result<Volume, VolumeError> {
    let meta = std::fs::metadata(path).map_err(|e| VolumeError::io(path, e))?;
    if meta.is_dir() {
        return Err(VolumeError::nifti(path, "is a folder"));
    }
    let header = crate::io::catch_panic(|| NiftiHeader::from_file(path))
        .map_err(|p| VolumeError::nifti(path, format!("header decoder crashed: {p}")))?
        .map_err(|e| VolumeError::nifti(path, format!("header: {e}")))?;
    let dims = check_header(path, &header, meta.len())?;
    let world_from_voxel_ras = affine(path, &header)?;
    let (spacing, direction, origin) = decompose(path, &(ras_lps() * world_from_voxel_ras))?;

    let obj = crate::io::catch_panic(|| ReaderOptions::new().read_file(path))
        .map_err(|p| VolumeError::nifti(path, format!("decoder crashed: {p}")))?
        .map_err(|e| VolumeError::nifti(path, format!("voxel data: {e}")))?;
    let array = crate::io::catch_panic(|| obj.into_volume().into_ndarray::<f32>())
        .map_err(|p| VolumeError::nifti(path, format!("decoder crashed: {p}")))?
        .map_err(|e| VolumeError::nifti(path, format!("voxel data: {e}")))?;
    if array.len() < dims.iter().product::<usize>() {
        return Err(VolumeError::nifti(
            path,
            "fewer voxels than the header declares",
        ));
    }
    // The array is indexed [i, j, k, (t...)]; reversing the axes and iterating in logical order
    // yields i fastest, k slowest, which is our layout. Only the first 3D volume is kept.
    let array = array.reversed_axes();
    let n = dims.iter().product::<usize>();
    let hu: Vec<f32> = array.iter().take(n).copied().collect();
    let mut vol = Volume::new(dims, spacing, origin, direction, hu)
        .map_err(|e| VolumeError::nifti(path, e))?;
    let descrip = String::from_utf8_lossy(&header.descrip)
        .trim_end_matches('\0')
        .trim()
        .to_string();
    vol.meta = VolumeMeta {
        source: path.display().to_string(),
        modality: "CT".into(),
        series_uid: None,
        description: descrip,
        warnings: Vec::new(),
    };
    if header.dim[0] > 3 && header.dim[4] > 1 {
        vol.meta.warnings.push(format!(
            "{} volumes in the file; the first one is used",
            header.dim[4]
        ));
    }
    Ok(vol)
}

/// Validates the header before the decoder allocates anything; returns the 3D dimensions.
fn check_header(path: &Path, h: &NiftiHeader, file_len: u64) -> Result<[usize; 3], VolumeError> {
    let rank = h.dim[0] as usize;
    if !(3..=7).contains(&rank) {
        return Err(VolumeError::nifti(
            path,
            format!("dim[0] = {} but a CT volume needs 3 dimensions", h.dim[0]),
        ));
    }
    let dims = [h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize];
    if dims.contains(&0) {
        return Err(VolumeError::nifti(
            path,
            format!("a dimension is zero: {dims:?}"),
        ));
    }
    let all: usize = h.dim[1..=rank]
        .iter()
        .map(|&d| d.max(1) as usize)
        .try_fold(1usize, |a, d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    if all > MAX_VOXELS {
        return Err(VolumeError::nifti(
            path,
            format!("declares {all} voxels, more than the {MAX_VOXELS} this reader accepts"),
        ));
    }
    let ty = h
        .data_type()
        .map_err(|e| VolumeError::nifti(path, format!("datatype {}: {e}", h.datatype)))?;
    let bytes = match ty {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32 => 4,
        NiftiType::Int64 | NiftiType::Uint64 | NiftiType::Float64 => 8,
        other => {
            return Err(VolumeError::nifti(
                path,
                format!("voxel type {other:?} is not a scalar CT type"),
            ));
        }
    };
    if h.bitpix as usize != bytes * 8 {
        return Err(VolumeError::nifti(
            path,
            format!("bitpix {} disagrees with datatype {ty:?}", h.bitpix),
        ));
    }
    if !h.vox_offset.is_finite() || h.vox_offset < 0.0 {
        return Err(VolumeError::nifti(
            path,
            format!("vox_offset {} is invalid", h.vox_offset),
        ));
    }
    if !h.scl_slope.is_finite() || !h.scl_inter.is_finite() {
        return Err(VolumeError::nifti(
            path,
            "scl_slope/scl_inter is not finite",
        ));
    }
    let gz = path.to_string_lossy().to_ascii_lowercase().ends_with(".gz");
    let needed = h.vox_offset as u64 + (all as u64) * bytes as u64;
    if !gz && file_len < needed {
        return Err(VolumeError::nifti(
            path,
            format!("truncated: {file_len} bytes but the header needs {needed}"),
        ));
    }
    Ok(dims)
}

/// The voxel -> RAS affine, chosen as the NIfTI standard says.
fn affine(path: &Path, h: &NiftiHeader) -> Result<Matrix4<f64>, VolumeError> {
    let m = if h.sform_code > 0 {
        h.sform_affine::<f64>()
    } else {
        // The crate's qform and fallback paths panic on negative pixdim or a qfac other than
        // +-1; check first. qfac 0 is read as 1, as nibabel and the standard's reference code do.
        if h.pixdim[1..4].iter().any(|p| !p.is_finite() || *p <= 0.0) {
            return Err(VolumeError::nifti(
                path,
                format!("pixdim {:?} must be positive", &h.pixdim[1..4]),
            ));
        }
        let mut fixed = h.clone();
        if fixed.pixdim[0] != -1.0 {
            fixed.pixdim[0] = 1.0;
        }
        for q in [fixed.quatern_b, fixed.quatern_c, fixed.quatern_d] {
            if !q.is_finite() {
                return Err(VolumeError::nifti(path, "qform quaternion is not finite"));
            }
        }
        crate::io::catch_panic(|| fixed.affine::<f64>())
            .map_err(|p| VolumeError::nifti(path, format!("qform: {p}")))?
    };
    if !m.iter().all(|v| v.is_finite()) {
        return Err(VolumeError::nifti(path, "the affine is not finite"));
    }
    Ok(m)
}

/// Spacing, orthonormal direction cosines and origin of a voxel grid.
type Placement = ([f64; 3], Matrix3<f64>, Vector3<f64>);

/// Splits an affine into spacing, orthonormal direction cosines and origin.
fn decompose(path: &Path, m: &Matrix4<f64>) -> Result<Placement, VolumeError> {
    let lin: Matrix3<f64> = m.fixed_view::<3, 3>(0, 0).into_owned();
    let spacing = [0, 1, 2].map(|c| lin.column(c).norm());
    if spacing.iter().any(|s| *s < 1e-9 || !s.is_finite()) {
        return Err(VolumeError::nifti(path, format!("degenerate affine: {m}")));
    }
    let mut dir = lin;
    for (c, s) in spacing.iter().enumerate() {
        let col = dir.column(c) / *s;
        dir.set_column(c, &col);
    }
    let gram = dir.transpose() * dir;
    if (gram - Matrix3::identity()).abs().max() > 1e-3 {
        return Err(VolumeError::nifti(
            path,
            "the affine is sheared (its axes are not perpendicular); resample the volume first",
        ));
    }
    Ok((spacing, dir, m.fixed_view::<3, 1>(0, 3).into_owned()))
}

/// Writes a volume as NIfTI-1 (`.nii` or `.nii.gz` by extension) with an RAS sform, atomically.
///
/// Voxels are stored as int16 when every value is an integer in range (CTs in HU), else float32.
pub fn write_nifti(vol: &Volume, path: &Path) -> Result<(), VolumeError> {
    let [nx, ny, nz] = vol.dims();
    let affine_ras = ras_lps() * vol.world_from_voxel();
    let mut header = NiftiHeader::default();
    header.set_affine(&affine_ras);
    header.sform_code = 1; // scanner anatomical
    header.qform_code = 1;
    header.pixdim[1..4].copy_from_slice(&vol.spacing_mm().map(|s| s as f32));
    header.xyzt_units = 2; // millimetres
    let desc = vol.meta.description.as_bytes();
    let n = desc.len().min(79);
    header.descrip = [&desc[..n], &vec![0u8; 80 - n][..]].concat();

    let integral = vol
        .hu()
        .iter()
        .all(|v| v.fract() == 0.0 && *v >= i16::MIN as f32 && *v <= i16::MAX as f32);
    // Our layout is i fastest: shape (nz, ny, nx) in C order, then reversed to (nx, ny, nz).
    let write = |tmp: &Path| -> Result<(), nifti::NiftiError> {
        let opts = nifti::writer::WriterOptions::new(tmp).reference_header(&header);
        if integral {
            let data: Vec<i16> = vol.hu().iter().map(|&v| v as i16).collect();
            let a = ndarray::Array3::from_shape_vec((nz, ny, nx), data)
                .map_err(|_| nifti::NiftiError::IncompatibleLength(vol.hu().len(), nx * ny * nz))?;
            opts.write_nifti(&a.reversed_axes())
        } else {
            let a = ndarray::Array3::from_shape_vec((nz, ny, nx), vol.hu().to_vec())
                .map_err(|_| nifti::NiftiError::IncompatibleLength(vol.hu().len(), nx * ny * nz))?;
            opts.write_nifti(&a.reversed_axes())
        }
    };
    atomic_write_with(path, |tmp| write(tmp).map_err(std::io::Error::other))
        .map_err(|e| VolumeError::nifti(path, format!("writing: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Rotation3;

    #[test]
    fn write_read_round_trip_keeps_geometry_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let rot = *Rotation3::from_euler_angles(0.2, 0.0, -0.4).matrix();
        let hu: Vec<f32> = (0..3 * 4 * 5).map(|v| v as f32 * 10.0 - 1000.0).collect();
        let v = Volume::new(
            [3, 4, 5],
            [0.5, 0.75, 2.0],
            Vector3::new(1.0, -2.0, 3.0),
            rot,
            hu,
        )
        .unwrap();
        for name in ["a.nii", "b.nii.gz"] {
            let p = dir.path().join(name);
            write_nifti(&v, &p).unwrap();
            let r = read_nifti(&p).unwrap();
            assert_eq!(r.dims(), v.dims());
            assert_eq!(r.hu(), v.hu());
            for a in 0..3 {
                assert!((r.spacing_mm()[a] - v.spacing_mm()[a]).abs() < 1e-6);
            }
            assert!((r.direction() - v.direction()).abs().max() < 1e-6);
            assert!((r.origin_mm() - v.origin_mm()).abs().max() < 1e-4);
        }
    }

    #[test]
    fn float_volumes_stay_float() {
        let dir = tempfile::tempdir().unwrap();
        let hu = vec![0.25f32, -1.5, 3.75, 1e5, 2.0, 3.0, 4.0, 5.5];
        let v = Volume::new(
            [2, 2, 2],
            [1.0; 3],
            Vector3::zeros(),
            Matrix3::identity(),
            hu,
        )
        .unwrap();
        let p = dir.path().join("f.nii.gz");
        write_nifti(&v, &p).unwrap();
        assert_eq!(read_nifti(&p).unwrap().hu(), v.hu());
    }
}
