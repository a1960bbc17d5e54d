//! The UNet's spatial transformers: `Transformer2DModel` of `BasicTransformerBlock`s, whose
//! attention projections carry LoRA.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use super::Ctx;
use super::checkpoint::checkpointed;
use crate::model::lora::{AdapterBatch, LoraLinear, LoraTarget, LoraWeights};
use crate::model::nn::{GroupNorm, LayerNorm, Linear, attention, geglu};

/// Multi-head attention (`Attention` in diffusers) with LoRA-capable projections.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    scale: f64,
}

impl Attention {
    pub(crate) fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let mut lora =
            |name: &str, in_dim: usize, out_dim: usize, bias: bool| -> Result<LoraLinear> {
                let vb = vb.pp(name);
                let path = vb.prefix();
                Ok(LoraLinear::new(
                    Linear::new(in_dim, out_dim, bias, vb)?,
                    path,
                    targets,
                ))
            };
        Ok(Self {
            to_q: lora("to_q", query_dim, inner, false)?,
            to_k: lora("to_k", context_dim, inner, false)?,
            to_v: lora("to_v", context_dim, inner, false)?,
            to_out: lora("to_out.0", inner, query_dim, true)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `x`: `[B, N, query_dim]`; `context`: `[B, M, context_dim]` (self-attention when `None`).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        ctx: &Ctx<'_>,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x, ctx.adapters)?;
        let k = self.to_k.forward(context, ctx.adapters)?;
        let v = self.to_v.forward(context, ctx.adapters)?;
        let out = attention(&q, &k, &v, self.heads, self.scale, ctx.mode)?;
        self.to_out.forward(&out, ctx.adapters)
    }
}

/// GEGLU feed-forward: `net.2(hidden * gelu(gate))` with `[hidden, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(dim, inner * 2, true, vb.pp("net.0.proj"))?,
            out: Linear::new(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(x)?)?)
    }
}

/// Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, head_dim, vb.pp("attn1"), targets)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, head_dim, vb.pp("attn2"), targets)?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &Ctx<'_>) -> Result<Tensor> {
        let x = (self
            .attn1
            .forward(&self.norm1.forward(x, ctx.mode)?, None, ctx)?
            + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x, ctx.mode)?, Some(context), ctx)?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x, ctx.mode)?)? + x
    }
}

/// Settings shared by every spatial transformer of a UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerSpec {
    pub(crate) context_dim: usize,
    pub(crate) groups: usize,
    pub(crate) linear_projection: bool,
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks, projection out, residual.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2D {
    /// The LoRA target slots of this transformer's projections (consecutive).
    slots: std::ops::Range<usize>,
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    pub(crate) fn new(
        channels: usize,
        heads: usize,
        depth: usize,
        spec: TransformerSpec,
        vb: VarBuilder,
        targets: &mut Vec<LoraTarget>,
    ) -> Result<Self> {
        // SD 1.x projects with 1x1 convolutions, SD 2.x with linears: the same map on [B, HW, C].
        let projection = |vb: VarBuilder| {
            if spec.linear_projection {
                Linear::new(channels, channels, true, vb)
            } else {
                Linear::from_conv1x1(channels, channels, vb)
            }
        };
        let first_slot = targets.len();
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    spec.context_dim,
                    heads,
                    vb.pp(format!("transformer_blocks.{i}")),
                    targets,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots: first_slot..targets.len(),
            norm: GroupNorm::new(spec.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection(vb.pp("proj_in"))?,
            blocks,
            proj_out: projection(vb.pp("proj_out"))?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor, ctx: &Ctx<'_>) -> Result<Tensor> {
        let (true, AdapterBatch::Uniform(adapter)) = (ctx.checkpoint, ctx.adapters) else {
            return self.forward_kept(x, context, ctx);
        };
        let (this, context, mode) = (self.clone(), context.clone(), ctx.mode);
        let f = move |x: &Tensor, adapter: Option<&LoraWeights>| {
            let adapters = AdapterBatch::Uniform(adapter);
            let ctx = Ctx {
                mode,
                adapters: &adapters,
                checkpoint: false,
            };
            this.forward_kept(x, &context, &ctx)
        };
        checkpointed(x, *adapter, self.slots.clone(), Arc::new(f))
    }

    /// The forward with every intermediate in the graph.
    fn forward_kept(&self, x: &Tensor, context: &Tensor, ctx: &Ctx<'_>) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((b, h * w, c))?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, ctx)?;
        }
        self.proj_out.forward(&tokens)?.reshape((b, h, w, c))? + x
    }
}
