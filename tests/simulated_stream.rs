//! The simulated C-arm stream: frames are DRRs at the trajectory's poses, noise behaves, seek works.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

use fluoropose::drr::cpu::{Renderer, render};
use fluoropose::drr::{Attenuation, DensityVolume};
use fluoropose::geometry::Camera;
use fluoropose::stream::simulated::{CpuDrr, QuantumNoise, SimulatedStream, Trajectory};
use fluoropose::volume::phantom::phantom_subject;
use std::sync::Arc;

#[test]
fn frames_follow_the_trajectory_and_carry_their_true_pose() {
    let (vol, _) = phantom_subject(0, Some(6.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let cam = Camera::paper(32);
    let traj = Trajectory::around(vol.center_mm());
    let src = CpuDrr {
        volume: dv.clone(),
        renderer: Renderer::Siddon { full_line: false },
    };
    let mut clean = SimulatedStream::new(traj, cam, src, 10.0, None, 1);
    let f0 = clean.next_frame().unwrap();
    let f1 = clean.next_frame().unwrap();
    assert_eq!((f0.index, f1.index), (0, 1));
    assert!((f1.time_s - 0.1).abs() < 1e-12);
    assert_eq!(f1.pose, traj.pose_at(0.1));
    assert_eq!(
        f1.pixels,
        render(&dv, &cam, &f1.pose, Renderer::Siddon { full_line: false })
    );
    assert_ne!(f0.pixels, f1.pixels, "the C-arm moves");
    clean.seek(50);
    assert_eq!(clean.next_frame().unwrap().pose, traj.pose_at(5.0));

    // With quantum noise: unbiased on average, visibly noisy per pixel, reproducible by seed.
    let noisy_src = CpuDrr {
        volume: dv.clone(),
        renderer: Renderer::Siddon { full_line: false },
    };
    let mut noisy = SimulatedStream::new(
        traj,
        cam,
        noisy_src,
        10.0,
        Some(QuantumNoise {
            photons_per_pixel: 5000.0,
        }),
        7,
    );
    let n0 = noisy.next_frame().unwrap();
    let diff: Vec<f64> = n0
        .pixels
        .iter()
        .zip(&f0.pixels)
        .map(|(a, b)| (*a - *b) as f64)
        .collect();
    let mean = diff.iter().sum::<f64>() / diff.len() as f64;
    let rms = (diff.iter().map(|d| d * d).sum::<f64>() / diff.len() as f64).sqrt();
    assert!(
        rms > 0.005 && mean.abs() < 0.2 * rms + 0.01,
        "mean {mean}, rms {rms}"
    );
    let again = SimulatedStream::new(
        traj,
        cam,
        CpuDrr {
            volume: dv,
            renderer: Renderer::Siddon { full_line: false },
        },
        10.0,
        Some(QuantumNoise {
            photons_per_pixel: 5000.0,
        }),
        7,
    )
    .next_frame()
    .unwrap();
    assert_eq!(again.pixels, n0.pixels);
}
