//! The model the server runs when no `--model` is given: a small text-to-image model of coloured
//! shapes that this project pretrains itself (`imagegen-server pretrain`, recipe in
//! `server/embedded/recipe.json`), compiled into the binary so that a fresh clone serves
//! recognizable images offline.
//!
//! The files are a complete diffusers pipeline; they are written to a temporary directory and
//! read back by the same loader as any `--model` directory.

mod evaluate;
pub mod pixel_vae;
pub mod pretrain;
mod recipe;

pub use evaluate::{EvalReport, evaluate, evaluate_with_eta, held_out_prompts};
pub use recipe::Recipe;

use candle_core::{DType, Device};

use crate::model::ModelError;
use crate::pipeline::DiffusionModel;

/// The built-in model's id.
pub const BUILTIN_ID: &str = "builtin-shapes";

/// The guidance scale the built-in model serves by default: its held-out prompt accuracy peaks
/// there (200 prompts, 20 steps: 69% at 1, 78% at 1.5, 82% at 2, 75% at 3, 70% at 5).
pub const GUIDANCE_SCALE: f32 = 2.0;

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
    use imagegen_shapes as shapes;

    /// The committed weights are the small model the issue allows, and they draw the shape and
    /// colour a prompt asks for far more often than chance (1 in 24): 82% on 200 held-out
    /// prompts when measured (12 of these 16); 9 of 16 by luck has a chance of 4e-9.
    #[test]
    fn the_builtin_model_loads_and_beats_chance() {
        let bytes: usize = FILES.iter().map(|(_, b)| b.len()).sum();
        assert!(bytes <= 25 << 20, "the embedded model is {bytes} bytes");
        let model = load(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.id, BUILTIN_ID);
        let prompts = super::held_out_prompts(77, 16, 64);
        let report =
            super::evaluate(&model, &prompts, 20, f64::from(GUIDANCE_SCALE), 77, 64).unwrap();
        eprintln!("built-in model: {report:?}");
        assert!(
            report.correct >= 9,
            "only {}/16 images have the shape and colour asked for: {report:?}",
            report.correct
        );
        assert!(shapes::parse_prompt(&prompts[0]).shape.is_some());
    }
}
