//! The WGSL renderers on a real wgpu device (lavapipe in CI) against the CPU reference, and
//! against DiffDRR's own images. Set FLUOROPOSE_SKIP_GPU=1 to skip where no Vulkan/Metal/DX12
//! driver exists; in CI an absent adapter fails.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::drr::cpu::{self, Renderer};
use fluoropose::drr::gpu::{DrrRenderer, headless_device};
use fluoropose::drr::image_io::read_npy;
use fluoropose::drr::{Attenuation, DensityVolume};
use fluoropose::geometry::diffdrr::{self, DiffDrrPose};
use fluoropose::geometry::sampling::{PoseRange, ap_pose};
use fluoropose::geometry::{Camera, EulerZxyRad};
use fluoropose::volume::phantom::phantom_subject;
use fluoropose::volume::read_nifti;
use nalgebra::Vector3;
use rand::SeedableRng;
use std::sync::{Arc, OnceLock};

fn gpu() -> Option<&'static (eframe::wgpu::Device, eframe::wgpu::Queue)> {
    static DEV: OnceLock<Option<(eframe::wgpu::Device, eframe::wgpu::Queue)>> = OnceLock::new();
    DEV.get_or_init(|| {
        if std::env::var("FLUOROPOSE_SKIP_GPU").is_ok_and(|v| v == "1") {
            eprintln!("SKIP: FLUOROPOSE_SKIP_GPU=1");
            return None;
        }
        let (d, q, info) = headless_device(true)
            .expect("a wgpu adapter (install mesa-vulkan-drivers, or set FLUOROPOSE_SKIP_GPU=1)");
        eprintln!(
            "adapter: {} ({:?}, {:?})",
            info.name, info.device_type, info.backend
        );
        Some((d, q))
    })
    .as_ref()
}

/// Largest |gpu - cpu| relative to the largest CPU value.
fn rel_diff(gpu: &[f32], cpu: &[f32]) -> f64 {
    let peak = cpu.iter().fold(0.0f32, |a, b| a.max(b.abs())) as f64;
    gpu.iter()
        .zip(cpu)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max)
        / peak.max(1e-30)
}

fn check(
    vol: &Arc<DensityVolume>,
    cam: &Camera,
    poses: &[fluoropose::geometry::Pose],
    renderers: &[Renderer],
    tol: f64,
) {
    let Some((d, q)) = gpu() else { return };
    let mut r = DrrRenderer::new(d, q);
    r.set_volume(vol.clone()).unwrap();
    for &which in renderers {
        let batch = r.render(cam, poses, which).unwrap();
        assert_eq!(batch.len(), poses.len());
        for (k, (img, pose)) in batch.iter().zip(poses).enumerate() {
            let reference = cpu::render(vol, cam, pose, which);
            let e = rel_diff(img, &reference);
            eprintln!("{which:?} pose {k}: max |gpu - cpu| / peak = {e:.2e}");
            assert!(e < tol, "{which:?} pose {k}: {e}");
        }
    }
}

const ALL: [Renderer; 4] = [
    Renderer::Siddon { full_line: false },
    Renderer::Siddon { full_line: true },
    Renderer::Trilinear { n_points: 500 },
    Renderer::TrilinearStep {
        step_mm: 1.0,
        full_line: false,
    },
];

#[test]
fn gpu_matches_cpu_reference_on_the_phantom() {
    let (vol, _) = phantom_subject(4, Some(3.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let iso = vol.center_mm();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut poses = vec![ap_pose(&iso, 800.0)];
    poses.extend((0..3).map(|_| PoseRange::default().sample(&mut rng, &iso)));
    check(
        &dv,
        &Camera::new(1020.0, 96, 80, 4.0, 4.5),
        &poses,
        &ALL,
        1e-4,
    );
}

#[test]
fn gpu_matches_cpu_reference_on_the_chest_ct() {
    let Some(ct) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let vol = read_nifti(&ct).unwrap();
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::diffdrr()));
    let c = vol.center_mm();
    let poses: Vec<_> = [
        ([0.0, 0.0, 0.0], [0.0, 850.0, 0.0]),
        ([0.6, -0.4, 0.3], [30.0, 820.0, -40.0]),
    ]
    .iter()
    .map(|(r, t)| {
        DiffDrrPose {
            rotations: EulerZxyRad(*r),
            translations_mm: Vector3::from(*t),
        }
        .to_pose(&c)
    })
    .collect();
    check(
        &dv,
        &diffdrr::camera(1020.0, 64, 6.0, None, None),
        &poses,
        &ALL,
        1e-4,
    );
}

#[test]
fn gpu_matches_diffdrr_images() {
    let Some(ct) = common::registry("diffdrr/data/cxr.nii.gz") else {
        return;
    };
    let Some((d, q)) = gpu() else { return };
    let vol = read_nifti(&ct).unwrap();
    let mut r = DrrRenderer::new(d, q);
    r.set_volume(Arc::new(DensityVolume::from_volume(
        &vol,
        Attenuation::diffdrr(),
    )))
    .unwrap();
    let dir = common::root().join("tests/data/diffdrr");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("drr_cases.json")).unwrap())
            .unwrap();
    // Square images at 128 and 256 px, and non-square ones with unequal pixel spacing.
    let all = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .chain(cases["nonsquare_cases"].as_array().unwrap());
    for case in all {
        let f = |v: &serde_json::Value| v.as_f64().unwrap();
        let height = case["height"].as_u64().unwrap() as u32;
        let width = case["width"].as_u64().unwrap() as u32;
        let cam = diffdrr::camera(
            f(&case["sdd"]),
            height,
            f(&case["delx"]),
            Some(width),
            Some(f(&case["dely"])),
        );
        let (rr, tt) = (&case["rotations_zxy_rad"], &case["translations_mm"]);
        let pose = DiffDrrPose {
            rotations: EulerZxyRad([f(&rr[0]), f(&rr[1]), f(&rr[2])]),
            translations_mm: Vector3::new(f(&tt[0]), f(&tt[1]), f(&tt[2])),
        }
        .to_pose(&vol.center_mm());
        let siddon = case["renderer"] == "siddon";
        let which = if siddon {
            Renderer::Siddon { full_line: true }
        } else {
            Renderer::Trilinear { n_points: 500 }
        };
        let img = r.render(&cam, &[pose], which).unwrap().remove(0);
        let (theirs, _, _) = read_npy(&dir.join(case["file"].as_str().unwrap())).unwrap();
        let c = common::ncc(&img, &theirs);
        eprintln!("{}: NCC {c:.6}", case["file"]);
        assert!(
            c >= if siddon { 0.999 } else { 0.995 },
            "{}: {c}",
            case["file"]
        );
    }
}

#[test]
fn errors_instead_of_panics() {
    let Some((d, q)) = gpu() else { return };
    let r = DrrRenderer::new(d, q);
    let cam = Camera::paper(64);
    let pose = ap_pose(&nalgebra::Point3::origin(), 800.0);
    assert!(
        r.render(&cam, &[pose], ALL[0])
            .unwrap_err()
            .to_string()
            .contains("no volume")
    );
    let (vol, _) = phantom_subject(0, Some(8.0));
    let mut r = r;
    r.set_volume(Arc::new(DensityVolume::from_volume(
        &vol,
        Attenuation::default(),
    )))
    .unwrap();
    let mut bad = pose;
    bad.translation_mm.x = f64::NAN;
    assert!(r.render(&cam, &[bad], ALL[0]).is_err());
    assert!(r.render(&cam, &[], ALL[0]).is_err());
    let mut c = cam;
    c.sdd_mm = -1.0;
    assert!(r.render(&c, &[pose], ALL[0]).is_err());
}

#[test]
fn window_pass_writes_the_display_texture_on_the_gpu() {
    use eframe::wgpu;
    let Some((d, q)) = gpu() else { return };
    let (vol, _) = phantom_subject(1, Some(6.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let mut r = DrrRenderer::new(d, q);
    r.set_volume(dv.clone()).unwrap();
    let cam = Camera::new(1020.0, 40, 24, 9.0, 9.0);
    let pose = ap_pose(&vol.center_mm(), 800.0);
    let reference = cpu::render(&dv, &cam, &pose, ALL[0]);
    let (lo, hi) = (1.0f32, 6.0f32);
    let texture = d.create_texture(&wgpu::TextureDescriptor {
        label: Some("test display"),
        size: wgpu::Extent3d {
            width: 40,
            height: 24,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba8Unorm,
        usage: wgpu::TextureUsages::STORAGE_BINDING
            | wgpu::TextureUsages::COPY_SRC
            | wgpu::TextureUsages::TEXTURE_BINDING,
        view_formats: &[],
    });
    let view = texture.create_view(&Default::default());
    let mut enc = d.create_command_encoder(&Default::default());
    let images = r.encode(&mut enc, &cam, &[pose, pose], ALL[0]).unwrap();
    let window = fluoropose::drr::gpu::Window {
        low: lo,
        high: hi,
        invert: true,
        intensity: false,
        tint: [1.0, 1.0, 1.0, 1.0],
    };
    r.encode_window(&mut enc, &images, 1, &window, &view);
    let readback = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 256 * 24,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    enc.copy_texture_to_buffer(
        texture.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &readback,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(256),
                rows_per_image: None,
            },
        },
        wgpu::Extent3d {
            width: 40,
            height: 24,
            depth_or_array_layers: 1,
        },
    );
    q.submit(Some(enc.finish()));
    readback.slice(..).map_async(wgpu::MapMode::Read, |_| {});
    d.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let bytes = readback.slice(..).get_mapped_range().unwrap().to_vec();
    let mut checked = 0;
    for y in 0..24 {
        for x in 0..40 {
            let v = reference[y * 40 + x];
            let want = (1.0 - ((v - lo) / (hi - lo)).clamp(0.0, 1.0)) * 255.0;
            let got = bytes[y * 256 + x * 4] as f32;
            assert!((got - want).abs() <= 1.0, "({x}, {y}): {got} vs {want}");
            assert_eq!(bytes[y * 256 + x * 4 + 3], 255);
            checked += 1;
        }
    }
    assert_eq!(checked, 960);
    // Not all one colour: the window spans the image's values.
    assert!(
        bytes.chunks(4).take(40).any(|p| p[0] > 20) && bytes.chunks(4).take(40).any(|p| p[0] < 235)
    );
}

/// The adapter the tests run on (lavapipe where it is installed), for devices of their own.
fn test_adapter() -> eframe::wgpu::Adapter {
    use eframe::wgpu;
    let instance = wgpu::Instance::default();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .find(|a| a.get_info().device_type == wgpu::DeviceType::Cpu)
        .or_else(|| {
            pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
                .ok()
        })
        .unwrap()
}

/// A device on `adapter` whose storage buffer bindings hold at most `limit` bytes.
fn device_with_binding_limit(
    adapter: &eframe::wgpu::Adapter,
    limit: u64,
) -> (eframe::wgpu::Device, eframe::wgpu::Queue) {
    use eframe::wgpu;
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: wgpu::Limits {
            max_storage_buffer_binding_size: limit,
            ..adapter.limits()
        },
        ..Default::default()
    }))
    .unwrap()
}

/// The volume in a storage buffer or in a 3D texture (what a device's storage binding limit
/// decides): the same images as the CPU reference either way.
#[test]
fn every_volume_placement_matches_the_cpu_reference() {
    if gpu().is_none() {
        return;
    }
    let (vol, _) = phantom_subject(7, Some(3.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    // The buffer holds the box of non-zero voxels.
    let [a, b] = dv.occupied.unwrap();
    let boxed = [0, 1, 2].map(|i| (b[i] + 1 - a[i]) as u64);
    let slice = boxed[0] * boxed[1] * 4;
    let total = slice * boxed[2];
    assert!(
        total < (dv.data.len() * 4) as u64,
        "the phantom has air around it"
    );
    let iso = vol.center_mm();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let pose = PoseRange::default().sample(&mut rng, &iso);
    let cam = Camera::new(1020.0, 40, 32, 8.0, 9.0);
    let adapter = test_adapter();
    // (storage binding limit, where the volume must go)
    let cases = [
        (adapter.limits().max_storage_buffer_binding_size, true),
        (total, true),
        (total - slice, false),
    ];
    for (limit, want) in cases {
        let (d, q) = device_with_binding_limit(&adapter, limit);
        let mut r = DrrRenderer::new(&d, &q);
        r.set_volume(dv.clone()).unwrap();
        assert_eq!(
            r.volume_in_buffer(),
            Some(want),
            "binding limit {limit} B, volume {total} B"
        );
        for which in [ALL[0], ALL[3]] {
            let img = r.render(&cam, std::slice::from_ref(&pose), which).unwrap();
            let e = rel_diff(&img[0], &cpu::render(&dv, &cam, &pose, which));
            eprintln!("{want:?} {which:?}: {e:.2e}");
            assert!(e < 1e-4, "{want:?} {which:?}: {e}");
        }
    }
}

/// A batch larger than one buffer of the device holds is rendered in several passes: every
/// pose's image, in order, each as its own single render gives it.
#[test]
fn a_batch_over_the_buffer_limit_renders_in_passes() {
    if gpu().is_none() {
        return;
    }
    let (vol, _) = phantom_subject(3, Some(6.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let iso = vol.center_mm();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let poses: Vec<_> = (0..7)
        .map(|_| PoseRange::default().sample(&mut rng, &iso))
        .collect();
    let cam = Camera::new(1020.0, 40, 32, 8.0, 9.0);
    let adapter = test_adapter();
    // Three images to a buffer: the 7 poses take three passes (3 + 3 + 1).
    let limit = 3 * 40 * 32 * 4;
    let (d, q) = device_with_binding_limit(&adapter, limit);
    let mut r = DrrRenderer::new(&d, &q);
    r.set_volume(dv.clone()).unwrap();
    let which = ALL[0];
    let batch = r.render(&cam, &poses, which).unwrap();
    assert_eq!(batch.len(), poses.len());
    for (i, (img, pose)) in batch.iter().zip(&poses).enumerate() {
        assert_eq!(img.len(), 40 * 32);
        let single = r.render(&cam, std::slice::from_ref(pose), which).unwrap();
        assert_eq!(img, &single[0], "pose {i}");
        let e = rel_diff(img, &cpu::render(&dv, &cam, pose, which));
        assert!(e < 1e-4, "pose {i}: {e}");
    }
    // Distinct poses, distinct images: the passes did not repeat one chunk.
    assert_ne!(batch[0], batch[3]);
    assert_ne!(batch[3], batch[6]);
}
