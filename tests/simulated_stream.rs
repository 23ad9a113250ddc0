//! The simulated C-arm stream: frames are DRRs at the trajectory's poses, noise behaves, seek
//! works, and a dose is as noisy live as in a training dataset.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

use fluoropose::dataset::Realism;
use fluoropose::drr::cpu::{Renderer, render};
use fluoropose::drr::{Attenuation, DensityVolume};
use fluoropose::geometry::Camera;
use fluoropose::model::Normalisation;
use fluoropose::model::noise;
use fluoropose::stream::simulated::{CpuDrr, Detector, QuantumNoise, SimulatedStream, Trajectory};
use fluoropose::volume::phantom::phantom_subject;
use rand::SeedableRng;
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
        Some(Detector::at_dose(5000.0)),
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
        Some(Detector::at_dose(5000.0)),
        7,
    )
    .next_frame()
    .unwrap();
    assert_eq!(again.pixels, n0.pixels);
}

/// One dose, one noise level: a simulated C-arm frame at N photons per pixel is as noisy, to the
/// app's noise estimate (the one its smoothing and `eval`'s report use), as a dataset image
/// rendered at N with the datasets' detector blur. Quantum noise alone, as the stream had it
/// before, reads far noisier.
#[test]
fn a_dose_is_as_noisy_live_as_in_a_dataset() {
    let (vol, _) = phantom_subject(0, Some(3.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let cam = Camera::paper(256);
    let pose = Trajectory::around(vol.center_mm()).pose_at(3.0);
    let clean = render(&dv, &cam, &pose, Renderer::Siddon { full_line: false });
    let level = |img: &[f32]| noise::level(&Normalisation::default().apply(img), 256, 256) as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for photons in [1_000.0, 10_000.0] {
        let (mut live, mut data, mut raw) = (vec![], vec![], vec![]);
        for seed in 0..4 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            live.push(level(
                &Detector::at_dose(photons).apply(&clean, &cam, &mut rng),
            ));
            let mut img = clean.clone();
            Realism {
                photons,
                blur_px: 0.5,
                ..Realism::default()
            }
            .apply(&mut img, 256, &mut rng);
            data.push(level(&img));
            raw.push(level(
                &QuantumNoise {
                    photons_per_pixel: photons,
                }
                .apply(&clean, &mut rng),
            ));
        }
        let (live, data, raw) = (mean(&live), mean(&data), mean(&raw));
        assert!(
            (live / data - 1.0).abs() < 0.1,
            "{photons} photons: live {live:.6}, dataset {data:.6}"
        );
        assert!(
            raw > 1.3 * data,
            "{photons} photons: unblurred {raw:.6}, dataset {data:.6}"
        );
    }
}
