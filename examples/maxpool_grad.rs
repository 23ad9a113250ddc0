//! Shows candle 0.11's `max_pool2d` gradient, which `model::resample` replaces: a unique
//! maximum gets a quarter of the gradient (expected: all of it), and a window of four equal
//! values passes four times the gradient on (expected: once in total).
//! `cargo run --release --example maxpool_grad`
use candle_core::{Device, Tensor, Var};
use fluoropose::model::resample::max_pool2;

fn main() -> candle_core::Result<()> {
    // As the binary runs (see `tune_allocator`).
    fluoropose::tune_allocator();
    let x = Tensor::new(
        &[[[[1f32, 2.], [3., 4.]]], [[[0f32, 0.], [0., 0.]]]],
        &Device::Cpu,
    )?;
    let x = Var::from_tensor(&x)?;
    let candle = x.as_tensor().max_pool2d(2)?.sum_all()?.backward()?;
    let ours = max_pool2(x.as_tensor())?.sum_all()?.backward()?;
    println!(
        "d sum(max_pool2d(x)) / dx, candle:\n{}",
        candle.get(&x).expect("gradient")
    );
    println!(
        "fluoropose (PyTorch's rule):\n{}",
        ours.get(&x).expect("gradient")
    );
    Ok(())
}
