//! Resnets and the down, mid and up blocks of the UNet. Activations are channels-last
//! `[B, H, W, C]` throughout.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Ctx;
use super::attention::{Transformer2D, TransformerSpec};
use super::checkpoint::checkpointed;
use crate::model::lora::{LoraTarget, LoraWeights};
use crate::model::nn::{Conv2d, GroupNorm, Linear, upsample_nearest_2x};

/// `ResnetBlock2D`: two norm-silu-conv stages with the time embedding added between them.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Absent in the VAE, whose resnets take no time embedding.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb = 0` builds a resnet without time conditioning (the VAE's).
    pub(crate) fn new(
        in_ch: usize,
        out_ch: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shortcut = if in_ch != out_ch {
            Some(Conv2d::new(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(groups, in_ch, eps, vb.pp("norm1"))?,
            conv1: Conv2d::new(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: if temb > 0 {
                Some(Linear::new(temb, out_ch, true, vb.pp("time_emb_proj"))?)
            } else {
                None
            },
            norm2: GroupNorm::new(groups, out_ch, eps, vb.pp("norm2"))?,
            conv2: Conv2d::new(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            shortcut,
        })
    }

    /// `temb_act` is `silu(time embedding)`, computed once per forward and shared.
    pub(crate) fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Some(temb_act))
    }

    /// [`Self::forward`], recomputed in the backward when `ctx` checkpoints (the resnet is frozen:
    /// only its input gets a gradient).
    fn forward_in(&self, x: &Tensor, temb_act: &Tensor, ctx: &Ctx<'_>) -> Result<Tensor> {
        if !ctx.checkpoint {
            return self.forward(x, temb_act);
        }
        let (this, temb_act) = (self.clone(), temb_act.clone());
        checkpointed(
            x,
            None,
            0..0,
            Arc::new(move |x: &Tensor, _: Option<&LoraWeights>| this.forward(x, &temb_act)),
        )
    }

    pub(crate) fn forward_with(&self, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_act) {
            h = h.broadcast_add(&proj.forward(temb)?.unsqueeze(1)?.unsqueeze(1)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// What every block needs to build its layers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSpec {
    pub(crate) temb: usize,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) transformer: TransformerSpec,
}

/// Attention settings of a cross-attention block: heads and transformer depth.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CrossAttn {
    pub(crate) heads: usize,
    pub(crate) depth: usize,
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        in_ch: usize,
        out_ch: usize,
        layers: usize,
        attn: Option<CrossAttn>,
        downsample: Option<usize>,
        spec: BlockSpec,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let in_i = if i == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock::new(
                in_i,
                out_ch,
                spec.temb,
                spec.groups,
                spec.eps,
                vb.pp(format!("resnets.{i}")),
            )?);
            if let Some(a) = attn {
                attentions.push(Transformer2D::new(
                    out_ch,
                    a.heads,
                    a.depth,
                    spec.transformer,
                    vb.pp(format!("attentions.{i}")),
                    targets,
                )?);
            }
        }
        let downsample = match downsample {
            Some(padding) => Some(Conv2d::new(
                out_ch,
                out_ch,
                3,
                2,
                padding,
                vb.pp("downsamplers.0.conv"),
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Runs the block, pushing every intermediate output onto `skips` for the up path.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: &Ctx<'_>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward_in(&h, temb, ctx)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, ctx)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    first: ResnetBlock,
    attention: Transformer2D,
    second: ResnetBlock,
}

impl MidBlock {
    pub(crate) fn new(
        ch: usize,
        attn: CrossAttn,
        spec: BlockSpec,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        Ok(Self {
            first: ResnetBlock::new(ch, ch, spec.temb, spec.groups, spec.eps, vb.pp("resnets.0"))?,
            attention: Transformer2D::new(
                ch,
                attn.heads,
                attn.depth,
                spec.transformer,
                vb.pp("attentions.0"),
                targets,
            )?,
            second: ResnetBlock::new(ch, ch, spec.temb, spec.groups, spec.eps, vb.pp("resnets.1"))?,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: &Ctx<'_>,
    ) -> Result<Tensor> {
        let h = self.first.forward_in(x, temb, ctx)?;
        let h = self.attention.forward(&h, context, ctx)?;
        self.second.forward_in(&h, temb, ctx)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet eats one skip connection.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

/// Channel counts of an up block (diffusers' naming).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpChannels {
    /// Channels of the skips from the next-finer down level (the last resnet's skip).
    pub(crate) input: usize,
    pub(crate) output: usize,
    /// Channels coming up from the coarser level.
    pub(crate) prev_output: usize,
}

impl UpBlock {
    pub(crate) fn new(
        ch: UpChannels,
        layers: usize,
        attn: Option<CrossAttn>,
        upsample: bool,
        spec: BlockSpec,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { ch.input } else { ch.output };
            let from_below = if i == 0 { ch.prev_output } else { ch.output };
            resnets.push(ResnetBlock::new(
                from_below + skip,
                ch.output,
                spec.temb,
                spec.groups,
                spec.eps,
                vb.pp(format!("resnets.{i}")),
            )?);
            if let Some(a) = attn {
                attentions.push(Transformer2D::new(
                    ch.output,
                    a.heads,
                    a.depth,
                    spec.transformer,
                    vb.pp(format!("attentions.{i}")),
                    targets,
                )?);
            }
        }
        let upsample = if upsample {
            Some(Conv2d::new(
                ch.output,
                ch.output,
                3,
                1,
                1,
                vb.pp("upsamplers.0.conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: &Ctx<'_>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet skip connections exhausted");
            };
            h = resnet.forward_in(&Tensor::cat(&[&h, &skip], 3)?, temb, ctx)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, ctx)?;
            }
        }
        if let Some(up) = &self.upsample {
            // Latent sides are multiples of 2^levels (checked by the UNet), so this is exact.
            h = up.forward(&upsample_nearest_2x(&h)?)?;
        }
        Ok(h)
    }
}
