//! `UNet2DConditionModel` (Stable Diffusion 1.x and 2.x) with unmerged LoRA on every attention
//! projection and a differentiable training mode. Parameter names are diffusers' keys.

mod attention;
pub(crate) mod blocks;
mod checkpoint;
mod config;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::{PerBlock, UNetConfig};

use crate::model::lora::{AdapterBatch, LoraTarget};
use crate::model::nn::{Conv2d, GroupNorm, Linear, Mode, silu};
use attention::TransformerSpec;
use blocks::{BlockSpec, CrossAttn, DownBlock, MidBlock, UpBlock, UpChannels};

/// Per-forward settings threaded through every layer.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub(crate) mode: Mode,
    pub(crate) adapters: &'a AdapterBatch<'a>,
    /// Whether resnets and transformers recompute their intermediates in the backward instead
    /// of keeping them (`checkpoint`).
    pub(crate) checkpoint: bool,
}

/// The denoising UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    targets: Vec<LoraTarget>,
    dtype: DType,
    device: Device,
}

impl UNet2DConditionModel {
    /// Builds the UNet from weights under `vb` (diffusers keys, e.g. `down_blocks.0.resnets.0.conv1.weight`).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let spec = BlockSpec {
            temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            transformer: TransformerSpec {
                context_dim: config.cross_attention_dim,
                groups: config.norm_num_groups,
                linear_projection: config.use_linear_projection,
            },
        };
        let attn_for = |i: usize, kind: &str| -> Option<CrossAttn> {
            kind.starts_with("CrossAttn").then(|| CrossAttn {
                heads: config.heads(i).unwrap_or(1),
                depth: config.transformer_layers_per_block.get(i).unwrap_or(1),
            })
        };
        let mut targets = Vec::new();
        let conv_in = Conv2d::new(config.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = Linear::new(ch[0], temb, true, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = Linear::new(temb, temb, true, vb.pp("time_embedding.linear_2"))?;

        let mut down = Vec::with_capacity(n);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let downsample = (i + 1 < n).then_some(config.downsample_padding);
            down.push(DownBlock::new(
                in_ch,
                ch[i],
                config.layers_per_block,
                attn_for(i, kind),
                downsample,
                spec,
                vb.pp(format!("down_blocks.{i}")),
                &mut targets,
            )?);
        }
        let mid_attn = CrossAttn {
            heads: config.heads(n - 1).unwrap_or(1),
            depth: config.transformer_layers_per_block.get(n - 1).unwrap_or(1),
        };
        let mid = MidBlock::new(ch[n - 1], mid_attn, spec, vb.pp("mid_block"), &mut targets)?;

        let mut up = Vec::with_capacity(n);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let level = n - 1 - i; // the down level this up block mirrors
            let channels = UpChannels {
                input: ch[level.saturating_sub(1)],
                output: ch[level],
                prev_output: ch[(level + 1).min(n - 1)],
            };
            up.push(UpBlock::new(
                channels,
                config.layers_per_block + 1,
                attn_for(level, kind),
                i + 1 < n,
                spec,
                vb.pp(format!("up_blocks.{i}")),
                &mut targets,
            )?);
        }
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(
                config.norm_num_groups,
                ch[0],
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: Conv2d::new(ch[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            targets,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every projection an adapter can target, in slot order.
    pub fn lora_targets(&self) -> &[LoraTarget] {
        &self.targets
    }

    /// The dtype of the weights (and of activations).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sinusoidal timestep features `[B, ch0]`, computed in f32 as diffusers does.
    fn timestep_features(&self, timesteps: &[f64]) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let shift = self.config.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - shift)).exp())
            .collect();
        let mut data = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args = freqs.iter().map(|f| t as f32 * f);
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
            let (first, second) = if self.config.flip_sin_to_cos {
                (cos, sin)
            } else {
                (sin, cos)
            };
            data.extend(first);
            data.extend(second);
            data.extend(std::iter::repeat_n(0.0, dim - 2 * half));
        }
        Tensor::from_vec(data, (timesteps.len(), dim), &self.device)?.to_dtype(self.dtype)
    }

    /// Whether a training forward of `rows` latents of `h x w` recomputes its blocks in the
    /// backward instead of keeping their intermediates (large latents on the CPU).
    pub(crate) fn checkpoints(&self, rows: usize, h: usize, w: usize) -> bool {
        self.device.is_cpu()
            && self.dtype == DType::F32
            && checkpoint::wanted(rows * h * w * self.config.block_out_channels[0])
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at one timestep per item, conditioned on
    /// `context` `[B, S, cross_attention_dim]`, with the adapters `adapters` assigns to the rows.
    /// In [`Mode::Training`] every operation has a backward pass, so gradients reach the LoRA
    /// variables.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        adapters: &AdapterBatch<'_>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b || context.dim(0)? != b {
            candle_core::bail!(
                "batch mismatch: {b} samples, {} timesteps, {} contexts",
                timesteps.len(),
                context.dim(0)?
            );
        }
        let factor = 1usize << self.config.downsample_levels();
        if h % factor != 0 || w % factor != 0 {
            candle_core::bail!("latent size {h}x{w} must be a multiple of {factor} for this UNet");
        }
        let temb = self.timestep_features(timesteps)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb).and_then(|t| silu(&t))?)?;
        let temb_act = silu(&temb)?;
        // Checkpointing keeps gradients for a block's input and LoRA factors only: never when
        // the base is trained (its time embedding, or the text, is then tracked).
        let checkpoint = mode == Mode::Training
            && matches!(adapters, AdapterBatch::Uniform(_))
            && !temb_act.track_op()
            && !context.track_op()
            && self.checkpoints(b, h, w);
        let ctx = Ctx {
            mode,
            adapters,
            checkpoint,
        };

        // Channels-last inside: convolutions, norms and attention then need no transposes.
        let mut h = self
            .conv_in
            .forward(&sample.permute((0, 2, 3, 1))?.contiguous()?)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            h = block.forward(&h, &temb_act, context, &ctx, &mut skips)?;
        }
        h = self.mid.forward(&h, &temb_act, context, &ctx)?;
        for block in &self.up {
            h = block.forward(&h, &temb_act, context, &ctx, &mut skips)?;
        }
        self.conv_out
            .forward(&self.norm_out.forward_silu(&h)?)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

#[cfg(test)]
mod tests;
