//! Dense layers over frozen weights: the base matmul whose backward computes input gradients
//! only (the weights never train), with the bias added by a fused row kernel on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::VarBuilder;

use super::contiguous_slice;

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

/// `x W^T + b` for `x` `[rows, in]` and a frozen (never trained) `W` `[out, in]`.
///
/// When `x` is part of an autograd graph, candle's matmul backward would also compute the
/// gradient of `W` (a second gemm as large as the forward, plus memory for it) only to throw it
/// away. Here the value is computed off the graph and attached to `x` by [`FrozenWeightGrad`],
/// whose backward produces `grad_x = grad_y W` and nothing else.
///
/// A weight that is itself tracked (a variable, as in pretraining) takes the ordinary
/// differentiable product instead, so its gradient is computed.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // On the CPU the product differentiates only what is tracked already (`nn::matmul`).
    if weight.track_op() || super::matmul::takes_the_cpu_gemm(x, weight) {
        let wt = weight.t()?;
        if let Some(b) = bias.filter(|b| super::matmul::takes_the_cpu_gemm(x, b)) {
            return super::matmul::matmul_bias(x, &wt, b);
        }
        let y = super::matmul(x, &wt)?;
        return match bias {
            // The bias gradient as a product with ones: candle's own (the backward of a
            // broadcast) is a strided reduction over rows, many times slower.
            Some(b) if super::cpu_kernel_for(x, &FLOATS) => y.apply_op2(b, AddRowBias),
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
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

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// `y + b` for `y` `[rows, C]` and `b` `[C]`, whose bias gradient is `ones^T dy` (one gemm).
#[derive(Debug, Clone, Copy)]
struct AddRowBias;

impl CustomOp2 for AddRowBias {
    fn name(&self) -> &'static str {
        "add-row-bias"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn add<T: candle_core::WithDType>(y: &[T], b: &[T]) -> Vec<T> {
            y.chunks(b.len())
                .flat_map(|row| row.iter().zip(b).map(|(v, c)| *v + *c))
                .collect()
        }
        let out = match (y, b) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => {
                CpuStorage::F32(add(contiguous_slice(y, ly)?, contiguous_slice(b, lb)?))
            }
            (CpuStorage::F64(y), CpuStorage::F64(b)) => {
                CpuStorage::F64(add(contiguous_slice(y, ly)?, contiguous_slice(b, lb)?))
            }
            (CpuStorage::F16(y), CpuStorage::F16(b)) => {
                CpuStorage::F16(add(contiguous_slice(y, ly)?, contiguous_slice(b, lb)?))
            }
            (CpuStorage::BF16(y), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(add(contiguous_slice(y, ly)?, contiguous_slice(b, lb)?))
            }
            _ => candle_core::bail!("add-row-bias: tensors of one float dtype expected"),
        };
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !b.track_op() {
            return Ok((Some(grad.clone()), None));
        }
        let db = super::matmul::column_sums(grad)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::nn::{input, max_abs_diff};

    /// A trainable dense layer's gradients (input, weight, bias) equal candle's own.
    #[test]
    fn trainable_linear_gradients_match_candle() {
        let x =
            candle_core::Var::from_tensor(&input((2, 3, 4, 5)).reshape((24, 5)).unwrap()).unwrap();
        let w = candle_core::Var::from_tensor(
            &input((1, 1, 7, 5)).reshape((7, 5)).unwrap().cos().unwrap(),
        )
        .unwrap();
        let b = candle_core::Var::from_tensor(&Tensor::arange(0f32, 7.0, &Device::Cpu).unwrap())
            .unwrap();
        let r = input((1, 1, 24, 7)).reshape((24, 7)).unwrap();
        let ours = frozen_matmul(&x, &w, Some(&b)).unwrap();
        let candle = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_abs_diff(&ours, &candle) < 1e-6);
        let grads = |y: &Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).unwrap().clone())
        };
        for (a, c) in grads(&ours).iter().zip(grads(&candle).iter()) {
            assert!(max_abs_diff(a, c) < 1e-4, "{}", max_abs_diff(a, c));
        }
    }
}
