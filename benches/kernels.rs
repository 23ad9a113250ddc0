//! Criterion benchmark of the fast CPU kernels against candle's own, on the 3x3 convolution
//! shapes of the performance issue's table (batch 1): forward, input gradient and weight
//! gradient. `benches/pytorch_unet.py --ops` times PyTorch on the same shapes, and
//! `fluoropose bench model` the whole network.

use candle_core::{Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use fluoropose::model::conv::{ConvShape, conv3x3, conv3x3_grad_input, conv3x3_grad_weight};
use std::hint::black_box;
use std::time::Duration;

/// (input channels, output channels, image side), as in the table.
const SHAPES: [(usize, usize, usize); 3] = [(16, 16, 256), (48, 16, 256), (128, 256, 32)];

fn bench(c: &mut Criterion) {
    fluoropose::tune_allocator();
    let mut g = c.benchmark_group("conv3x3");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    for (cin, cout, hw) in SHAPES {
        let s = ConvShape {
            batch: 1,
            cin,
            cout,
            h: hw,
            w: hw,
        };
        let x: Vec<f32> = (0..cin * hw * hw).map(|i| (i % 97) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| (i % 13) as f32 * 0.01)
            .collect();
        let gr: Vec<f32> = (0..cout * hw * hw)
            .map(|i| (i % 89) as f32 * 0.01)
            .collect();
        let name = format!("{cin}to{cout}_{hw}");
        g.bench_function(format!("{name}/forward"), |b| {
            b.iter(|| black_box(conv3x3(black_box(&x), &w, None, false, s)))
        });
        g.bench_function(format!("{name}/input_grad"), |b| {
            b.iter(|| black_box(conv3x3_grad_input(black_box(&gr), &w, s)))
        });
        g.bench_function(format!("{name}/weight_grad"), |b| {
            b.iter(|| black_box(conv3x3_grad_weight(black_box(&x), &gr, s)))
        });
        let (Ok(xt), Ok(wt)) = (
            Tensor::from_vec(x.clone(), (1, cin, hw, hw), &Device::Cpu),
            Tensor::from_vec(w.clone(), (cout, cin, 3, 3), &Device::Cpu),
        ) else {
            continue;
        };
        g.bench_function(format!("{name}/candle_forward"), |b| {
            b.iter(|| black_box(xt.conv2d(&wt, 1, 1, 1, 1)))
        });
    }
    g.finish();
}

/// The network's input preparation at 256 px: the quantile normalisation alone, the noise level
/// ([`fluoropose::model::noise::level`]), and the whole of it for a clean frame (measured, not
/// smoothed) and a noisy one (smoothed by the largest blur and normalised again).
fn input(c: &mut Criterion) {
    use fluoropose::model::{Normalisation, noise, normalised_input};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let s = 256;
    let clean: Vec<f32> = (0..s * s)
        .map(|i| {
            let (x, y) = (
                (i % s) as f32 / s as f32 - 0.5,
                (i / s) as f32 / s as f32 - 0.5,
            );
            (-(x * x + y * y) * 6.0).exp() + if x > 0.1 { 0.3 } else { 0.0 }
        })
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = Normal::new(0.0f32, 0.1).expect("a valid sigma");
    let noisy: Vec<f32> = clean.iter().map(|v| v + n.sample(&mut rng)).collect();
    let norm = Normalisation::default();
    let mut g = c.benchmark_group("input_256");
    g.bench_function("normalise", |b| b.iter(|| black_box(norm.apply(&clean))));
    let normalised = norm.apply(&clean);
    g.bench_function("noise_level", |b| {
        b.iter(|| black_box(noise::level(&normalised, s, s)))
    });
    g.bench_function("prepare_clean", |b| {
        b.iter(|| black_box(normalised_input(&norm, clean.clone(), s, true)))
    });
    g.bench_function("prepare_noisy_smoothed", |b| {
        b.iter(|| black_box(normalised_input(&norm, noisy.clone(), s, true)))
    });
    g.finish();
}

criterion_group!(benches, bench, input);
criterion_main!(benches);
