//! Writing a Stable Diffusion pipeline in the diffusers layout: each component's config and
//! safetensors, the model index, and a byte-level BPE tokenizer over the built-in vocabulary.
//! Pretraining writes the built-in model with these; [`crate::tiny`] writes the test model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use crate::model::ModelError;
use crate::model::clip::ClipConfig;
use crate::model::tokenizer::{BOS, EOS, byte_alphabet};
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;

/// Words the tiny vocabulary learns whole (the procedural captions of the embedded model).
const WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "small",
    "large",
    "big",
    "tiny",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "pink",
    "brown",
    "circle",
    "square",
    "triangle",
    "on",
    "in",
    "of",
    "with",
    "and",
    "background",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "corner",
    "photo",
    "picture",
    "shape",
    "bright",
    "dark",
];

/// `unet/` of a diffusers pipeline.
pub(crate) fn write_unet(
    dir: &Path,
    config: &UNetConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    let mut json = serde_json::to_value(config).map_err(|e| config_err(dir, e))?;
    json["_class_name"] = json!("UNet2DConditionModel");
    write_component(dir, "unet", "diffusion_pytorch_model", &json, tensors)
}

/// `vae/` of a diffusers pipeline (`AutoencoderKL`, encoder and decoder weights).
pub(crate) fn write_vae(
    dir: &Path,
    config: &VaeConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    let levels = config.block_out_channels.len();
    let mut json = serde_json::to_value(config).map_err(|e| config_err(dir, e))?;
    json["_class_name"] = json!("AutoencoderKL");
    json["use_quant_conv"] = json!(true);
    json["down_block_types"] = json!(vec!["DownEncoderBlock2D"; levels]);
    json["up_block_types"] = json!(vec!["UpDecoderBlock2D"; levels]);
    write_component(dir, "vae", "diffusion_pytorch_model", &json, tensors)
}

/// `text_encoder/` of a diffusers pipeline (a transformers `CLIPTextModel`).
pub(crate) fn write_text_encoder(
    dir: &Path,
    config: &ClipConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    let mut json = serde_json::to_value(config).map_err(|e| config_err(dir, e))?;
    json["_class_name"] = json!("CLIPTextModel");
    json["architectures"] = json!(["CLIPTextModel"]);
    json["bos_token_id"] = json!(0);
    json["eos_token_id"] = json!(2);
    json["pad_token_id"] = json!(1);
    write_component(dir, "text_encoder", "model", &json, tensors)
}

/// `model_index.json` of a `StableDiffusionPipeline` without safety checker.
pub(crate) fn write_model_index(dir: &Path) -> Result<(), ModelError> {
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )
}

/// candle-transformers' `AutoEncoderKL` (encoder and decoder) on the same config.
pub fn full_autoencoder(
    config: &VaeConfig,
    vb: candle_nn::VarBuilder,
) -> candle_core::Result<candle_transformers::models::stable_diffusion::vae::AutoEncoderKL> {
    use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
    let kl = AutoEncoderKLConfig {
        block_out_channels: config.block_out_channels.clone(),
        layers_per_block: config.layers_per_block,
        latent_channels: config.latent_channels,
        norm_num_groups: config.norm_num_groups,
        use_quant_conv: true,
        use_post_quant_conv: config.use_post_quant_conv,
    };
    AutoEncoderKL::new(vb, config.in_channels, config.out_channels, kl)
}

pub(crate) fn config_err(dir: &Path, e: serde_json::Error) -> ModelError {
    ModelError::Config {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    }
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| config_err(path, e))?;
    std::fs::write(path, text + "\n").map_err(io)
}

pub(crate) fn write_component(
    dir: &Path,
    name: &str,
    stem: &str,
    config: &serde_json::Value,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(), ModelError> {
    write_json(&dir.join(name).join("config.json"), config)?;
    let path = dir.join(name).join(format!("{stem}.safetensors"));
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &path).map_err(|e| ModelError::Weights {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// A byte-level BPE vocabulary in CLIP's layout: the 256 byte characters, the same with `</w>`,
/// merges that spell out every word of [`WORDS`] left to right, then the two special tokens.
pub(crate) fn write_tokenizer(dir: &Path, vocab_size: usize) -> Result<(), ModelError> {
    let alphabet = byte_alphabet();
    let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    vocab.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut known: BTreeSet<String> = vocab.iter().cloned().collect();
    for word in WORDS {
        let chars: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut acc = chars[0].clone();
        for (i, c) in chars.iter().enumerate().skip(1) {
            let right = if i == chars.len() - 1 {
                format!("{c}</w>")
            } else {
                c.clone()
            };
            let merged = format!("{acc}{right}");
            if known.insert(merged.clone()) {
                merges.push((acc.clone(), right));
                vocab.push(merged.clone());
            }
            acc = merged;
        }
    }
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    if vocab.len() > vocab_size {
        return Err(ModelError::Config {
            path: dir.to_path_buf(),
            reason: format!(
                "tokenizer needs {} ids, the encoder has {vocab_size}",
                vocab.len()
            ),
        });
    }
    let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    write_json(
        &dir.join("vocab.json"),
        &serde_json::Value::Object(vocab_json),
    )?;
    let mut merges_text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_text.push_str(&format!("{a} {b}\n"));
    }
    let path = dir.join("merges.txt");
    std::fs::write(&path, merges_text).map_err(|source| ModelError::Io { path, source })?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS }),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({ "model_max_length": 77, "do_lower_case": true, "tokenizer_class": "CLIPTokenizer" }),
    )
}
