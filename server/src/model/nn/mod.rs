//! Layers shared by the model's components, in two flavours: fused kernels for serving and
//! differentiable compositions for training.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` have no backward pass: used in a tracked
//! graph they silently cut it and the LoRA gradients upstream of them come out zero. Every layer
//! here therefore takes a [`Mode`] and uses the fused kernel only when nothing is differentiated.

mod activation;
mod attention;
mod conv;
mod conv_cpu;
mod group_norm_cpu;
mod layer_norm_cpu;
mod linear;
mod matmul;
mod norm;
mod simd;
mod winograd;

use candle_core::{D, DType, Layout, Result, Tensor};

pub(crate) use activation::{geglu, gelu_erf, silu};
pub(crate) use attention::attention;
pub(crate) use conv::{Conv2d, upsample_nearest_2x};
pub(crate) use linear::{Linear, frozen_matmul};
pub use matmul::matmul;
pub(crate) use norm::{GroupNorm, LayerNorm};
pub use simd::vector_isa;

/// Whether `x` takes the hand-written CPU kernels (fused im2col with a scatter-add backward, group
/// norm with its own backward, row bias, activations, softmax) or candle's own ops, which are
/// correct on every device and dtype (CUDA, f16, bf16). The one place that decides it: each kernel
/// exists for the CPU and the `dtypes` it names; everything else falls back to the portable ops,
/// whose equality with the kernels the tests check on the CPU (`with_portable_ops`).
pub(crate) fn cpu_kernel_for(x: &Tensor, dtypes: &[DType]) -> bool {
    !PORTABLE_OPS.with(std::cell::Cell::get) && x.device().is_cpu() && dtypes.contains(&x.dtype())
}

thread_local! {
    static PORTABLE_OPS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on this thread with every op on its portable path, as it runs on a GPU: how the tests
/// and the GPU check's CPU dry run exercise the GPU's code on the CPU. The choice is per thread
/// (candle's CPU worker threads never make it).
pub fn with_portable_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PORTABLE_OPS.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PORTABLE_OPS.with(|p| p.replace(true)));
    f()
}

/// The CPU's matrix-product implementation: `openblas` or `gemm-crate` (logs, benches).
pub fn cpu_gemm_backend() -> &'static str {
    imagegen_gemm::backend().name()
}

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

/// Largest absolute value of a tensor: the scale a difference is judged against.
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_takes_its_kernels_for_their_dtypes_and_the_override_is_scoped() {
        let x = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(cpu_kernel_for(&x, &[DType::F32]));
        assert!(!cpu_kernel_for(&x, &[DType::F64]));
        with_portable_ops(|| {
            with_portable_ops(|| {});
            assert!(
                !cpu_kernel_for(&x, &[DType::F32]),
                "nesting keeps the outer choice"
            );
        });
        assert!(cpu_kernel_for(&x, &[DType::F32]));
    }
}
