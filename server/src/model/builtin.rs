//! The model the server runs when no `--model` is given: a small text-to-image model of coloured
//! shapes that this project pretrains itself (`imagegen-server pretrain`, recipe in
//! `server/embedded/recipe.json`), compiled into the binary so that a fresh clone serves
//! recognizable images offline.
//!
//! The files are a complete diffusers pipeline; they are written to a temporary directory and
//! read back by the same loader as any `--model` directory.

use candle_core::{DType, Device};

use super::loader::DiffusionModel;
use crate::error::ModelError;

/// The built-in model's id.
pub const BUILTIN_ID: &str = "builtin-shapes";

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/embedded/model/", $path)))),*]
    };
}

/// Every file of the pipeline, by path inside the model directory.
pub const FILES: &[(&str, &[u8])] = embedded!(
    "model_index.json",
    "progress.json",
    "recipe.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// Writes the built-in pipeline into `dir` (created if needed).
pub fn write_to(dir: &std::path::Path) -> Result<(), ModelError> {
    for (path, bytes) in FILES {
        let target = dir.join(path);
        let io = |source| ModelError::Io {
            path: target.clone(),
            source,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&target, bytes).map_err(io)?;
    }
    Ok(())
}

/// Loads the built-in model.
pub fn load(dtype: DType, device: &Device) -> Result<DiffusionModel, ModelError> {
    let dir = std::env::temp_dir().join(format!(
        "imagegen-builtin-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let loaded = write_to(&dir).and_then(|()| DiffusionModel::load(&dir, dtype, device));
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove the built-in model's temporary files");
    }
    let mut model = loaded?;
    model.id = BUILTIN_ID.into();
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes;

    /// The committed weights are the small model the issue allows, and they draw the colour a
    /// prompt asks for far more often than chance (1 in 8): 71% on 48 held-out prompts when
    /// measured; 6 of 16 has a 0.3% chance of happening by luck.
    #[test]
    fn the_builtin_model_loads_and_beats_chance() {
        let bytes: usize = FILES.iter().map(|(_, b)| b.len()).sum();
        assert!(bytes <= 25 << 20, "the embedded model is {bytes} bytes");
        let model = load(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.id, BUILTIN_ID);
        let prompts = crate::pretrain::held_out_prompts(77, 16, 64);
        let report = crate::pretrain::evaluate(&model, &prompts, 20, 5.0, 77, 64).unwrap();
        eprintln!("built-in model: {report:?}");
        assert!(
            report.colour_correct >= 6,
            "only {}/16 images have the colour asked for: {report:?}",
            report.colour_correct
        );
        assert!(shapes::parse_prompt(&prompts[0]).shape.is_some());
    }
}
