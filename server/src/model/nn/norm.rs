//! Normalisation layers: group norm over channels-last activations (a fused kernel with a
//! closed-form backward) and layer norm over the last dimension.

use std::sync::Arc;

use candle_core::{CpuStorage, D, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::{Mode, contiguous_slice, group_norm_cpu, layer_norm_cpu, upcast};

/// Group normalisation over **channels-last** `[B, ..., C]`: channels split into groups along
/// the last dimension, statistics over every position and the group's channels (in f32 for
/// half-precision inputs). Equal to `nn.GroupNorm` on the NCHW view.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// Weight and bias as host f32 for the CPU kernel, read once: frozen weights only (trained
    /// ones, a variable's, are read at each call).
    frozen_affine: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl GroupNorm {
    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("{channels} channels cannot be split into {groups} norm groups");
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        Self::from_tensors(weight, bias, groups, eps)
    }

    fn from_tensors(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let frozen_affine = if weight.device().is_cpu() && !weight.track_op() && !bias.track_op() {
            Some(Arc::new((host_f32(&weight)?, host_f32(&bias)?)))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            frozen_affine,
        })
    }

    /// `silu(GroupNorm(x))`, as every resnet normalises: one pass on the CPU when nothing is
    /// tracked.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.untracked_cpu(x, true)? {
            return Ok(y);
        }
        if x.track_op() && super::cpu_kernel_for(x, &[DType::F32]) {
            return self.tracked_kernel(x, true);
        }
        super::silu(&self.forward(x)?)
    }

    /// Training: one kernel with a hand-written backward (f32 with SiLU, f32 or f64 without).
    /// The composite in [`Module::forward`] is differentiated by candle as a dozen broadcasts
    /// whose backward reductions over positions dominated a pretraining step.
    fn tracked_kernel(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (batch, channels) = (dims[0], dims[dims.len() - 1]);
        let rows = x.elem_count() / channels;
        x.contiguous()?
            .reshape((rows, channels))?
            .apply_op3(
                &self.weight.to_dtype(x.dtype())?,
                &self.bias.to_dtype(x.dtype())?,
                GroupNormOp {
                    batch,
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                },
            )?
            .reshape(dims.as_slice())
    }

    /// The CPU kernel's result for an untracked f32 `x` (`None`: not that case).
    fn untracked_cpu(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        if x.track_op() || !super::cpu_kernel_for(x, &[DType::F32]) {
            return Ok(None);
        }
        let problem = group_norm_cpu::Problem {
            batch: x.dim(0)?,
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        let affine = match &self.frozen_affine {
            Some(a) => a.clone(),
            None => Arc::new((host_f32(&self.weight)?, host_f32(&self.bias)?)),
        };
        if affine.0.len() != x.dims().last().copied().unwrap_or(0) {
            candle_core::bail!(
                "group norm over {} channels got {:?}",
                affine.0.len(),
                x.dims()
            );
        }
        let out = x
            .contiguous()?
            .apply_op1_no_bwd(&GroupNormCpu { affine, problem })?;
        Ok(Some(out))
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// [`group_norm_cpu::forward`] as an op over `(weight, bias)` on the host.
struct GroupNormCpu {
    affine: Arc<(Vec<f32>, Vec<f32>)>,
    problem: group_norm_cpu::Problem,
}

impl candle_core::CustomOp1 for GroupNormCpu {
    fn name(&self) -> &'static str {
        "group-norm-cpu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = x else {
            candle_core::bail!("group-norm-cpu: f32 expected");
        };
        let x = contiguous_slice(data, layout)?;
        let (w, b) = &*self.affine;
        let out = group_norm_cpu::forward(x, w, b, self.problem);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.untracked_cpu(x, false)? {
            return Ok(y);
        }
        if x.track_op() && super::cpu_kernel_for(x, &[DType::F32, DType::F64]) {
            return self.tracked_kernel(x, false);
        }
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

/// Group norm with affine over `[rows, C]` (rows = batch x positions), CPU, f32/f64; then
/// SiLU when `silu` (f32 only).
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    batch: usize,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    fn problem(&self) -> group_norm_cpu::Problem {
        group_norm_cpu::Problem {
            batch: self.batch,
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        }
    }

    fn no_silu(&self) -> Result<()> {
        if self.silu {
            candle_core::bail!("group-norm: the fused SiLU is f32-only");
        }
        Ok(())
    }
}

impl GroupNormOp {
    /// Mean and reciprocal standard deviation of every (item, group).
    fn stats<T: candle_core::WithDType>(&self, x: &[T], channels: usize) -> Vec<(f64, f64)> {
        let per_item = x.len() / self.batch;
        let per_group = channels / self.groups;
        let count = (per_item / channels * per_group) as f64;
        let mut out = Vec::with_capacity(self.batch * self.groups);
        for item in x.chunks(per_item) {
            let mut sums = vec![(0.0f64, 0.0f64); self.groups];
            for row in item.chunks(channels) {
                for (g, sum) in sums.iter_mut().enumerate() {
                    for v in &row[g * per_group..(g + 1) * per_group] {
                        let v = v.to_f64();
                        sum.0 += v;
                        sum.1 += v * v;
                    }
                }
            }
            for (s, sq) in sums {
                let mean = s / count;
                let var = (sq / count - mean * mean).max(0.0);
                out.push((mean, 1.0 / (var + self.eps).sqrt()));
            }
        }
        out
    }

    fn forward<T: candle_core::WithDType>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let channels = w.len();
        let per_item = x.len() / self.batch;
        let per_group = channels / self.groups;
        let stats = self.stats(x, channels);
        let mut y = Vec::with_capacity(x.len());
        for (i, v) in x.iter().enumerate() {
            let c = i % channels;
            let (mean, rstd) = stats[(i / per_item) * self.groups + c / per_group];
            y.push(T::from_f64(
                (v.to_f64() - mean) * rstd * w[c].to_f64() + b[c].to_f64(),
            ));
        }
        y
    }

    /// `dx`, then `dweight`, then `dbias`, in one buffer.
    fn backward<T: candle_core::WithDType>(&self, x: &[T], w: &[T], dy: &[T]) -> Vec<T> {
        let channels = w.len();
        let per_item = x.len() / self.batch;
        let per_group = channels / self.groups;
        let count = (per_item / channels * per_group) as f64;
        let stats = self.stats(x, channels);
        let (mut dw, mut db) = (vec![0.0f64; channels], vec![0.0f64; channels]);
        // Per (item, group): mean of dxhat and of dxhat * xhat.
        let mut sums = vec![(0.0f64, 0.0f64); self.batch * self.groups];
        for (i, (v, g)) in x.iter().zip(dy).enumerate() {
            let c = i % channels;
            let k = (i / per_item) * self.groups + c / per_group;
            let (mean, rstd) = stats[k];
            let xhat = (v.to_f64() - mean) * rstd;
            let g = g.to_f64();
            dw[c] += g * xhat;
            db[c] += g;
            let dxhat = g * w[c].to_f64();
            sums[k].0 += dxhat;
            sums[k].1 += dxhat * xhat;
        }
        let mut out = Vec::with_capacity(x.len() + 2 * channels);
        for (i, (v, g)) in x.iter().zip(dy).enumerate() {
            let c = i % channels;
            let k = (i / per_item) * self.groups + c / per_group;
            let (mean, rstd) = stats[k];
            let xhat = (v.to_f64() - mean) * rstd;
            let dxhat = g.to_f64() * w[c].to_f64();
            out.push(T::from_f64(
                rstd * (dxhat - sums[k].0 / count - xhat * sums[k].1 / count),
            ));
        }
        out.extend(dw.into_iter().map(T::from_f64));
        out.extend(db.into_iter().map(T::from_f64));
        out
    }
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
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
        let out = match (x, w, b) {
            // The untracked path's kernel, so that a tracked and an untracked forward (a
            // policy and its frozen reference) agree to the bit.
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(group_norm_cpu::forward(
                    contiguous_slice(x, lx)?,
                    contiguous_slice(w, lw)?,
                    contiguous_slice(b, lb)?,
                    self.problem(),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                self.no_silu()?;
                CpuStorage::F64(self.forward(
                    contiguous_slice(x, lx)?,
                    contiguous_slice(w, lw)?,
                    contiguous_slice(b, lb)?,
                ))
            }
            _ => candle_core::bail!("group-norm: f32 or f64 tensors of one dtype expected"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.elem_count(), w.elem_count());
        // Weight and bias in one argument: the SiLU's derivative needs the bias too.
        let affine = Tensor::cat(&[w, b], 0)?;
        let packed = x.apply_op3_no_bwd(&affine, &grad.contiguous()?, &GroupNormBackward(*self))?;
        // Frozen weights (the UNet's, under LoRA) need no gradient: none is handed to candle.
        let weight_grad = |t: &Tensor, at: usize| -> Result<Option<Tensor>> {
            Ok(if t.track_op() {
                Some(packed.narrow(0, at, c)?)
            } else {
                None
            })
        };
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            weight_grad(w, n)?,
            weight_grad(b, n + c)?,
        ))
    }
}

/// The backward of [`GroupNormOp`] as a kernel over `(x, [weight; bias], dy)`.
#[derive(Debug, Clone, Copy)]
struct GroupNormBackward(GroupNormOp);

impl candle_core::CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
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
        let channels = lw.shape().elem_count() / 2;
        let out = match (x, w, dy) {
            (CpuStorage::F32(x), CpuStorage::F32(wb), CpuStorage::F32(dy)) => {
                let (w, b) = contiguous_slice(wb, lw)?.split_at(channels);
                CpuStorage::F32(group_norm_cpu::backward(
                    contiguous_slice(x, lx)?,
                    w,
                    b,
                    contiguous_slice(dy, ldy)?,
                    self.0.problem(),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(wb), CpuStorage::F64(dy)) => {
                self.0.no_silu()?;
                CpuStorage::F64(self.0.backward(
                    contiguous_slice(x, lx)?,
                    &contiguous_slice(wb, lw)?[..channels],
                    contiguous_slice(dy, ldy)?,
                ))
            }
            _ => {
                candle_core::bail!("group-norm backward: f32 or f64 tensors of one dtype expected")
            }
        };
        let len = lx.shape().elem_count() + 2 * channels;
        Ok((out, Shape::from(len)))
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
        if super::cpu_kernel_for(x, &[DType::F32]) && self.weight.dtype() == DType::F32 {
            return layer_norm_cpu::layer_norm(x, &self.weight, &self.bias, self.eps, mode);
        }
        // candle's fused kernel has no backward and no f64 variant.
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};

    use super::*;
    use crate::model::nn::{Mode, input, max_abs_diff, softmax_last_dim};
    use crate::model::seeded::SeededWeights;

    /// The training kernel's values and gradients (input, weight, bias) equal those candle
    /// derives from the composite, in f64.
    #[test]
    fn group_norm_kernel_matches_the_composite_and_its_gradients() {
        let seeded = SeededWeights::new(21);
        let norm = GroupNorm::new(
            2,
            6,
            1e-5,
            seeded.var_builder(DType::F64, &Device::Cpu).pp("n"),
        )
        .unwrap();
        let weights = seeded.tensors();
        // A non-trivial scale, so the weight gradient is tested too.
        let w = candle_core::Var::from_tensor(
            &(weights["n.weight"].to_dtype(DType::F64).unwrap()
                + (input((1, 1, 1, 6))
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    * 0.3)
                    .unwrap())
            .unwrap(),
        )
        .unwrap();
        let b = candle_core::Var::from_tensor(&weights["n.bias"].to_dtype(DType::F64).unwrap())
            .unwrap();
        let w = w.as_tensor().clone();
        let trainable =
            GroupNorm::from_tensors(w.clone(), b.as_tensor().clone(), norm.groups, norm.eps)
                .unwrap();
        let x = candle_core::Var::from_tensor(
            &(input((3, 4, 5, 6)).to_dtype(DType::F64).unwrap() * 2.0).unwrap(),
        )
        .unwrap();
        let r = input((3, 4, 5, 6))
            .to_dtype(DType::F64)
            .unwrap()
            .cos()
            .unwrap();
        let kernel = trainable.forward(x.as_tensor()).unwrap();
        // The composite: the same layer on an untracked input, plus the tracked input's
        // contribution through a differentiable copy of the formula.
        let g = x.reshape((3, 20, 2, 3)).unwrap();
        let mean = (g.sum_keepdim(3).unwrap().sum_keepdim(1).unwrap() / 60.0).unwrap();
        let centred = g.broadcast_sub(&mean).unwrap();
        let var = (centred
            .sqr()
            .unwrap()
            .sum_keepdim(3)
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            / 60.0)
            .unwrap();
        let composite = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((3, 4, 5, 6))
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_abs_diff(&kernel, &composite) < 1e-10);
        let grads = |y: &Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(&w).unwrap().clone(),
                g.get(b.as_tensor()).unwrap().clone(),
            ]
        };
        for (a, c) in grads(&kernel).iter().zip(grads(&composite).iter()) {
            assert!(max_abs_diff(a, c) < 1e-9, "{}", max_abs_diff(a, c));
        }
    }

    /// The f32 kernel's values and gradients (input, weight, bias), with and without the fused
    /// SiLU, against the f64 path (checked against the composite above), over several blocks and
    /// folds of rows per item.
    #[test]
    fn f32_group_norm_kernel_and_its_backward_match_f64() {
        for (batch, h, w_, silu) in [(2, 15, 20, true), (3, 7, 11, false), (1, 40, 40, true)] {
            let x64 = (input((batch, h, w_, 12)).to_dtype(DType::F64).unwrap() * 3.0)
                .and_then(|t| t + 0.5)
                .unwrap();
            let r64 = x64.cos().unwrap();
            let weight = input((1, 1, 1, 12))
                .flatten_all()
                .unwrap()
                .affine(0.7, 1.0)
                .unwrap();
            let bias = (weight.cos().unwrap() * 0.3).unwrap();
            let run = |dtype: DType| {
                let var = |t: &Tensor| candle_core::Var::from_tensor(&t.to_dtype(dtype).unwrap());
                let (x, w, b) = (
                    var(&x64).unwrap(),
                    var(&weight).unwrap(),
                    var(&bias).unwrap(),
                );
                let norm =
                    GroupNorm::from_tensors(w.as_tensor().clone(), b.as_tensor().clone(), 3, 1e-5)
                        .unwrap();
                let y = if silu {
                    norm.forward_silu(x.as_tensor())
                } else {
                    norm.forward(x.as_tensor())
                }
                .unwrap();
                let g = (&y * r64.to_dtype(dtype).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                [
                    f(&y),
                    f(g.get(x.as_tensor()).unwrap()),
                    f(g.get(w.as_tensor()).unwrap()),
                    f(g.get(b.as_tensor()).unwrap()),
                ]
            };
            let (ours, want) = (run(DType::F32), run(DType::F64));
            for (name, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(ours.iter().zip(&want)) {
                let err = max_abs_diff(a, b) / super::super::max_abs(b).max(1.0);
                assert!(
                    err < 2e-5,
                    "{name} ({batch}, {h}, {w_}, silu {silu}): {err}"
                );
            }
        }
    }

    #[test]
    fn group_norm_matches_candle_group_norm_on_nchw() {
        // Non-trivial affine parameters.
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.5)
            .unwrap();
        let b = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .affine(-0.2, 0.3)
            .unwrap();
        let ours = GroupNorm::from_tensors(w.clone(), b.clone(), 4, 1e-5).unwrap();
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
