//! One group's chains as bytes: a safetensors file (the tensors, exact, in their own dtypes)
//! whose header metadata carries the rest as JSON. Latents stay f32, so recomputed log-probs
//! after a restart are exactly the recorded ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::sampler::{Conditioning, Trajectory};

const FORMAT: &str = "imagegen.group.v1";

/// Everything about one image but its tensors.
#[derive(Debug, Serialize, Deserialize)]
struct ImageHeader {
    image_id: String,
    timesteps: Vec<usize>,
    log_probs: Vec<f32>,
    guidance_scale: f64,
    eta: f64,
    seed: u64,
    image_index: usize,
    model_id: String,
    adapter_generation: Option<String>,
    /// Which conditioning (`c{n}.*` tensors) it was sampled under.
    conditioning: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConditioningHeader {
    prompt: String,
    negative_prompt: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupHeader {
    format: String,
    group_id: String,
    created_at_ms: u64,
    conditionings: Vec<ConditioningHeader>,
    images: Vec<ImageHeader>,
}

/// A group read back.
#[derive(Debug)]
pub(crate) struct DecodedGroup {
    pub group_id: String,
    pub created_at: SystemTime,
    pub images: Vec<(String, Arc<Trajectory>)>,
}

/// Encodes a group's chains (tensors copied to the CPU).
pub(crate) fn encode_group(
    group_id: &str,
    created_at: SystemTime,
    images: &[(String, Arc<Trajectory>)],
) -> Result<Vec<u8>, StoreError> {
    let fail =
        |e: candle_core::Error| StoreError::Broken(format!("encoding group {group_id}: {e}"));
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut conditionings: Vec<(&Conditioning, ConditioningHeader)> = Vec::new();
    let mut headers = Vec::with_capacity(images.len());
    for (n, (image_id, t)) in images.iter().enumerate() {
        // Images of one request share their conditioning: store it once.
        let shared = conditionings.iter().position(|(c, _)| {
            Arc::ptr_eq(&c.prompt_embeddings, &t.conditioning.prompt_embeddings)
                && Arc::ptr_eq(&c.negative_embeddings, &t.conditioning.negative_embeddings)
        });
        let conditioning = match shared {
            Some(k) => k,
            None => {
                let k = conditionings.len();
                let cpu = |e: &Tensor| e.to_device(&Device::Cpu).map_err(fail);
                tensors.insert(
                    format!("c{k}.prompt"),
                    cpu(&t.conditioning.prompt_embeddings)?,
                );
                tensors.insert(
                    format!("c{k}.negative"),
                    cpu(&t.conditioning.negative_embeddings)?,
                );
                conditionings.push((
                    &t.conditioning,
                    ConditioningHeader {
                        prompt: t.conditioning.prompt.clone(),
                        negative_prompt: t.conditioning.negative_prompt.clone(),
                    },
                ));
                k
            }
        };
        tensors.insert(
            format!("i{n}.latents"),
            t.latents.to_device(&Device::Cpu).map_err(fail)?,
        );
        headers.push(ImageHeader {
            image_id: image_id.clone(),
            timesteps: t.timesteps.clone(),
            log_probs: t.log_probs.clone(),
            guidance_scale: t.guidance_scale,
            eta: t.eta,
            seed: t.seed,
            image_index: t.image_index,
            model_id: t.model_id.clone(),
            adapter_generation: t.adapter_generation.clone(),
            conditioning,
        });
    }
    let header = GroupHeader {
        format: FORMAT.into(),
        group_id: group_id.into(),
        created_at_ms: created_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        conditionings: conditionings.into_iter().map(|(_, h)| h).collect(),
        images: headers,
    };
    let json = serde_json::to_string(&header)
        .map_err(|e| StoreError::Broken(format!("encoding group {group_id}: {e}")))?;
    let metadata = HashMap::from([("group".to_string(), json)]);
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
        .map_err(|e| StoreError::Broken(format!("encoding group {group_id}: {e}")))
}

/// Decodes a group; embeddings go to `device` (where the model reads them), latents stay on
/// the CPU. Errors say what is damaged.
pub(crate) fn decode_group(bytes: &[u8], device: &Device) -> Result<DecodedGroup, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("group"))
        .ok_or("no `group` header")?;
    let header: GroupHeader = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if header.format != FORMAT {
        return Err(format!("unknown format `{}`", header.format));
    }
    let mut tensors =
        candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    let mut take = |key: &str| tensors.remove(key).ok_or(format!("no tensor `{key}`"));
    let mut conditionings = Vec::with_capacity(header.conditionings.len());
    for (k, c) in header.conditionings.into_iter().enumerate() {
        let on_device = |t: Tensor| t.to_device(device).map(Arc::new).map_err(|e| e.to_string());
        conditionings.push(Conditioning {
            prompt: c.prompt,
            negative_prompt: c.negative_prompt,
            prompt_embeddings: on_device(take(&format!("c{k}.prompt"))?)?,
            negative_embeddings: on_device(take(&format!("c{k}.negative"))?)?,
        });
    }
    let mut images = Vec::with_capacity(header.images.len());
    for (n, i) in header.images.into_iter().enumerate() {
        let latents = take(&format!("i{n}.latents"))?;
        let conditioning = conditionings
            .get(i.conditioning)
            .cloned()
            .ok_or(format!("image {n} names conditioning {}", i.conditioning))?;
        if i.timesteps.len() != i.log_probs.len()
            || latents.dim(0).ok() != Some(i.timesteps.len() + 1)
        {
            return Err(format!("image {n}: steps, log-probs and latents disagree"));
        }
        images.push((
            i.image_id,
            Arc::new(Trajectory {
                latents,
                timesteps: i.timesteps,
                log_probs: i.log_probs,
                conditioning,
                guidance_scale: i.guidance_scale,
                eta: i.eta,
                seed: i.seed,
                image_index: i.image_index,
                model_id: i.model_id,
                adapter_generation: i.adapter_generation,
            }),
        ));
    }
    Ok(DecodedGroup {
        group_id: header.group_id,
        created_at: UNIX_EPOCH + Duration::from_millis(header.created_at_ms),
        images,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    fn chain(image_index: usize, conditioning: &Conditioning) -> Arc<Trajectory> {
        let latents = Tensor::arange(0f32, 3.0 * 4.0 * 2.0 * 2.0, &Device::Cpu)
            .and_then(|t| t.reshape((3, 4, 2, 2)))
            .and_then(|t| t.affine(0.1, image_index as f64))
            .unwrap();
        Arc::new(Trajectory {
            latents,
            timesteps: vec![999, 499],
            log_probs: vec![-1.25, 0.1 + image_index as f32],
            conditioning: conditioning.clone(),
            guidance_scale: 2.0,
            eta: 1.0,
            seed: 42,
            image_index,
            model_id: "tiny".into(),
            adapter_generation: Some("abc".into()),
        })
    }

    /// Bytes in, the same chains out: tensors bit for bit, conditioning shared once.
    #[test]
    fn a_group_round_trips_exactly() {
        let emb = |v: f32| Arc::new(Tensor::full(v, (1, 3, 2), &Device::Cpu).unwrap());
        let conditioning = Conditioning {
            prompt: "a red circle".into(),
            negative_prompt: String::new(),
            prompt_embeddings: emb(0.5),
            negative_embeddings: emb(-0.5).to_dtype(DType::F16).map(Arc::new).unwrap(),
        };
        let images = vec![
            ("a".to_string(), chain(0, &conditioning)),
            ("b".to_string(), chain(1, &conditioning)),
        ];
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let bytes = encode_group("g", at, &images).unwrap();
        let back = decode_group(&bytes, &Device::Cpu).unwrap();
        assert_eq!(back.group_id, "g");
        assert_eq!(back.created_at, at);
        assert_eq!(back.images.len(), 2);
        for ((id, t), (id2, u)) in images.iter().zip(&back.images) {
            assert_eq!(id, id2);
            let diff = (&t.latents - &u.latents)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .unwrap();
            assert_eq!(diff, 0.0);
            assert_eq!(t.log_probs, u.log_probs);
            assert_eq!(t.timesteps, u.timesteps);
            assert_eq!(t.adapter_generation, u.adapter_generation);
            assert_eq!(u.conditioning.negative_embeddings.dtype(), DType::F16);
        }
        assert!(Arc::ptr_eq(
            &back.images[0].1.conditioning.prompt_embeddings,
            &back.images[1].1.conditioning.prompt_embeddings
        ));
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let emb = Arc::new(Tensor::zeros((1, 1, 1), DType::F32, &Device::Cpu).unwrap());
        let conditioning = Conditioning {
            prompt: String::new(),
            negative_prompt: String::new(),
            prompt_embeddings: emb.clone(),
            negative_embeddings: emb,
        };
        let bytes =
            encode_group("g", UNIX_EPOCH, &[("a".into(), chain(0, &conditioning))]).unwrap();
        for cut in [0, 7, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode_group(&bytes[..cut], &Device::Cpu).is_err(),
                "cut at {cut}"
            );
        }
    }
}
