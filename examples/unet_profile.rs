//! Where the default U-Net's forward time goes: the whole fused network versus its 18 3x3
//! convolutions alone (batch 1, 256x256): `cargo run --release --example unet_profile`.
use candle_core::{Device, Tensor};
use fluoropose::model::conv::{ConvShape, conv3x3};
use fluoropose::model::{ModelConfig, UNet};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    // As the binary runs (see `tune_allocator`).
    fluoropose::tune_allocator();
    let cfg = ModelConfig::default();
    let net = UNet::new(cfg.clone(), &Device::Cpu)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .fused()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let s = cfg.input_size;
    let x = Tensor::randn(0f32, 1.0, (1, 1, s, s), &Device::Cpu)?;
    net.forward(&x, false)?;
    let whole = median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                let _ = net.forward(&x, false);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
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
    let mut convs = 0.0;
    for (cin, cout, hw) in shapes {
        let sh = ConvShape {
            batch: 1,
            cin,
            cout,
            h: hw,
            w: hw,
        };
        let xi = vec![0.5f32; cin * hw * hw];
        let w = vec![0.1f32; cout * cin * 9];
        let b = vec![0.0f32; cout];
        conv3x3(&xi, &w, Some(&b), true, sh);
        let t = median(
            (0..11)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(conv3x3(&xi, &w, Some(&b), true, sh));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        );
        println!("conv {cin:>3} -> {cout:>3} @ {hw:>3}: {t:6.2} ms");
        convs += t;
    }
    println!("whole forward {whole:.2} ms; its convolutions alone {convs:.2} ms");
    Ok(())
}
