//! Times every 3x3 convolution of a shipped network (depth 5, 256² input; base width B: 12 the
//! default network, 8 the compact one) at batch N with bias and ReLU, as the fused inference
//! network runs them, and their sum: `cargo run --release --example forward_layers [N [B]]`.
//! Medians of 21. Compare the formulations with `FLUOROPOSE_NO_WINOGRAD=1`,
//! `FLUOROPOSE_WINOGRAD_MIN_CIN=C`, `FLUOROPOSE_NO_POLYPHASE=1` and
//! `FLUOROPOSE_NO_DIRECT_KERNELS=1`. The decoder's first convolutions run as the fused network
//! runs them: over the level below upsampled and concatenated with the skip. Each is timed
//! twice, interleaved: as the fused network runs it (weight layouts kept from the first frame)
//! and with its weights laid out within the call (`conv3x3`, or a fresh kernel).
use candle_core::{Device, Tensor};
use fluoropose::model::conv::{ConvShape, HostConv, HostKernel, UpCatConv, conv3x3};
use std::time::Instant;

fn main() {
    // As the binary runs (see `tune_allocator`).
    fluoropose::tune_allocator();
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let base: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(12);
    let widths: Vec<usize> = (0..5).map(|i| base << i).collect();
    // (input channels, output channels, size): the encoder, then the decoder from the bottom,
    // whose first convolution takes the upsampled level below and the skip.
    // The last field: the channels of the upsampled level below (0: a plain convolution).
    let mut shapes = Vec::new();
    for (i, &c) in widths.iter().enumerate() {
        let size = 256 >> i;
        let cin = if i == 0 { 1 } else { widths[i - 1] };
        shapes.push((cin, c, size, 0));
        shapes.push((c, c, size, 0));
    }
    for j in (0..widths.len() - 1).rev() {
        let size = 256 >> j;
        shapes.push((widths[j + 1] + widths[j], widths[j], size, widths[j + 1]));
        shapes.push((widths[j], widths[j], size, 0));
    }
    // A first pass untimed: the allocator's first large buffers are fresh pages from the
    // system, whose faults made the first convolutions look 2-3x slower than they run in a
    // network that has already run a frame (12 -> 12 at 256²: 4.6-5.2 ms, then 1.3-1.9 ms).
    let (mut total_ms, mut total_per_call, mut total_gflop) = (0.0, 0.0, 0.0);
    for (pass, &(cin, cout, size, low)) in shapes
        .iter()
        .map(|s| (0, s))
        .chain(shapes.iter().map(|s| (1, s)))
    {
        let s = ConvShape {
            batch,
            cin,
            cout,
            h: size,
            w: size,
        };
        let x: Vec<f32> = (0..batch * cin * size * size)
            .map(|i| (i % 17) as f32 / 17.0 - 0.3)
            .collect();
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i % 13) as f32 / 13.0 - 0.5) / cin as f32)
            .collect();
        let bias = vec![0.1f32; cout];
        let upcat = (low > 0).then(|| {
            let dev = Device::Cpu;
            let (skip, half) = (cin - low, size / 2);
            let t = |c: usize, n: usize| {
                let v: Vec<f32> = (0..batch * c * n * n)
                    .map(|i| (i % 17) as f32 / 17.0 - 0.3)
                    .collect();
                Tensor::from_vec(v, (batch, c, n, n), &dev).expect("sizes match")
            };
            let op = UpCatConv(std::sync::Arc::new(HostKernel::new(
                w.clone(),
                bias.clone(),
                true,
            )));
            (t(low, half), t(skip, size), op)
        });
        // The fused network's op, whose weight layouts are made once and kept; and the plain
        // function, which lays them out on every call (the difference is that cost).
        let kept = HostConv(std::sync::Arc::new(HostKernel::new(
            w.clone(),
            bias.clone(),
            true,
        )));
        let xt = Tensor::from_vec(x.clone(), (batch, cin, size, size), &Device::Cpu)
            .expect("sizes match");
        let run = |per_call: bool| match &upcat {
            Some((low, skip, _)) if per_call => {
                // A kernel of its own: its split and layouts are made within the call.
                let op = UpCatConv(std::sync::Arc::new(HostKernel::new(
                    w.clone(),
                    bias.clone(),
                    true,
                )));
                std::hint::black_box(low.apply_op2_no_bwd(skip, &op).expect("shapes fit"));
            }
            Some((low, skip, op)) => {
                std::hint::black_box(low.apply_op2_no_bwd(skip, op).expect("shapes fit"));
            }
            None if per_call => {
                std::hint::black_box(conv3x3(&x, &w, Some(&bias), true, s));
            }
            None => {
                std::hint::black_box(xt.apply_op1_no_bwd(&kept).expect("shapes fit"));
            }
        };
        run(false);
        if pass == 0 {
            continue;
        }
        let (mut v, mut u): (Vec<f64>, Vec<f64>) = (0..21)
            .map(|_| {
                let time = |per_call| {
                    let t = Instant::now();
                    run(per_call);
                    t.elapsed().as_secs_f64() * 1e3
                };
                (time(false), time(true))
            })
            .unzip();
        v.sort_by(f64::total_cmp);
        u.sort_by(f64::total_cmp);
        let (ms, ms_per_call) = (v[10], u[10]);
        let gflop = 2.0 * (batch * cin * cout * 9 * size * size) as f64 / 1e9;
        total_ms += ms;
        total_per_call += ms_per_call;
        total_gflop += gflop;
        let what = if low > 0 { " (upsampled + skip)" } else { "" };
        println!(
            "{cin:>4} -> {cout:<4} {size:>3}²: {ms:6.2} ms, {:5.1} GFLOP/s; laid out per call {ms_per_call:6.2} ms{what}",
            gflop / ms * 1e3
        );
    }
    println!(
        "all {} convolutions: {total_ms:.1} ms, {:.1} GFLOP/s; with their weights laid out per call {total_per_call:.1} ms",
        shapes.len(),
        total_gflop / total_ms * 1e3
    );
}
