//! Layers shared by the model's components, in two flavours: fused kernels for serving and
//! differentiable compositions for training.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` have no backward pass: used in a tracked
//! graph they silently cut it and the LoRA gradients upstream of them come out zero. Every layer
//! here therefore takes a [`Mode`] and uses the fused kernel only when nothing is differentiated.

mod activation;
mod conv;
mod linear;
mod norm;

use candle_core::{D, DType, Layout, Result, Tensor};

pub(crate) use activation::{gelu_erf, silu};
pub(crate) use conv::{Conv2d, upsample_nearest_2x};
pub(crate) use linear::{Linear, frozen_matmul};
pub(crate) use norm::{GroupNorm, LayerNorm};

/// Whether a forward pass will be differentiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serving: fused kernels, no graph needed.
    Inference,
    /// Training: only operations with a backward pass.
    Training,
}

/// Softmax over the last dimension; differentiable in [`Mode::Training`].
pub(crate) fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => activation::softmax_last_dim_inference(x),
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

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("im2col expects a contiguous tensor"),
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

/// A deterministic NCHW test input (`sin(0.37 i)`).
#[cfg(test)]
pub(crate) fn input(shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
}
