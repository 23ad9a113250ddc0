//! Where a training step's time goes (batch N, default 4; 256x256; base width B, default 8, the
//! compact network's, 12 the default network's): forward with the loss, backward, the
//! optimiser, against the 3x3 convolution kernels alone (forward, input and weight gradients):
//! `cargo run --release --example train_profile [N [B]]`.
use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use fluoropose::model::conv::{ConvShape, conv3x3, conv3x3_grad_input, conv3x3_grad_weight};
use fluoropose::model::{ModelConfig, UNet, heatmap};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the binary runs (see `tune_allocator`).
    fluoropose::tune_allocator();
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let mut cfg = ModelConfig::default();
    if let Some(base) = args.next().and_then(|a| a.parse().ok()) {
        cfg.base_channels = base;
    }
    let s = cfg.input_size;
    let net = UNet::new(cfg.clone(), &Device::Cpu)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, s, s), &Device::Cpu)?;
    let tgt = Tensor::zeros(
        (batch, cfg.n_landmarks, s, s),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let mut opt = candle_nn::AdamW::new(net.trainable_vars(), Default::default())?;
    let (mut f, mut b, mut o) = (vec![], vec![], vec![]);
    for _ in 0..7 {
        let t = Instant::now();
        let loss = heatmap::bce_with_logits(&net.forward(&x, true)?, &tgt)?;
        f.push(ms(t));
        let t = Instant::now();
        let grads = loss.backward()?;
        b.push(ms(t));
        let t = Instant::now();
        opt.step(&grads)?;
        o.push(ms(t));
    }
    let (f, b, o) = (median(f), median(b), median(o));
    println!(
        "forward+loss {f:.1} ms, backward {b:.1} ms, optimiser {o:.1} ms, total {:.1} ms",
        f + b + o
    );
    let mut shapes = Vec::new();
    for l in 0..cfg.depth {
        let hw = s >> l;
        let cin = if l == 0 { 1 } else { cfg.channels(l - 1) };
        shapes.push((cin, cfg.channels(l), hw));
        shapes.push((cfg.channels(l), cfg.channels(l), hw));
        if l + 1 < cfg.depth {
            shapes.push((cfg.channels(l + 1) + cfg.channels(l), cfg.channels(l), hw));
            shapes.push((cfg.channels(l), cfg.channels(l), hw));
        }
    }
    let (mut cf, mut ci, mut cw) = (0.0, 0.0, 0.0);
    println!("per convolution (ms): forward, input gradient, weight gradient");
    for (cin, cout, hw) in shapes {
        let sh = ConvShape {
            batch,
            cin,
            cout,
            h: hw,
            w: hw,
        };
        let xi = vec![0.5f32; batch * cin * hw * hw];
        let g = vec![0.5f32; batch * cout * hw * hw];
        let w = vec![0.1f32; cout * cin * 9];
        let time = |k: &dyn Fn()| {
            k();
            median(
                (0..5)
                    .map(|_| {
                        let t = Instant::now();
                        k();
                        ms(t)
                    })
                    .collect(),
            )
        };
        let f = time(&|| {
            std::hint::black_box(conv3x3(&xi, &w, None, false, sh));
        });
        let i = time(&|| {
            std::hint::black_box(conv3x3_grad_input(&g, &w, sh));
        });
        let wg = time(&|| {
            std::hint::black_box(conv3x3_grad_weight(&xi, &g, sh));
        });
        println!("  {cin:4} -> {cout:4} at {hw:3}²: {f:7.1} {i:7.1} {wg:7.1}");
        (cf, ci, cw) = (cf + f, ci + i, cw + wg);
    }
    println!(
        "convolutions alone: forward {cf:.1} ms, input gradient {ci:.1} ms, weight gradient {cw:.1} ms, total {:.1} ms",
        cf + ci + cw
    );
    Ok(())
}
