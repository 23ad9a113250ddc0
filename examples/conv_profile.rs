//! Times the fast 3x3 convolution kernels on the U-Net's top-level shape (forward, input
//! gradient, weight gradient): `cargo run --release --example conv_profile`.
use fluoropose::model::conv::{
    ConvShape, conv3x3, conv3x3_grad_input, conv3x3_grad_weight, conv3x3_grad_weight_gemm,
};
use std::time::Instant;

fn main() {
    // As the binary runs (see `tune_allocator`).
    fluoropose::tune_allocator();
    // The shapes, then the shipped network's (base 12) at the widths where the direct
    // kernels and the GEMMs trade places: batch 1 (a frame), 2 (mirror-averaged), 16 (training).
    // `FLUOROPOSE_NO_DIRECT_KERNELS=1` times the GEMMs alone.
    for &(batch, cin, cout, hw) in &[
        (1, 16, 16, 256),
        (1, 48, 16, 256),
        (1, 128, 256, 32),
        (1, 64, 128, 16),
        (4, 64, 128, 16),
        (4, 8, 8, 256),
        (4, 16, 8, 256),
        (4, 64, 64, 32),
        (1, 8, 8, 256),
        (4, 32, 32, 64),
        (4, 16, 16, 128),
        (4, 1, 8, 256),
        (1, 24, 24, 128),
        (1, 48, 48, 64),
        (2, 48, 48, 64),
        (16, 48, 48, 64),
        (1, 96, 96, 32),
        (2, 96, 96, 32),
        (16, 96, 96, 32),
    ] {
        let s = ConvShape {
            batch,
            cin,
            cout,
            h: hw,
            w: hw,
        };
        let x = vec![0.5f32; batch * cin * hw * hw];
        let w = vec![0.1f32; cout * cin * 9];
        let g = vec![0.2f32; batch * cout * hw * hw];
        let time = |f: &dyn Fn()| {
            f();
            let mut v: Vec<f64> = (0..9)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            v.sort_by(f64::total_cmp);
            v[4]
        };
        let fwd = time(&|| {
            std::hint::black_box(conv3x3(&x, &w, None, false, s));
        });
        let gi = time(&|| {
            std::hint::black_box(conv3x3_grad_input(&g, &w, s));
        });
        let gw = time(&|| {
            std::hint::black_box(conv3x3_grad_weight(&x, &g, s));
        });
        let gg = time(&|| {
            std::hint::black_box(conv3x3_grad_weight_gemm(&x, &g, s));
        });
        println!(
            "{s:?}: forward {fwd:.2} ms, grad input {gi:.2} ms, grad weight {gw:.2} ms (as GEMMs {gg:.2} ms)"
        );
    }
}
