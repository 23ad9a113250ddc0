//! X-ray and fluoroscopy DICOM frames from real files: the 12-frame XA cine, a hip radiograph in
//! five encodings, and a headerless ACR-NEMA scout.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::stream::read_xray_dicom;

#[test]
fn xa_cine_gives_twelve_frames_and_its_geometry() {
    let Some(p) = common::shared("fluoro/XA-MONO2-8-12x-catheter.dcm") else {
        return;
    };
    let x = read_xray_dicom(&p).unwrap();
    assert_eq!((x.width, x.height, x.frames.len()), (512, 512, 12));
    assert_eq!(x.modality, "XA");
    assert_eq!(x.frame_time_ms, Some(33.0));
    assert_eq!(x.geometry.primary_angle_deg, Some(77.0));
    assert_eq!(x.geometry.secondary_angle_deg, Some(-45.0));
    // Frames differ (it is a cine, not one image repeated). The header says its 8-bit values
    // are proportional to the beam's intensity (Pixel Intensity Relationship LIN): they come
    // as line integrals, -ln(v + 1/2), larger where more is absorbed, as DRRs are.
    assert_ne!(x.frames[0], x.frames[11]);
    use fluoropose::stream::IntensityRelationship;
    assert_eq!(x.intensity, Some(IntensityRelationship::Lin(false)));
    let range = |lo: f32, hi: f32| x.frames.iter().flatten().all(|v| (lo..=hi).contains(v));
    assert!(range(-(255.5f32).ln(), -(0.5f32).ln()));
}

/// The intensity relationship of the header decides how values become line integrals, on the
/// real XA file edited three ways: LOG with sign -1 (already attenuation: as stored), LOG with
/// sign +1 (negated), and no relationship (as stored, MONOCHROME2).
#[test]
fn the_pixel_intensity_relationship_maps_values_to_line_integrals() {
    use dicom::core::{DataElement, PrimitiveValue, VR};
    use dicom::dictionary_std::tags;
    use fluoropose::stream::IntensityRelationship;
    let Some(p) = common::shared("fluoro/XA-MONO2-8-12x-catheter.dcm") else {
        return;
    };
    let lin = read_xray_dicom(&p).unwrap();
    let raw: Vec<f32> = lin.frames[0].iter().map(|v| (-v).exp() - 0.5).collect();
    assert!(
        raw.iter()
            .all(|v| (v - v.round()).abs() < 1e-3 && (0.0..=255.5).contains(v))
    );
    let dir = tempfile::tempdir().unwrap();
    // (attributes written, what the reader makes of them, sign of the values it returns)
    type Case = (
        Option<(&'static str, i32)>,
        Option<IntensityRelationship>,
        f32,
    );
    let cases: [Case; 3] = [
        (
            Some(("LOG", -1)),
            Some(IntensityRelationship::Log(true)),
            1.0,
        ),
        (
            Some(("LOG", 1)),
            Some(IntensityRelationship::Log(false)),
            -1.0,
        ),
        (None, None, 1.0),
    ];
    for (k, (attr, want, sign)) in cases.into_iter().enumerate() {
        let mut obj = dicom::object::open_file(&p).unwrap();
        match attr {
            Some((rel, s)) => {
                obj.put(DataElement::new(
                    tags::PIXEL_INTENSITY_RELATIONSHIP,
                    VR::CS,
                    PrimitiveValue::from(rel),
                ));
                obj.put(DataElement::new(
                    tags::PIXEL_INTENSITY_RELATIONSHIP_SIGN,
                    VR::SS,
                    PrimitiveValue::from(s as i16),
                ));
            }
            None => {
                obj.remove_element(tags::PIXEL_INTENSITY_RELATIONSHIP);
            }
        }
        let q = dir.path().join(format!("{k}.dcm"));
        obj.write_to_file(&q).unwrap();
        let x = read_xray_dicom(&q).unwrap();
        assert_eq!(x.intensity, want, "{attr:?}");
        for (a, b) in x.frames[0].iter().zip(&raw) {
            assert!((a - sign * b.round()).abs() < 1e-3, "{attr:?}: {a} vs {b}");
        }
    }
}

#[test]
fn hip_radiograph_decodes_identically_in_every_pure_rust_encoding() {
    let Some(unc) = common::shared("xray/WG04_RG2_hip/RG2_UNC") else {
        return;
    };
    let want = read_xray_dicom(&unc).unwrap();
    assert_eq!(want.frames.len(), 1);
    assert!(want.width > 1000 && want.height > 1000);
    let (sr, sc) = want.geometry.pixel_spacing_mm.unwrap();
    assert!((sr - 0.2).abs() < 1e-6 && (sc - 0.2).abs() < 1e-6);
    for enc in ["RG2_RLE", "RG2_JPLL", "RG2_J2KR"] {
        let got = read_xray_dicom(&common::shared(&format!("xray/WG04_RG2_hip/{enc}")).unwrap())
            .unwrap_or_else(|e| panic!("{enc}: {e}"));
        assert_eq!((got.width, got.height), (want.width, want.height), "{enc}");
        assert!(got.frames[0] == want.frames[0], "{enc}: pixels differ");
    }
    // JPEG-LS needs the charls C library, which is not built: a clear error, naming the file.
    let jls = common::shared("xray/WG04_RG2_hip/RG2_JLSL").unwrap();
    let e = read_xray_dicom(&jls).unwrap_err().to_string();
    assert!(e.contains("RG2_JLSL") && e.contains("pixel data"), "{e}");
}

#[test]
fn headerless_acr_nema_scout_is_read() {
    let Some(p) = common::shared("xray/OT-MONO2-8-hip.dcm") else {
        return;
    };
    let x = read_xray_dicom(&p).unwrap();
    assert_eq!((x.width, x.height, x.frames.len()), (512, 512, 1));
    let (lo, hi) = x.frames[0]
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    assert!(lo >= 0.0 && hi <= 255.0 && hi > lo + 100.0, "{lo}..{hi}");
}

#[test]
fn truncated_and_foreign_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    if let Some(p) = common::shared("fluoro/XA-MONO2-8-12x-catheter.dcm") {
        let b = std::fs::read(p).unwrap();
        let cut = dir.path().join("cut.dcm");
        std::fs::write(&cut, &b[..b.len() / 3]).unwrap();
        let e = read_xray_dicom(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.dcm"), "{e}");
        // A pixel data length of 4 GiB in a 3 MB file is refused from the headers, before a
        // parser allocates it (dicom-rs would zero 4 GiB first).
        let hostile = dir.path().join("hostile.dcm");
        std::fs::write(&hostile, common::with_pixel_data_length(&b, 0xffff_fff0)).unwrap();
        let e = read_xray_dicom(&hostile).unwrap_err().to_string();
        assert!(
            e.contains("hostile.dcm") && e.contains("claims 4294967280 bytes"),
            "{e}"
        );
    }
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "not an image at all").unwrap();
    assert!(
        read_xray_dicom(&txt)
            .unwrap_err()
            .to_string()
            .contains("notes.txt")
    );
    assert!(
        read_xray_dicom(&dir.path().join("absent.dcm"))
            .unwrap_err()
            .to_string()
            .contains("absent.dcm")
    );
}

#[test]
fn png_and_tiff_frames_keep_their_values_and_folders_sort_naturally() {
    use fluoropose::stream::{list_frames, read_image_file};
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u16> = (0..6 * 4).map(|v| (v * 2731) as u16).collect();
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(6, 4, data.clone()).unwrap();
    for name in ["frame_10.png", "frame_2.tif", "frame_1.tiff"] {
        img.save(dir.path().join(name)).unwrap();
    }
    image::GrayImage::from_raw(6, 4, (0..24u8).collect())
        .unwrap()
        .save(dir.path().join("frame_3.png"))
        .unwrap();
    std::fs::write(dir.path().join("readme.txt"), "skip me").unwrap();
    std::fs::write(dir.path().join(".hidden.png"), "skip me too").unwrap();
    let files = list_frames(dir.path()).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["frame_1.tiff", "frame_2.tif", "frame_3.png", "frame_10.png"]
    );
    for f in &files {
        let x = read_image_file(f).unwrap();
        assert_eq!((x.width, x.height, x.frames.len()), (6, 4, 1));
        if f.ends_with("frame_3.png") {
            assert_eq!(x.frames[0], (0..24).map(|v| v as f32).collect::<Vec<_>>());
        } else {
            assert_eq!(
                x.frames[0],
                data.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                "{}",
                f.display()
            );
        }
    }
    // A DICOM file without an extension in a folder is a frame too.
    if let Some(p) = common::shared("fluoro/WG04_XA1/XA1_UNC") {
        let d2 = tempfile::tempdir().unwrap();
        std::fs::copy(p, d2.path().join("XA1")).unwrap();
        let files = list_frames(d2.path()).unwrap();
        let x = read_image_file(&files[0]).unwrap();
        assert_eq!(x.modality, "XA");
    }
    // A broken PNG names the file; an empty folder says so.
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    assert!(
        read_image_file(&bad)
            .unwrap_err()
            .to_string()
            .contains("broken.png")
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(
        list_frames(empty.path())
            .unwrap_err()
            .to_string()
            .contains("no image files")
    );
}
