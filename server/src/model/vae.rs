//! The VAE (`AutoencoderKL`, `vae/` of a diffusers pipeline): its decoder turns latents into
//! RGB images. The network itself is candle-transformers'; this wraps its config and the
//! latent scaling.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::{Deserialize, Serialize};

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
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
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
            use_quant_conv: true,
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
}

/// The decoder half of the VAE, with the latent scaling folded in.
#[derive(Debug)]
pub struct VaeDecoder {
    inner: AutoEncoderKL,
    config: VaeConfig,
}

impl VaeDecoder {
    /// Loads the whole autoencoder (the checkpoint holds both halves) and keeps the decoder.
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let kl = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let inner = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, kl)?;
        Ok(Self { inner, config: config.clone() })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes `[B, C, h, w]` latents into RGB images, `[B, h*f, w*f, 3]` bytes per image.
    pub fn decode_rgb8(&self, latents: &Tensor) -> Result<Vec<Vec<u8>>> {
        let scaled = (latents / self.config.scaling_factor)?;
        let images = self.inner.decode(&scaled)?.to_dtype(DType::F32)?;
        // [-1, 1] -> [0, 255], channels last.
        let bytes = ((images / 2.0)? + 0.5)?.clamp(0.0, 1.0)?.affine(255.0, 0.5)?.floor()?;
        let bytes = bytes.permute((0, 2, 3, 1))?.to_dtype(DType::U8)?;
        (0..bytes.dim(0)?).map(|i| bytes.get(i)?.flatten_all()?.to_vec1::<u8>()).collect()
    }
}
