//! A tiny Stable Diffusion pipeline built from code with deterministic random weights, written in
//! the diffusers layout so that tests exercise the real loading code. The sizes are diffusers'
//! own test configuration (`tests/pipelines/stable_diffusion/test_stable_diffusion.py`), so
//! timings compare directly with diffusers on the same shapes. A fixture for tests and benches
//! (`imagegen-server make-tiny-model DIR`), not a model to serve.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::json;

use crate::model::ModelError;
use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::seeded::SeededWeights;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{VaeConfig, VaeDecoder};
use crate::pipeline::save::{
    full_autoencoder, write_json, write_model_index, write_text_encoder, write_tokenizer,
    write_unet, write_vae,
};

/// Writes the tiny pipeline into `dir` (created if needed). The same `seed` writes the same bytes.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<(), ModelError> {
    write_random_model(
        dir,
        &UNetConfig::tiny(),
        &VaeConfig::tiny(),
        &ClipConfig::tiny(),
        seed,
    )
}

/// Writes a pipeline of Stable Diffusion 1.5's sizes with random weights (about 4.2 GB of f32
/// files): what the GPU check times without a model download.
pub fn write_sd15_size_model(dir: &Path, seed: u64) -> Result<(), ModelError> {
    write_random_model(
        dir,
        &UNetConfig::sd15(),
        &VaeConfig::default(),
        &ClipConfig::default(),
        seed,
    )
}

/// Writes a pipeline of the given sizes with deterministic random weights into `dir`.
pub fn write_random_model(
    dir: &Path,
    unet_config: &UNetConfig,
    vae_config: &VaeConfig,
    clip_config: &ClipConfig,
    seed: u64,
) -> Result<(), ModelError> {
    let device = Device::Cpu;
    let unet_weights = SeededWeights::new(seed);
    UNet2DConditionModel::new(unet_config, unet_weights.var_builder(DType::F32, &device))?;
    write_unet(dir, unet_config, unet_weights.tensors())?;
    drop(unet_weights);

    let vae_weights = SeededWeights::new(seed.wrapping_add(1));
    // The whole autoencoder (encoder too), so the folder is a complete diffusers checkpoint.
    full_autoencoder(vae_config, vae_weights.var_builder(DType::F32, &device))?;
    VaeDecoder::new(vae_config, vae_weights.var_builder(DType::F32, &device))?;
    write_vae(dir, vae_config, vae_weights.tensors())?;
    drop(vae_weights);

    let clip_weights = SeededWeights::new(seed.wrapping_add(2));
    ClipTextModel::new(clip_config, clip_weights.var_builder(DType::F32, &device))?;
    write_text_encoder(dir, clip_config, clip_weights.tensors())?;

    write_tokenizer(&dir.join("tokenizer"), clip_config.vocab_size)?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": false,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "prediction_type": "epsilon",
            "timestep_spacing": "leading"
        }),
    )?;
    write_model_index(dir)
}
