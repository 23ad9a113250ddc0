//! CUDA parity, built with `--features cuda` and run where an NVIDIA GPU is: on CUDA the network
//! runs candle's own kernels (the fast kernels of `model::conv` and `model::batchnorm` are CPU
//! code), so these check that the two paths compute the same network: forward in training and
//! inference mode, the folded inference network, every parameter's gradient, and whole training
//! steps of the composite loss (BCE + PEL through the registration layer, which solves on the
//! host). Without a GPU each test says so and passes: CI machines have none.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use candle_core::{D, Device, Tensor};
use fluoropose::dataset::{Dataset, Request, generate, parse_subjects};
use fluoropose::model::{ModelConfig, UNet, heatmap};
use fluoropose::task::Task;
use fluoropose::train::{Metric, Mode, TrainOptions, train};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn config(size: usize) -> ModelConfig {
    ModelConfig {
        depth: 4,
        base_channels: 8,
        input_size: size,
        ..ModelConfig::default()
    }
}

/// Largest absolute difference relative to the largest magnitude of `a`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max(D::Minus1).unwrap();
    let m = a.abs().unwrap().max(D::Minus1).unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-12)
}

fn input(size: usize, dev: &Device) -> Tensor {
    let v: Vec<f32> = (0..2 * size * size)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect();
    Tensor::from_vec(v, (2, 1, size, size), dev).unwrap()
}

#[test]
fn forward_and_gradients_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let cpu = Device::Cpu;
    let (a, b) = (
        UNet::with_seed(config(64), &cpu, 3).unwrap(),
        UNet::with_seed(config(64), &gpu, 3).unwrap(),
    );
    let (xa, xb) = (input(64, &cpu), input(64, &gpu));
    for train_mode in [false, true] {
        let (ya, yb) = (
            a.forward(&xa, train_mode).unwrap(),
            b.forward(&xb, train_mode).unwrap(),
        );
        let d = rel_diff(&ya, &yb);
        assert!(d < 1e-4, "forward (train {train_mode}) differs by {d}");
    }
    let (fa, fb) = (a.fused().unwrap(), b.fused().unwrap());
    let d = rel_diff(
        &fa.forward(&xa, false).unwrap(),
        &fb.forward(&xb, false).unwrap(),
    );
    assert!(d < 1e-4, "folded inference network differs by {d}");

    let pts: Vec<Vec<Option<nalgebra::Point2<f64>>>> = (0..2)
        .map(|k| {
            (0..8)
                .map(|i| Some(nalgebra::Point2::new(5.0 + 6.0 * i as f64, 20.0 + k as f64)))
                .collect()
        })
        .collect();
    let loss = |net: &UNet, x: &Tensor, dev: &Device| {
        let t = heatmap::targets(&pts, 64, 2.0, dev).unwrap();
        heatmap::bce_with_logits_weighted(&net.forward(x, true).unwrap(), &t, 100.0).unwrap()
    };
    let (la, lb) = (loss(&a, &xa, &cpu), loss(&b, &xb, &gpu));
    assert!(rel_diff(&la, &lb) < 1e-4);
    let (ga, gb) = (la.backward().unwrap(), lb.backward().unwrap());
    let (va, vb) = (a.trainable_vars(), b.trainable_vars());
    assert_eq!(va.len(), vb.len());
    for (i, (x, y)) in va.iter().zip(&vb).enumerate() {
        let (gx, gy) = (ga.get(x).unwrap(), gb.get(y).unwrap());
        let d = rel_diff(gx, gy);
        assert!(d < 1e-3, "gradient of parameter {i} differs by {d}");
    }
}

#[test]
fn composite_training_steps_match_the_cpu() {
    let Some(gpu) = cuda() else { return };
    let dir = tempfile::tempdir().unwrap();
    let req = Request {
        subjects: parse_subjects("phantom:1..3", 1).unwrap(),
        views: 4,
        novel_views: 0,
        size: 64,
        seed: 5,
        range: Default::default(),
        realism: Default::default(),
        cpu: true,
    };
    generate(&req, dir.path(), &Task::new()).unwrap();
    let data = Dataset::open(dir.path()).unwrap();
    let run = |dev: &Device, name: &str| {
        let opts = TrainOptions {
            mode: Mode::Composite,
            epochs: 10,
            batch: 4,
            lr: 1e-3,
            lambda: 0.01,
            max_steps: Some(4),
            out: dir.path().join(name),
            config: config(64),
            ..TrainOptions::default()
        };
        let mut losses = Vec::new();
        train(
            std::slice::from_ref(&data),
            &opts,
            dev,
            &Task::new(),
            &mut |m: &Metric| losses.push((m.seg_loss, m.pose_loss)),
        )
        .unwrap();
        losses
    };
    let (on_cpu, on_gpu) = (
        run(&Device::Cpu, "cpu.safetensors"),
        run(&gpu, "gpu.safetensors"),
    );
    assert_eq!(on_cpu.len(), 4);
    assert_eq!(on_cpu.len(), on_gpu.len());
    for (step, ((sc, pc), (sg, pg))) in on_cpu.iter().zip(&on_gpu).enumerate() {
        eprintln!("step {step}: seg {sc:.6} / {sg:.6}, pose {pc:.4} / {pg:.4}");
        assert!(
            (sc - sg).abs() <= 1e-3 * sc.abs().max(1e-6),
            "seg loss, step {step}"
        );
        assert!(
            (pc - pg).abs() <= 1e-2 * pc.abs().max(1e-6),
            "pose loss, step {step}"
        );
    }
    // The GPU's checkpoint loads on the CPU and predicts what it predicted on the GPU.
    let saved = UNet::load(&dir.path().join("gpu.safetensors"), &Device::Cpu).unwrap();
    let again = UNet::load(&dir.path().join("gpu.safetensors"), &gpu).unwrap();
    let d = rel_diff(
        &saved.forward(&input(64, &Device::Cpu), false).unwrap(),
        &again.forward(&input(64, &gpu), false).unwrap(),
    );
    assert!(
        d < 1e-4,
        "a GPU checkpoint predicts differently on the CPU ({d})"
    );
}
