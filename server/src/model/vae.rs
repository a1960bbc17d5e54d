//! The VAE decoder (`AutoencoderKL.decoder` and `post_quant_conv`, `vae/` of a diffusers
//! pipeline): latents to RGB images, channels-last with the UNet's fast convolutions.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::nn::{Conv2d, GroupNorm, Linear, Mode, attention, upsample_nearest_2x};
use super::unet::blocks::ResnetBlock;

/// `vae/config.json` (the fields the decoder reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Channels per level; the latent is `2^(levels - 1)` times smaller than the image.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Image side the VAE was trained at.
    pub sample_size: usize,
}

impl Default for VaeConfig {
    /// Stable Diffusion 1.x / 2.x.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_post_quant_conv: true,
            sample_size: 512,
        }
    }
}

impl VaeConfig {
    /// diffusers' test VAE: 32 and 64 channels, 1 layer per block, 2 norm groups.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            norm_num_groups: 2,
            sample_size: 64,
            ..Self::default()
        }
    }

    /// Image pixels per latent cell along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks the sizes; the message says what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() || self.layers_per_block == 0 {
            return Err(
                "block_out_channels and layers_per_block must be non-empty / positive".into(),
            );
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "{c} channels are not divisible into {} norm groups",
                self.norm_num_groups
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!(
                "scaling_factor must be positive, got {}",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}

/// The mid block's single-head self-attention over all pixels.
#[derive(Debug, Clone)]
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 use the legacy names.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| Linear::new(ch, ch, true, vb.pp(name));
        Ok(Self {
            norm: GroupNorm::new(groups, ch, 1e-6, vb.pp("group_norm"))?,
            q: linear(names[0])?,
            k: linear(names[1])?,
            v: linear(names[2])?,
            out: linear(names[3])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((b, h * w, c))?;
        let q = self.q.forward(&tokens)?;
        let k = self.k.forward(&tokens)?;
        let v = self.v.forward(&tokens)?;
        let scale = 1.0 / (c as f64).sqrt();
        self.out
            .forward(&attention(&q, &k, &v, 1, scale, Mode::Inference)?)?
            .reshape((b, h, w, c))?
            + x
    }
}

#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

/// The decoder half of the VAE, with the latent scaling folded in.
#[derive(Debug)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_first: ResnetBlock,
    mid_attention: SpatialAttention,
    mid_second: ResnetBlock,
    up: Vec<UpDecoderBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads the decoder from `vb` rooted at the VAE checkpoint (the encoder's keys are unused).
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let ch = &config.block_out_channels;
        let (groups, lat) = (config.norm_num_groups, config.latent_channels);
        let top = ch[ch.len() - 1];
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(lat, lat, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let resnet =
            |i: usize, o: usize, vb: VarBuilder| ResnetBlock::new(i, o, 0, groups, 1e-6, vb);
        let mut up = Vec::with_capacity(ch.len());
        let mut prev = top;
        for (i, &out) in ch.iter().rev().enumerate() {
            let vb = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    resnet(
                        if j == 0 { prev } else { out },
                        out,
                        vb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < ch.len() {
                Some(Conv2d::new(out, out, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up.push(UpDecoderBlock { resnets, upsample });
            prev = out;
        }
        Ok(Self {
            config: config.clone(),
            post_quant_conv,
            conv_in: Conv2d::new(lat, top, 3, 1, 1, dec.pp("conv_in"))?,
            mid_first: resnet(top, top, dec.pp("mid_block.resnets.0"))?,
            mid_attention: SpatialAttention::new(top, groups, dec.pp("mid_block.attentions.0"))?,
            mid_second: resnet(top, top, dec.pp("mid_block.resnets.1"))?,
            up,
            norm_out: GroupNorm::new(groups, ch[0], 1e-6, dec.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(ch[0], config.out_channels, 3, 1, 1, dec.pp("conv_out"))?,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes `[B, C, h, w]` latents into images `[B, h*f, w*f, 3]` in [-1, 1], channels last.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.config.scaling_factor)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        let mut h = self.conv_in.forward(&z)?;
        h = self.mid_first.forward_with(&h, None)?;
        h = self.mid_attention.forward(&h)?;
        h = self.mid_second.forward_with(&h, None)?;
        for block in &self.up {
            for resnet in &block.resnets {
                h = resnet.forward_with(&h, None)?;
            }
            if let Some(conv) = &block.upsample {
                h = conv.forward(&upsample_nearest_2x(&h)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }

    /// Decodes latents into RGB images, `h*f * w*f * 3` bytes per image.
    pub fn decode_rgb8(&self, latents: &Tensor) -> Result<Vec<Vec<u8>>> {
        let chunk = super::DevicePlan::for_device(latents.device())
            .vae_decode_images
            .min(latents.dim(0)?)
            .max(1);
        let mut out = Vec::with_capacity(latents.dim(0)?);
        for start in (0..latents.dim(0)?).step_by(chunk) {
            let part = latents.narrow(0, start, chunk.min(latents.dim(0)? - start))?;
            let images = self.decode(&part)?.to_dtype(DType::F32)?;
            // [-1, 1] -> [0, 255], rounded.
            let bytes = ((images / 2.0)? + 0.5)?
                .clamp(0.0, 1.0)?
                .affine(255.0, 0.5)?
                .floor()?
                .to_dtype(DType::U8)?;
            for i in 0..bytes.dim(0)? {
                out.push(bytes.get(i)?.flatten_all()?.to_vec1::<u8>()?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::model::nn::max_abs_diff;
    use crate::model::seeded::SeededWeights;
    use crate::pipeline::save::full_autoencoder;

    /// Our channels-last decoder equals candle-transformers' NCHW `AutoEncoderKL::decode`.
    #[test]
    fn decoder_matches_candle_transformers() {
        let weights = SeededWeights::new(11);
        let config = VaeConfig::tiny();
        let reference =
            full_autoencoder(&config, weights.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let ours = VaeDecoder::new(&config, weights.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let v: Vec<f32> = (0..2 * 4 * 8 * 6)
            .map(|i| (i as f32 * 0.21).cos())
            .collect();
        let latents = Tensor::from_vec(v, (2, 4, 8, 6), &Device::Cpu).unwrap();
        let want = reference
            .decode(&(&latents / config.scaling_factor).unwrap())
            .unwrap();
        let got = ours
            .decode(&latents)
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        assert_eq!(got.dims(), &[2, 3, 16, 12]);
        let diff: f32 = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "max difference {diff}");
    }
}
