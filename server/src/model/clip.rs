//! CLIP text encoder (`CLIPTextModel`, `text_encoder/` of a diffusers pipeline).
//! SD 1.x uses OpenAI CLIP ViT-L/14 (quick-gelu), SD 2.x OpenCLIP ViT-H (gelu); both read the
//! same config and keys, so one implementation serves both.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::nn::{LayerNorm, Linear, Mode, matmul, softmax_last_dim};

/// `text_encoder/config.json` (the fields this encoder reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states (the UNet's cross-attention width).
    pub hidden_size: usize,
    /// Width of the MLPs.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Sequence length (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x) or `gelu` (SD 2.x).
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
}

impl Default for ClipConfig {
    /// SD 1.5's ViT-L/14 text tower.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipConfig {
    /// diffusers' test text encoder: hidden 32, intermediate 37, 5 layers, 4 heads, vocab 1000.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 1000,
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 5,
            num_attention_heads: 4,
            ..Self::default()
        }
    }

    /// Checks sizes and the activation; the message names what to fix.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(format!(
                "hidden_act `{}` is not supported (quick_gelu, gelu)",
                self.hidden_act
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            norm1: LayerNorm::new(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            q: Linear::new(h, h, true, attn.pp("q_proj"))?,
            k: Linear::new(h, h, true, attn.pp("k_proj"))?,
            v: Linear::new(h, h, true, attn.pp("v_proj"))?,
            out: Linear::new(h, h, true, attn.pp("out_proj"))?,
            norm2: LayerNorm::new(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(h, c.intermediate_size, true, vb.pp("mlp.fc1"))?,
            fc2: Linear::new(c.intermediate_size, h, true, vb.pp("mlp.fc2"))?,
        })
    }
}

/// The text transformer; `forward` returns `last_hidden_state` (after the final layer norm),
/// which is what Stable Diffusion conditions on.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads from `vb` rooted at the checkpoint (keys `text_model.*`).
    pub fn new(config: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding = candle_nn::embedding(
            config.vocab_size,
            config.hidden_size,
            emb.pp("token_embedding"),
        )?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (config.max_position_embeddings, config.hidden_size),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(config, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::new(
            config.hidden_size,
            config.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_norm,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.config.hidden_act.as_str() {
            "gelu" => crate::model::nn::gelu_erf(x),
            _ => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }

    /// `ids`: `[B, S]` u32 token ids, `S <= max_position_embeddings`. Returns `[B, S, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with_mode(ids, Mode::Inference)
    }

    /// [`ClipTextModel::forward`]; in [`Mode::Training`] every operation has a backward pass
    /// (pretraining the encoder with the UNet).
    pub fn forward_with_mode(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            candle_core::bail!(
                "{s} tokens exceed the encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let dtype = self.position_embedding.dtype();
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.i(..s)?)?;
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / heads;
        let mask = causal_mask(s, ids.device())?.to_dtype(dtype)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        for layer in &self.layers {
            let h = layer.norm1.forward(&x, mode)?;
            let split = |t: Tensor| {
                t.reshape((b, s, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split((layer.q.forward(&h)? * scale)?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let scores = matmul(&q, &k.t()?)?.broadcast_add(&mask)?;
            let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?, mode)?.to_dtype(dtype)?;
            let attn =
                matmul(&probs, &v)?
                    .transpose(1, 2)?
                    .reshape((b, s, self.config.hidden_size))?;
            x = (layer.out.forward(&attn)? + x)?;
            let h = layer.norm2.forward(&x, mode)?;
            let h = layer
                .fc2
                .forward(&self.activation(&layer.fc1.forward(&h)?)?)?;
            x = (h + x)?;
        }
        self.final_norm.forward(&x, mode)
    }
}

/// `[S, S]` with `-inf` above the diagonal.
fn causal_mask(s: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (s, s), device)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::clip::text_model::{
        Activation, ClipTextConfig, ClipTextTransformer,
    };

    use super::*;
    use crate::model::nn::max_abs_diff;
    use crate::model::seeded::SeededWeights;

    /// Our encoder equals candle-transformers' CLIP text transformer (quick-gelu) on the same weights.
    #[test]
    fn encoder_matches_candle_transformers() {
        let weights = SeededWeights::new(5);
        let config = ClipConfig::tiny();
        let ours =
            ClipTextModel::new(&config, weights.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let reference_config = ClipTextConfig {
            vocab_size: config.vocab_size,
            embed_dim: config.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: config.intermediate_size,
            max_position_embeddings: config.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            projection_dim: config.hidden_size,
        };
        let vb = weights.var_builder(DType::F32, &Device::Cpu);
        let reference = ClipTextTransformer::new(vb.pp("text_model"), &reference_config).unwrap();
        let ids: Vec<u32> = (0..2 * 77).map(|i| (i * 37 % 1000) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 77), &Device::Cpu).unwrap();
        let want = reference.forward_with_mask(&ids, usize::MAX).unwrap();
        let got = ours.forward(&ids).unwrap();
        let diff: f32 = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "max difference {diff}");
    }
}
