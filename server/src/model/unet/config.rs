//! `unet/config.json` of a diffusers `UNet2DConditionModel`
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py>).

use serde::{Deserialize, Serialize};

/// A value diffusers accepts either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    All(T),
    /// One value per down block (the up blocks use them reversed).
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for down block `i` (or the last one for the mid block).
    pub fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::All(v) => Some(*v),
            PerBlock::Each(vs) => vs.get(i).copied(),
        }
    }

    fn len_matches(&self, n: usize) -> bool {
        match self {
            PerBlock::All(_) => true,
            PerBlock::Each(vs) => vs.len() == n,
        }
    }
}

/// The fields of `UNet2DConditionModel`'s config this implementation reads. Unknown fields are
/// ignored; fields that would change the architecture in unsupported ways are rejected by
/// [`UNetConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Latent side length the model was trained at.
    pub sample_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// `DownBlock2D` or `CrossAttnDownBlock2D`, per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D`, per level (coarsest first).
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Epsilon of the resnets' group norms.
    pub norm_eps: f64,
    /// Width of the text conditioning.
    pub cross_attention_dim: usize,
    /// Legacy diffusers name for the number of heads (SD 1.x: 8; SD 2.x: [5, 10, 20, 20]).
    pub attention_head_dim: PerBlock<usize>,
    /// Number of heads, when given explicitly (takes precedence over `attention_head_dim`).
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Transformer blocks per attention.
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Linear instead of 1x1-conv projections in and out of the transformers (SD 2.x).
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 (SD 2.1); always done here for half precision.
    pub upcast_attention: bool,
    /// Sinusoid order of the timestep embedding.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    pub freq_shift: f64,
    /// Activation of the resnets (`silu`).
    pub act_fn: String,
    /// Class conditioning (unsupported unless absent).
    pub class_embed_type: Option<String>,
    /// Extra conditioning as in SDXL (unsupported unless absent).
    pub addition_embed_type: Option<String>,
    /// Scale of the mid block output (1.0).
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolutions (1).
    pub downsample_padding: usize,
}

impl Default for UNetConfig {
    /// Stable Diffusion 1.5.
    fn default() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::All(1),
            use_linear_projection: false,
            upcast_attention: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            act_fn: "silu".into(),
            class_embed_type: None,
            addition_embed_type: None,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
        }
    }
}

impl UNetConfig {
    /// Stable Diffusion 1.5's UNet.
    pub fn sd15() -> Self {
        Self::default()
    }

    /// Stable Diffusion 2.1's UNet (v-prediction comes from the scheduler config).
    pub fn sd21() -> Self {
        Self {
            sample_size: 96,
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// diffusers' own test UNet (`tests/pipelines/stable_diffusion`): 2 levels of 32 and 64
    /// channels, 2 layers per block, cross-attention width 32, 2 norm groups, 8 heads.
    pub fn tiny() -> Self {
        Self {
            sample_size: 32,
            down_block_types: ["DownBlock2D", "CrossAttnDownBlock2D"]
                .map(String::from)
                .to_vec(),
            up_block_types: ["CrossAttnUpBlock2D", "UpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![32, 64],
            layers_per_block: 2,
            norm_num_groups: 2,
            cross_attention_dim: 32,
            attention_head_dim: PerBlock::All(8),
            ..Self::default()
        }
    }

    /// Number of attention heads of down block `i`.
    pub fn heads(&self, i: usize) -> Option<usize> {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// How many times the latent is halved (a latent side must be a multiple of `2^this`).
    pub fn downsample_levels(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that this is an architecture the implementation supports; the message says what
    /// differs.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return Err(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return Err(format!("up block type `{t}` is not supported"));
            }
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        if self.class_embed_type.is_some() || self.addition_embed_type.is_some() {
            return Err(
                "class or addition embeddings (SDXL-style conditioning) are not supported".into(),
            );
        }
        if self.layers_per_block == 0 || self.norm_num_groups == 0 {
            return Err("layers_per_block and norm_num_groups must be positive".into());
        }
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        if !heads.len_matches(n) || !self.transformer_layers_per_block.len_matches(n) {
            return Err("per-block lists must have one entry per block".into());
        }
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if ch % self.norm_num_groups != 0 {
                return Err(format!(
                    "block {i}: {ch} channels not divisible by {} groups",
                    self.norm_num_groups
                ));
            }
            let h = self.heads(i).unwrap_or(0);
            if h == 0 || ch % h != 0 {
                return Err(format!(
                    "block {i}: {ch} channels not divisible into {h} heads"
                ));
            }
        }
        Ok(())
    }
}
