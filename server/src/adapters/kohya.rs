//! The kohya / A1111 LoRA layout most published Stable Diffusion LoRAs use:
//! `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`.
//! Read into this server's layout (`unet.<path>.lora_A.weight` / `lora_B.weight`); modules the
//! server does not adapt (the text encoder, feed-forward and convolution layers) are refused by
//! name rather than silently dropped.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::AdapterError;
use crate::model::LoraTarget;

/// Whether `tensors` are in the kohya layout.
pub(super) fn is_kohya(tensors: &HashMap<String, Tensor>) -> bool {
    tensors
        .keys()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
}

/// The same tensors under this server's keys, with the rank and the (single) alpha.
pub(super) fn to_server_layout(
    tensors: HashMap<String, Tensor>,
    targets: &[LoraTarget],
) -> Result<(HashMap<String, Tensor>, usize, f64), AdapterError> {
    let by_name: HashMap<String, &str> = targets
        .iter()
        .map(|t| {
            (
                format!("lora_unet_{}", t.path.replace('.', "_")),
                t.path.as_str(),
            )
        })
        .collect();
    let mut out = HashMap::new();
    let mut alphas: Vec<(String, f64)> = Vec::new();
    let mut rank = None;
    for (key, tensor) in tensors {
        let (module, part) = key.split_once('.').unwrap_or((key.as_str(), ""));
        if module.starts_with("lora_te") {
            return Err(AdapterError::Format(format!(
                "`{module}` adapts the text encoder; this server adapts only the UNet's \
                 attention projections (to_q, to_k, to_v, to_out.0)"
            )));
        }
        let Some(path) = by_name.get(module) else {
            return Err(AdapterError::Format(format!(
                "`{module}` is not an attention projection this server adapts (to_q, to_k, to_v, \
                 to_out.0 of this model's UNet)"
            )));
        };
        match part {
            "lora_down.weight" => {
                rank.get_or_insert(tensor.dims().first().copied().unwrap_or(0));
                out.insert(format!("unet.{path}.lora_A.weight"), tensor);
            }
            "lora_up.weight" => {
                out.insert(format!("unet.{path}.lora_B.weight"), tensor);
            }
            "alpha" => {
                let value = tensor
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .ok_or_else(|| AdapterError::Format(format!("`{key}` is empty")))?;
                alphas.push((module.to_string(), value));
            }
            other => {
                return Err(AdapterError::Format(format!(
                    "`{key}`: `{other}` is not part of a plain LoRA (lora_down, lora_up, alpha)"
                )));
            }
        }
    }
    let rank = rank.ok_or_else(|| AdapterError::Format("no lora_down tensors".into()))?;
    let alpha = match alphas.first() {
        None => rank as f64, // kohya's default: alpha = rank, scale 1
        Some((_, first)) => {
            if let Some((module, other)) = alphas.iter().find(|(_, a)| a != first) {
                return Err(AdapterError::Format(format!(
                    "`{module}` has alpha {other} where others have {first}: per-module alphas \
                     are not supported"
                )));
            }
            *first
        }
    };
    Ok((out, rank, alpha))
}
