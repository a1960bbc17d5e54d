//! Layer norm over the last dimension on the CPU in f32, forward and backward, each one pass over
//! blocks of rows spread over candle's pool. The composite it replaces in training (mean,
//! centring, square, mean, add, sqrt, divide, scale, shift: nine tensors, and nine backwards
//! with candle's zero-filled accumulators) was the costliest part of a transformer block's
//! training step after the products. Serving runs the same kernel, so a policy forward, its
//! frozen reference and a served generation agree to the bit while their adapters do.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::activation::{dot16, reduce16};
use super::simd::{fill_row_blocks, map_rows};
use super::{Mode, contiguous_slice};

/// `LayerNorm(x) * w + b` over the last dimension of an f32 CPU `x`; differentiable in
/// [`Mode::Training`] (input, and weight and bias when they are tracked).
pub(super) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    mode: Mode,
) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    let x = x.contiguous()?;
    match mode {
        Mode::Training => x.apply_op3(weight, bias, op),
        Mode::Inference => x.apply_op3_no_bwd(weight, bias, &op),
    }
}

#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f32,
}

/// The contiguous f32 values of one operand of `op`.
fn f32_values<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 tensors expected");
    };
    contiguous_slice(data, layout)
}

/// That each per-column operand (weight, bias) has one value per column of `x`.
fn check_columns(op: &str, lx: &Layout, per_column: &[&Layout]) -> Result<()> {
    let cols = lx.dims().last().copied().unwrap_or(0);
    if let Some(bad) = per_column.iter().find(|l| l.shape().elem_count() != cols) {
        candle_core::bail!(
            "{op}: {:?} does not match the last dimension of {:?}",
            bad.dims(),
            lx.dims()
        );
    }
    Ok(())
}

/// Mean and `1 / sqrt(var + eps)` of a row, with its centred values left in `centred`.
#[inline(always)]
fn centre(row: &[f32], centred: &mut [f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = reduce16(row, 0.0, |a, b| a + b) / n;
    for (c, &v) in centred.iter_mut().zip(row) {
        *c = v - mean;
    }
    let var = dot16(centred, centred) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_columns(self.name(), lx, &[lw, lb])?;
        let (x, w, b) = (
            f32_values(self.name(), x, lx)?,
            f32_values(self.name(), w, lw)?,
            f32_values(self.name(), b, lb)?,
        );
        let eps = self.eps;
        let out = map_rows(
            x,
            w.len(),
            #[inline(always)]
            |row, y| {
                let (_, rstd) = centre(row, y, eps);
                for ((y, &w), &b) in y.iter_mut().zip(w).zip(b) {
                    *y = *y * rstd * w + b;
                }
            },
        );
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let x = x.detach();
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(&w.detach(), &grad, &LayerNormGrad(*self))?;
        // Trained weights (pretraining; never under LoRA): `dw = sum dy xhat`, `db = sum dy`.
        let (dw, db) = if w.track_op() || b.track_op() {
            let ones = w.ones_like()?;
            let xhat = x.apply_op3_no_bwd(&ones, &ones.zeros_like()?, self)?;
            (
                Some(super::matmul::column_sums(&(&grad * xhat)?)?),
                Some(super::matmul::column_sums(&grad)?),
            )
        } else {
            (None, None)
        };
        Ok((Some(dx), dw, db))
    }
}

/// The input gradient of [`LayerNormOp`] over `(x, w, dy)`: per row, with `g = dy w`,
/// `dx = rstd (g - mean(g) - xhat mean(g xhat))`.
struct LayerNormGrad(LayerNormOp);

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lx.shape() != ldy.shape() {
            candle_core::bail!(
                "layer-norm backward: input {:?} and gradient {:?} differ in shape",
                lx.dims(),
                ldy.dims()
            );
        }
        check_columns(self.name(), lx, &[lw])?;
        let (x, w, dy) = (
            f32_values(self.name(), x, lx)?,
            f32_values(self.name(), w, lw)?,
            f32_values(self.name(), dy, ldy)?,
        );
        let cols = w.len();
        let n = cols as f32;
        let eps = self.0.eps;
        let out = fill_row_blocks(
            x.len(),
            cols,
            #[inline(always)]
            |first, dst| {
                let mut xhat = vec![0f32; cols];
                let span = first * cols..first * cols + dst.len();
                for ((g, row), dy) in dst
                    .chunks_exact_mut(cols)
                    .zip(x[span.clone()].chunks_exact(cols))
                    .zip(dy[span].chunks_exact(cols))
                {
                    let (_, rstd) = centre(row, &mut xhat, eps);
                    for ((g, &d), &w) in g.iter_mut().zip(dy).zip(w) {
                        *g = d * w;
                    }
                    for v in xhat.iter_mut() {
                        *v *= rstd;
                    }
                    let mean_g = reduce16(g, 0.0, |a, b| a + b) / n;
                    let mean_gx = dot16(g, &xhat) / n;
                    for (g, &xh) in g.iter_mut().zip(&xhat) {
                        *g = rstd * (*g - mean_g - xh * mean_gx);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Var};

    use super::*;
    use crate::model::nn::{max_abs, max_abs_diff};

    /// `(x - mean) / sqrt(var + eps) * w + b` from candle's differentiable ops, in f64.
    fn composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let centred = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
            .broadcast_add(b)
            .unwrap()
    }

    /// A row by hand: `[1, 2, 3, 4]` has mean 2.5 and variance 1.25, so it normalises to
    /// `[-1.3416, -0.4472, 0.4472, 1.3416]`, then `* w + b`.
    #[test]
    fn a_row_by_hand() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2., 1., 1.], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0f32, 0., 0., -1.], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = layer_norm(&x, &w, &b, 0.0, Mode::Inference)
            .unwrap()
            .to_vec2()
            .unwrap();
        let want = [
            -1.341_640_8,
            2.0 * -0.447_213_6,
            0.447_213_6,
            1.341_640_8 - 1.0,
        ];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    /// Values and the gradients of input, weight and bias against the composite in f64, over
    /// rows in several blocks; both modes give the same values to the bit.
    #[test]
    fn values_and_gradients_match_the_composite() {
        let (rows, cols) = (1000, 40);
        let values: Vec<f64> = (0..rows * cols)
            .map(|i| (i as f64 * 0.37).sin() * 3.0 + (i / cols) as f64 * 0.01)
            .collect();
        let x64 = Tensor::from_vec(values, (2, rows / 2, cols), &Device::Cpu).unwrap();
        let w64 = Tensor::arange(0f64, cols as f64, &Device::Cpu)
            .unwrap()
            .affine(0.05, 0.5)
            .unwrap();
        let b64 = w64.cos().unwrap();
        let dy64 = (x64.sin().unwrap() * 2.0).unwrap();
        let f32_of = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
        let (x, w, b) = (f32_of(&x64), f32_of(&w64), f32_of(&b64));
        let ours = layer_norm(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
            Mode::Training,
        )
        .unwrap();
        let served = layer_norm(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
            Mode::Inference,
        )
        .unwrap();
        assert_eq!(max_abs_diff(&ours, &served), 0.0);
        assert!(!served.track_op());
        let (xv, wv, bv) = (
            Var::from_tensor(&x64).unwrap(),
            Var::from_tensor(&w64).unwrap(),
            Var::from_tensor(&b64).unwrap(),
        );
        let want = composite(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-5);
        let close = |name: &str, a: &Tensor, b: &Tensor| {
            let err = max_abs_diff(&a.to_dtype(DType::F64).unwrap(), b) / max_abs(b).max(1.0);
            assert!(err < 1e-5, "{name}: {err}");
        };
        close("y", &ours, &want);
        let g_ours = (&ours * dy64.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_want = (&want * &dy64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, a, b) in [
            ("dx", x.as_tensor(), xv.as_tensor()),
            ("dw", w.as_tensor(), wv.as_tensor()),
            ("db", b.as_tensor(), bv.as_tensor()),
        ] {
            close(name, g_ours.get(a).unwrap(), g_want.get(b).unwrap());
        }
    }
}
