//! Runs the tiny UNet forward in a loop, for a profiler: `perf record cargo run --release --example profile_unet`.

use candle_core::{DType, Device, Tensor};
use imagegen_server::model::seeded::SeededWeights;
use imagegen_server::model::{AdapterBatch, Mode, UNet2DConditionModel, UNetConfig};

fn main() -> anyhow::Result<()> {
    let sd15 = std::env::args().any(|a| a == "sd15");
    let (config, side, reps) = if sd15 {
        (UNetConfig::sd15(), 64, 1)
    } else {
        (UNetConfig::tiny(), 32, 30)
    };
    let unet = UNet2DConditionModel::new(
        &config,
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    let x = Tensor::ones((2, 4, side, side), DType::F32, &Device::Cpu)?;
    let ctx = Tensor::ones(
        (2, 77, config.cross_attention_dim),
        DType::F32,
        &Device::Cpu,
    )?;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        unet.forward(
            &x,
            &[500.0, 500.0],
            &ctx,
            &AdapterBatch::BASE,
            Mode::Inference,
        )?;
    }
    println!(
        "{:.1} ms per forward",
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    Ok(())
}
