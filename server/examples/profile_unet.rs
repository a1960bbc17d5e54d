//! Runs UNet forwards in a loop, for a profiler:
//! `BATCH=8 REPS=20 perf record cargo run --release --example profile_unet [sd15]`.

use candle_core::{DType, Device, Tensor};
use imagegen_server::model::seeded::SeededWeights;
use imagegen_server::model::{AdapterBatch, Mode, UNet2DConditionModel, UNetConfig};

/// As in the server binary (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let sd15 = std::env::args().any(|a| a == "sd15");
    let (config, side, reps) = if sd15 {
        (UNetConfig::sd15(), 64, reps_from_env(1))
    } else {
        (UNetConfig::tiny(), 32, reps_from_env(20))
    };
    let batch: usize = std::env::var("BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let unet = UNet2DConditionModel::new(
        &config,
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    let x = Tensor::ones((batch, 4, side, side), DType::F32, &Device::Cpu)?;
    let ctx = Tensor::ones(
        (batch, 77, config.cross_attention_dim),
        DType::F32,
        &Device::Cpu,
    )?;
    let t = vec![500.0; batch];
    unet.forward(&x, &t, &ctx, &AdapterBatch::BASE, Mode::Inference)?;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        unet.forward(&x, &t, &ctx, &AdapterBatch::BASE, Mode::Inference)?;
    }
    let per = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!(
        "batch {batch}: {per:.1} ms per forward, {:.1} ms per row",
        per / batch as f64
    );
    Ok(())
}

/// Timed forwards after the warm-up one (`REPS`, default `default`).
fn reps_from_env(default: usize) -> usize {
    std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
