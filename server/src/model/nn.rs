//! Layers shared by the model's components, in two flavours: fused kernels for serving and
//! differentiable compositions for training.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` have no backward pass: used in a tracked
//! graph they silently cut it and the LoRA gradients upstream of them come out zero. Every layer
//! here therefore takes a [`Mode`] and uses the fused kernel only when nothing is differentiated.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, D, DType, Layout, Module, Result, Shape, Tensor,
};
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
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
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
        let y = frozen_matmul(
            &x.reshape((rows, in_dim))?,
            &self.weight,
            self.bias.as_ref(),
        )?;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.out_dim();
        y.reshape(out_dims)
    }
}

/// A 2-D convolution with square kernel over **channels-last** activations `[B, H, W, C]`,
/// with diffusers' `nn.Conv2d` weights `[out, in, k, k]`.
///
/// It runs as one im2col gemm: the k*k shifted windows of the padded input are copied out as
/// contiguous row blocks, concatenated along channels, and multiplied once by the weights
/// pre-arranged as `[out, kh*kw*in]`. candle's own CPU conv builds its im2col tiles element by
/// element from NCHW and re-flattens the kernel on every call; with it the convolutions were
/// the largest cost of a UNet forward. Every op used here has a backward pass.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    /// `[out, k*k*in]`: the weight in im2col order (kh, kw, in).
    weight_cols: Tensor,
    bias: Tensor,
    kernel: usize,
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
        let bias = vb.get_with_hints(
            out_ch,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let weight_cols = weight
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((out_ch, kernel * kernel * in_ch))?;
        Ok(Self {
            weight_cols,
            bias,
            kernel,
            padding,
            stride,
        })
    }
}

impl Module for Conv2d {
    /// `[B, H, W, in] -> [B, H', W', out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (k, p, s) = (self.kernel, self.padding, self.stride);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("{h}x{w} input is smaller than the {k}x{k} kernel");
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let cols = if k == 1 && s == 1 && p == 0 {
            x.clone()
        } else {
            // Pad so that every window of s*o rows fits (strided windows are then subsampled).
            let bottom = (k - 1 + s * oh).saturating_sub(h + p);
            let right = (k - 1 + s * ow).saturating_sub(w + p);
            let padded = x
                .pad_with_zeros(1, p, bottom)?
                .pad_with_zeros(2, p, right)?;
            let windows = (0..k * k)
                .map(|i| {
                    let win = padded
                        .narrow(1, i / k, s * oh)?
                        .narrow(2, i % k, s * ow)?
                        .contiguous()?;
                    if s == 1 {
                        Ok(win)
                    } else {
                        win.reshape((b, oh, s, ow, s, c))?
                            .narrow(2, 0, 1)?
                            .narrow(4, 0, 1)?
                            .contiguous()?
                            .reshape((b, oh, ow, c))
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&windows, 3)?
        };
        let out_ch = self.weight_cols.dim(0)?;
        frozen_matmul(
            &cols.reshape((b * oh * ow, k * k * c))?,
            &self.weight_cols,
            Some(&self.bias),
        )?
        .reshape((b, oh, ow, out_ch))
    }
}

/// `x W^T + b` for `x` `[rows, in]` and a frozen (never trained) `W` `[out, in]`.
///
/// When `x` is part of an autograd graph, candle's matmul backward would also compute the
/// gradient of `W` (a second gemm as large as the forward, plus memory for it) only to throw it
/// away. Here the value is computed off the graph and attached to `x` by [`FrozenWeightGrad`],
/// whose backward produces `grad_x = grad_y W` and nothing else.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let value = x.detach().matmul(&weight.t()?)?;
    let value = match bias {
        Some(b) => value.broadcast_add(b)?,
        None => value,
    };
    if x.track_op() {
        x.apply_op2(
            &value,
            FrozenWeightGrad {
                weight: weight.clone(),
            },
        )
    } else {
        Ok(value)
    }
}

/// Passes a precomputed `x W^T + b` through, with the backward of a product by a constant `W`.
struct FrozenWeightGrad {
    weight: Tensor,
}

impl FrozenWeightGrad {
    fn pass_through<S: BackendStorage>(value: &S, layout: &Layout) -> Result<(S, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("frozen-weight matmul expects a fresh contiguous value");
        }
        Ok((value.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp2 for FrozenWeightGrad {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::pass_through(value, layout)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        value: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::pass_through(value, layout)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// Group normalisation over **channels-last** `[B, ..., C]`: channels split into groups along
/// the last dimension, statistics over every position and the group's channels (in f32 for
/// half-precision inputs). Equal to `nn.GroupNorm` on the NCHW view.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("{channels} channels cannot be split into {groups} norm groups");
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (batch, channels) = (dims[0], dims[dims.len() - 1]);
        let dtype = x.dtype();
        let per_group = channels / self.groups;
        let positions = x.elem_count() / (batch * channels);
        let count = (positions * per_group) as f64;
        let g = x
            .reshape((batch, positions, self.groups, per_group))?
            .to_dtype(upcast(dtype))?;
        // Sum over the group's channels (contiguous) first, then over positions.
        let mean = (g.sum_keepdim(3)?.sum_keepdim(1)? / count)?;
        let centred = g.broadcast_sub(&mean)?;
        let var = (centred.sqr()?.sum_keepdim(3)?.sum_keepdim(1)? / count)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?
            .reshape(dims.as_slice())?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Nearest-neighbour 2x upsampling of channels-last `[B, H, W, C]` (differentiable: a broadcast).
pub(crate) fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, 2, w, 2, c))?
        .contiguous()?
        .reshape((b, 2 * h, 2 * w, c))
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
            .get_with_hints(
                (out_dim, in_dim, 1, 1),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?
            .reshape((out_dim, in_dim))?;
        let bound = 1.0 / (in_dim as f64).sqrt();
        let bias = vb.get_with_hints(
            out_dim,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias: Some(bias),
        })
    }
}

/// Largest absolute difference between two tensors of one shape (NaN if they differ in shape).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(D::Minus1))
        .and_then(|m| m.to_dtype(DType::F32))
        .and_then(|m| m.to_scalar::<f32>())
        .unwrap_or(f32::NAN)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};

    use super::*;
    use crate::model::seeded::SeededWeights;

    fn input(shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The channels-last im2col convolution equals candle's NCHW `conv2d` on the same weights.
    #[test]
    fn conv_matches_candle_conv2d() {
        for (k, stride, pad, h, w) in [
            (3, 1, 1, 8, 6),
            (3, 2, 1, 8, 8),
            (3, 2, 1, 7, 5),
            (1, 1, 0, 4, 4),
            (3, 1, 0, 5, 5),
        ] {
            let seeded = SeededWeights::new(k as u64 + stride as u64);
            let vb = seeded.var_builder(DType::F32, &Device::Cpu);
            let conv = Conv2d::new(5, 7, k, stride, pad, vb.pp("c")).unwrap();
            let weights = seeded.tensors();
            let (weight, bias) = (&weights["c.weight"], &weights["c.bias"]);
            let x = input((2, 5, h, w));
            let want = x
                .conv2d(weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 7, 1, 1)).unwrap())
                .unwrap();
            let got = conv
                .forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap())
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{pad} {h}x{w}");
            assert!(
                max_abs_diff(&got, &want) < 1e-5,
                "k{k} s{stride} p{pad}: {}",
                max_abs_diff(&got, &want)
            );
        }
    }

    #[test]
    fn group_norm_matches_candle_group_norm_on_nchw() {
        let seeded = SeededWeights::new(3);
        let vb = seeded.var_builder(DType::F32, &Device::Cpu);
        let ours = GroupNorm::new(4, 8, 1e-5, vb.pp("n")).unwrap();
        // Non-trivial affine parameters.
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.5)
            .unwrap();
        let b = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .affine(-0.2, 0.3)
            .unwrap();
        let ours = GroupNorm {
            weight: w.clone(),
            bias: b.clone(),
            ..ours
        };
        let reference = candle_nn::GroupNorm::new(w, b, 8, 4, 1e-5).unwrap();
        let x = input((2, 8, 3, 5));
        let want = reference.forward(&x).unwrap();
        let got = ours
            .forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );
    }

    #[test]
    fn upsample_matches_candle_nearest() {
        let x = input((2, 3, 4, 5));
        let want = x.upsample_nearest2d(8, 10).unwrap();
        let got = upsample_nearest_2x(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0);
    }

    #[test]
    fn layer_norm_modes_agree_and_softmax_modes_agree() {
        let seeded = SeededWeights::new(4);
        let ln = LayerNorm::new(
            6,
            1e-5,
            seeded.var_builder(DType::F32, &Device::Cpu).pp("ln"),
        )
        .unwrap();
        let x = input((1, 2, 3, 6));
        let fused = ln.forward(&x, Mode::Inference).unwrap();
        let composed = ln.forward(&x, Mode::Training).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        // Hand check: softmax of [0, ln 3] is [1/4, 3/4].
        let t = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        for mode in [Mode::Inference, Mode::Training] {
            let p: Vec<Vec<f32>> = softmax_last_dim(&t, mode).unwrap().to_vec2().unwrap();
            assert!(
                (p[0][0] - 0.25).abs() < 1e-6 && (p[0][1] - 0.75).abs() < 1e-6,
                "{mode:?}"
            );
        }
    }
}
