//! Landmark files as other tools write them: 3D Slicer 5 markups JSON (LPS and RAS, default and
//! anatomical labels, an undefined point), Slicer 4 and 5 `.fcsv`, and the 2D annotation CSV.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

use fluoropose::landmarks::{LANDMARKS, Landmarks2d, Landmarks3d, landmark_from_label};
use nalgebra::Point3;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/landmarks")
        .join(name)
}

/// The LPS points all the fixture files describe.
fn expected() -> [Point3<f64>; 8] {
    [
        [117.4, -42.1, 62.3],
        [45.2, -29.8, -66.5],
        [27.9, -38.9, -43.7],
        [0.0, -44.0, -24.0],
        [0.0, -38.0, -66.0],
        [-27.6, -39.2, -44.1],
        [-45.9, -30.3, -66.0],
        [-116.8, -41.7, 61.9],
    ]
    .map(Point3::from)
}

fn close(a: &Landmarks3d, skip: Option<usize>) {
    for (i, (p, e)) in a.points.iter().zip(expected()).enumerate() {
        if Some(i) == skip {
            assert_eq!(*p, None, "{}", LANDMARKS[i].code);
        } else {
            let p = p.unwrap_or_else(|| panic!("{} missing", LANDMARKS[i].code));
            assert!((p - e).norm() < 1e-9, "{}: {p} vs {e}", LANDMARKS[i].code);
        }
    }
}

#[test]
fn slicer5_markups_in_lps_with_default_labels() {
    close(
        &Landmarks3d::read(&data("slicer5_lps.mrk.json")).unwrap(),
        None,
    );
}

#[test]
fn slicer5_markups_in_ras_with_anatomical_labels_in_any_order() {
    // Labels name the landmarks, so file order does not matter; the undefined point is absent.
    close(
        &Landmarks3d::read(&data("slicer5_ras_named.mrk.json")).unwrap(),
        Some(4),
    );
}

#[test]
fn slicer4_and_slicer5_fcsv() {
    close(&Landmarks3d::read(&data("slicer4.fcsv")).unwrap(), None);
    // A 5.x-style file with codes as labels and an extra trailing column.
    close(&Landmarks3d::read(&data("slicer5.fcsv")).unwrap(), None);
}

#[test]
fn written_markups_read_back_and_name_every_landmark() {
    let l = Landmarks3d::read(&data("slicer5_lps.mrk.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.mrk.json");
    l.write(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let cps = v["markups"][0]["controlPoints"].as_array().unwrap();
    for (i, cp) in cps.iter().enumerate() {
        assert_eq!(landmark_from_label(cp["label"].as_str().unwrap()), Some(i));
    }
    assert_eq!(v["markups"][0]["coordinateSystem"], "LPS");
    assert_eq!(Landmarks3d::read(&p).unwrap(), l);
}

#[test]
fn annotation_csv_with_a_missing_landmark() {
    let sets = Landmarks2d::read_csv(&data("annotations.csv")).unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].image, "frame_000.png");
    assert_eq!((sets[0].width, sets[0].height), (512, 512));
    assert!(sets[0].points.iter().all(Option::is_some));
    assert_eq!(sets[1].points[1], None);
    let p = sets[1].points[7].unwrap();
    assert_eq!((p.x, p.y), (83.4, 107.9));
    // Written and read again: identical.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.csv");
    Landmarks2d::write_csv(&sets, &out).unwrap();
    assert_eq!(Landmarks2d::read_csv(&out).unwrap(), sets);
}

#[test]
fn unreadable_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.mrk.json");
    std::fs::write(&p, "{\"markups\": [").unwrap();
    let e = Landmarks3d::read(&p).unwrap_err().to_string();
    assert!(e.contains("broken.mrk.json") && e.contains("JSON"), "{e}");
    let e = Landmarks3d::read(&dir.path().join("absent.fcsv"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.fcsv"), "{e}");
    // Seven unlabeled points: not the paper's eight.
    let p = dir.path().join("seven.json");
    std::fs::write(
        &p,
        "[[1,2,3],[1,2,3],[1,2,3],[1,2,3],[1,2,3],[1,2,3],[1,2,3]]",
    )
    .unwrap();
    assert!(
        Landmarks3d::read(&p)
            .unwrap_err()
            .to_string()
            .contains("8 points")
    );
}
