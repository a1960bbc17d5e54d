//! Layers shared by the model's components, in two flavours: fused kernels for serving and
//! differentiable compositions for training.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` have no backward pass: used in a tracked
//! graph they silently cut it and the LoRA gradients upstream of them come out zero. Every layer
//! here therefore takes a [`Mode`] and uses the fused kernel only when nothing is differentiated.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Whether a forward pass will be differentiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serving: fused kernels, no graph needed.
    Inference,
    /// Training: only operations with a backward pass.
    Training,
}

/// A dense layer `y = x W^T + b` over the last dimension of any-rank input.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            let bound = 1.0 / (in_dim as f64).sqrt();
            Some(vb.get_with_hints(
                out_dim,
                "bias",
                candle_nn::Init::Uniform { lo: -bound, up: bound },
            )?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub(crate) fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D gemm over all leading dims, against the transposed weight view (no copy).
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.out_dim();
        y.reshape(out_dims)
    }
}

/// A 2-D convolution with square kernel, as diffusers' `nn.Conv2d`.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub(crate) fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_ch, in_ch, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1.0 / ((in_ch * kernel * kernel) as f64).sqrt();
        let bias = vb.get_with_hints(out_ch, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias: bias.reshape((1, out_ch, 1, 1))?, padding, stride })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// Group normalisation over `[B, C, ...]`, statistics in f32 for half-precision inputs.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("{channels} channels cannot be split into {groups} norm groups");
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, groups, eps })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (batch, channels) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let grouped = x.reshape((batch, self.groups, ()))?.to_dtype(upcast(dtype))?;
        let normed = normalize_last_dim(&grouped, self.eps)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = channels;
        normed
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub(crate) fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        // The fused kernel has no backward and no f64 variant.
        if mode == Mode::Inference && x.is_contiguous() && x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        normalize_last_dim(&x.to_dtype(upcast(dtype))?, self.eps)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dimension, from differentiable ops.
fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Softmax over the last dimension; differentiable in [`Mode::Training`].
pub(crate) fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(x),
        Mode::Training => {
            // The max is only a shift for stability; it needs no gradient.
            let max = x.max_keepdim(D::Minus1)?.detach();
            let exp = x.broadcast_sub(&max)?.exp()?;
            exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
        }
    }
}

/// The dtype statistics and LoRA products are computed in.
pub(crate) fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

impl Linear {
    /// A 1x1 convolution's weights `[out, in, 1, 1]` used as a dense layer over channels.
    pub(crate) fn from_conv1x1(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .get_with_hints((out_dim, in_dim, 1, 1), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?
            .reshape((out_dim, in_dim))?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias: Some(bias) })
    }
}
