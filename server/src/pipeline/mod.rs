//! Loading a Stable Diffusion pipeline from a diffusers directory:
//!
//! ```text
//! model_index.json
//! scheduler/scheduler_config.json
//! text_encoder/{config.json, model.safetensors}
//! tokenizer/{vocab.json, merges.txt, special_tokens_map.json?}
//! unet/{config.json, diffusion_pytorch_model[.fp16].safetensors}
//! vae/{config.json, diffusion_pytorch_model[.fp16].safetensors}
//! ```
//!
//! Every failure names the file, and for weights the key.

mod generate;
pub mod save;

pub use generate::{
    AdapterChoice, BatchTimings, Generation, MAX_GUIDANCE_SCALE, MIN_ETA, RgbImage, SampleLimits,
    SampleRequest,
};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::sampler::SchedulerConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::model::clip::{ClipConfig, ClipTextModel};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{VaeConfig, VaeDecoder};
use crate::model::{DevicePlan, ModelError};

/// Every part of a text-to-image latent-diffusion pipeline.
#[derive(Debug)]
pub struct DiffusionModel {
    /// A stable name for the model (directory name, or `embedded-tiny`).
    pub id: String,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// Text encoder.
    pub text_encoder: ClipTextModel,
    /// Tokenizer matching the text encoder.
    pub tokenizer: ClipTokenizer,
    /// Latent decoder.
    pub vae: VaeDecoder,
    /// Noise schedule settings.
    pub scheduler: SchedulerConfig,
    /// Most rows per UNet call (`DevicePlan::micro_batch_rows`).
    pub micro_batch_rows: usize,
}

impl DiffusionModel {
    /// Loads the pipeline in `dir` with weights in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        if let Some(reason) = DevicePlan::unsupported_dtype(device, dtype) {
            return Err(ModelError::InvalidRequest {
                field: "dtype",
                reason: reason.into(),
            });
        }
        let index_path = dir.join("model_index.json");
        let index: serde_json::Value = read_json(&index_path)?;
        for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if index.get(component).is_none() {
                return Err(ModelError::Config {
                    path: index_path.clone(),
                    reason: format!(
                        "no `{component}` component: this is not a Stable Diffusion pipeline"
                    ),
                });
            }
        }
        let scheduler_path = dir.join("scheduler/scheduler_config.json");
        let scheduler_text = read_text(&scheduler_path)?;
        let scheduler =
            SchedulerConfig::from_json(&scheduler_text).map_err(|e| ModelError::Config {
                path: scheduler_path,
                reason: e.to_string(),
            })?;

        let unet_config: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        unet_config
            .validate()
            .map_err(|reason| ModelError::Config {
                path: dir.join("unet/config.json"),
                reason,
            })?;
        let unet_file = weight_file(&dir.join("unet"), "diffusion_pytorch_model", dtype)?;
        let unet = with_weights(&unet_file, dtype, device, |vb| {
            UNet2DConditionModel::new(&unet_config, vb)
        })?;

        let clip_config: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
        clip_config
            .validate()
            .map_err(|reason| ModelError::Config {
                path: dir.join("text_encoder/config.json"),
                reason,
            })?;
        if clip_config.hidden_size != unet_config.cross_attention_dim {
            return Err(ModelError::Config {
                path: dir.join("text_encoder/config.json"),
                reason: format!(
                    "hidden_size {} differs from the UNet's cross_attention_dim {}",
                    clip_config.hidden_size, unet_config.cross_attention_dim
                ),
            });
        }
        let clip_file = weight_file(&dir.join("text_encoder"), "model", dtype)?;
        let text_encoder = with_weights(&clip_file, dtype, device, |vb| {
            ClipTextModel::new(&clip_config, vb)
        })?;
        let tokenizer =
            ClipTokenizer::from_dir(&dir.join("tokenizer"), clip_config.max_position_embeddings)?;

        let vae_config: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let vae_file = weight_file(&dir.join("vae"), "diffusion_pytorch_model", dtype)?;
        let vae = with_weights(&vae_file, dtype, device, |vb| {
            VaeDecoder::new(&vae_config, vb)
        })?;
        if vae_config.latent_channels != unet_config.in_channels {
            return Err(ModelError::Config {
                path: dir.join("vae/config.json"),
                reason: format!(
                    "latent_channels {} differs from the UNet's in_channels {}",
                    vae_config.latent_channels, unet_config.in_channels
                ),
            });
        }
        let id = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        let micro_batch_rows = DevicePlan::for_device(device).micro_batch_rows;
        Ok(Self {
            id,
            unet,
            text_encoder,
            tokenizer,
            vae,
            scheduler,
            micro_batch_rows,
        })
    }

    /// Image pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Prompt embeddings `[1, S, D]` for one text.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor, ModelError> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::from_vec(
            tokens.ids,
            (1, self.tokenizer.max_len()),
            self.unet.device(),
        )?;
        Ok(self.text_encoder.forward(&ids)?)
    }
}

fn read_text(path: &Path) -> Result<String, ModelError> {
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `stem.safetensors`, or its `.fp16` variant: preferred for half-precision loads, used for any
/// dtype when it is the only one present (converted on load).
fn weight_file(dir: &Path, stem: &str, dtype: DType) -> Result<PathBuf, ModelError> {
    let full = dir.join(format!("{stem}.safetensors"));
    let half = dir.join(format!("{stem}.fp16.safetensors"));
    let prefer_half = matches!(dtype, DType::F16 | DType::BF16);
    let order = if prefer_half {
        [&half, &full]
    } else {
        [&full, &half]
    };
    order
        .into_iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| ModelError::MissingFile { path: full.clone() })
}

/// Reads a safetensors file and builds a component from it; a missing key or a shape mismatch
/// becomes an error naming the file and the key.
fn with_weights<T>(
    path: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    let weights_err = |e: candle_core::Error| ModelError::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(weights_err)?;
    // Convert per tensor on the CPU first so a half-precision file never doubles GPU memory.
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(device)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()
        .map_err(weights_err)?;
    build(VarBuilder::from_tensors(tensors, dtype, device)).map_err(weights_err)
}
