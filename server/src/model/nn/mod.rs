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
        } else if x.track_op()
            && x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
        {
            // Training: one gather with a scatter-add backward. The composite below would
            // differentiate every window's two narrows into zero-padded copies of the input.
            x.contiguous()?.apply_op1(Im2Col {
                kernel: k,
                stride: s,
                padding: p,
                height: h,
                width: w,
            })?
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

/// im2col of channels-last `[B, H, W, C]` into `[B, OH, OW, k*k*C]`, columns ordered
/// `(kh, kw, c)` as [`Conv2d`]'s weights; positions in the zero padding read 0. CPU only.
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
    height: usize,
    width: usize,
}

impl Im2Col {
    fn out_size(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }

    /// Calls `visit(col_offset, input_offset, channels)` for every in-bounds tap of image `b`.
    fn for_each_tap(&self, channels: usize, mut visit: impl FnMut(usize, usize)) {
        let (oh, ow) = self.out_size();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (oy * ow + ox) * k * k * channels;
                for ky in 0..k {
                    let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < self.height) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&x| x < self.width)
                        else {
                            continue;
                        };
                        visit(
                            row + (ky * k + kx) * channels,
                            (iy * self.width + ix) * channels,
                        );
                    }
                }
            }
        }
    }

    fn gather<T: Copy + Default>(&self, x: &[T], batch: usize, channels: usize) -> Vec<T> {
        let (oh, ow) = self.out_size();
        let per_col = oh * ow * self.kernel * self.kernel * channels;
        let per_img = self.height * self.width * channels;
        let mut out = vec![T::default(); batch * per_col];
        for b in 0..batch {
            let (dst, src) = (&mut out[b * per_col..], &x[b * per_img..]);
            self.for_each_tap(channels, |col, inp| {
                dst[col..col + channels].copy_from_slice(&src[inp..inp + channels]);
            });
        }
        out
    }

    fn scatter_add<T: Copy + Default + std::ops::AddAssign>(
        &self,
        cols: &[T],
        batch: usize,
        channels: usize,
    ) -> Vec<T> {
        let (oh, ow) = self.out_size();
        let per_col = oh * ow * self.kernel * self.kernel * channels;
        let per_img = self.height * self.width * channels;
        let mut out = vec![T::default(); batch * per_img];
        for b in 0..batch {
            let (dst, src) = (&mut out[b * per_img..], &cols[b * per_col..]);
            self.for_each_tap(channels, |col, inp| {
                for (d, v) in dst[inp..inp + channels]
                    .iter_mut()
                    .zip(&src[col..col + channels])
                {
                    *d += *v;
                }
            });
        }
        out
    }
}

fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("im2col expects a contiguous tensor"),
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        if (h, w) != (self.height, self.width) {
            candle_core::bail!(
                "im2col built for {}x{}, got {h}x{w}",
                self.height,
                self.width
            );
        }
        let (oh, ow) = self.out_size();
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.gather(contiguous_slice(x, layout)?, b, c)),
            CpuStorage::F64(x) => CpuStorage::F64(self.gather(contiguous_slice(x, layout)?, b, c)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, oh, ow, self.kernel * self.kernel * c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2Im(*self))?))
    }
}

/// The adjoint of [`Im2Col`]: every column entry added back to the input position it read.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Im2Col);

impl candle_core::CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (b, _, _, kkc) = layout.shape().dims4()?;
        let c = kkc / (op.kernel * op.kernel);
        let out = match storage {
            CpuStorage::F32(g) => {
                CpuStorage::F32(op.scatter_add(contiguous_slice(g, layout)?, b, c))
            }
            CpuStorage::F64(g) => {
                CpuStorage::F64(op.scatter_add(contiguous_slice(g, layout)?, b, c))
            }
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, op.height, op.width, c))))
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
    if weight.track_op() {
        let y = x.matmul(&weight.t()?)?;
        return match bias {
            // The bias gradient as a product with ones: candle's own (the backward of a
            // broadcast) is a strided reduction over rows, many times slower.
            Some(b) if x.device().is_cpu() => y.apply_op2(b, AddRowBias),
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
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = y.dim(0)?;
        let ones = Tensor::ones((1, rows), grad.dtype(), grad.device())?;
        let db = ones.matmul(&grad.contiguous()?)?.reshape(b.shape())?;
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
        if x.track_op() && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            // Training: one kernel with a hand-written backward. The composite below is
            // differentiated by candle as a dozen broadcasts whose backward reductions over
            // positions dominated a pretraining step.
            let rows = x.elem_count() / channels;
            return x
                .contiguous()?
                .reshape((rows, channels))?
                .apply_op3(
                    &self.weight.to_dtype(x.dtype())?,
                    &self.bias.to_dtype(x.dtype())?,
                    GroupNormOp {
                        batch,
                        groups: self.groups,
                        eps: self.eps,
                    },
                )?
                .reshape(dims.as_slice());
        }
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

/// Group norm with affine over `[rows, C]` (rows = batch x positions), CPU, f32/f64.
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    batch: usize,
    groups: usize,
    eps: f64,
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
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.forward(
                    contiguous_slice(x, lx)?,
                    contiguous_slice(w, lw)?,
                    contiguous_slice(b, lb)?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
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
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.elem_count(), w.elem_count());
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &GroupNormBackward(*self))?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, c)?),
            Some(packed.narrow(0, n + c, c)?),
        ))
    }
}

/// The backward of [`GroupNormOp`] as a kernel over `(x, weight, dy)`.
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
        let out = match (x, w, dy) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(dy)) => {
                CpuStorage::F32(self.0.backward(
                    contiguous_slice(x, lx)?,
                    contiguous_slice(w, lw)?,
                    contiguous_slice(dy, ldy)?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(dy)) => {
                CpuStorage::F64(self.0.backward(
                    contiguous_slice(x, lx)?,
                    contiguous_slice(w, lw)?,
                    contiguous_slice(dy, ldy)?,
                ))
            }
            _ => {
                candle_core::bail!("group-norm backward: f32 or f64 tensors of one dtype expected")
            }
        };
        let len = lx.shape().elem_count() + 2 * lw.shape().elem_count();
        Ok((out, Shape::from(len)))
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

    /// Our conv on NCHW `x` (converted to channels-last and back), and candle's `conv2d` + bias.
    fn both_convs(
        conv: &Conv2d,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        pad: usize,
        stride: usize,
    ) -> (Tensor, Tensor) {
        let want = x
            .conv2d(weight, pad, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1)).unwrap())
            .unwrap();
        let got = conv
            .forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        (got, want)
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
            let (got, want) = both_convs(&conv, &x, weight, bias, pad, stride);
            assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{pad} {h}x{w}");
            assert!(
                max_abs_diff(&got, &want) < 1e-5,
                "k{k} s{stride} p{pad}: {}",
                max_abs_diff(&got, &want)
            );
        }
    }

    /// The training path (gather with scatter-add backward) computes the same values and the
    /// same input gradient as candle's own differentiable `conv2d`.
    #[test]
    fn tracked_conv_matches_candle_conv2d_and_its_gradient() {
        for (k, stride, pad, h, w) in [(3, 1, 1, 6, 5), (3, 2, 1, 8, 8), (3, 2, 1, 7, 5)] {
            for dtype in [DType::F32, DType::F64] {
                let seeded = SeededWeights::new(11);
                let vb = seeded.var_builder(dtype, &Device::Cpu);
                let conv = Conv2d::new(4, 6, k, stride, pad, vb.pp("c")).unwrap();
                let weights = seeded.tensors();
                let weight = weights["c.weight"].to_dtype(dtype).unwrap();
                let bias = weights["c.bias"].to_dtype(dtype).unwrap();
                let x =
                    candle_core::Var::from_tensor(&input((2, 4, h, w)).to_dtype(dtype).unwrap())
                        .unwrap();
                let (got, want) = both_convs(&conv, &x, &weight, &bias, pad, stride);
                assert!(max_abs_diff(&got, &want) < 1e-5);
                // A loss that weights every output differently.
                let r = input(want.dims4().unwrap()).to_dtype(dtype).unwrap();
                let grad_of = |y: &Tensor| {
                    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    g.get(x.as_tensor()).unwrap().clone()
                };
                let (gw, gg) = (grad_of(&want), grad_of(&got));
                assert!(
                    max_abs_diff(&gw, &gg) < 1e-4,
                    "k{k} s{stride} {dtype:?}: {}",
                    max_abs_diff(&gw, &gg)
                );
            }
        }
    }

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
        let trainable = GroupNorm {
            weight: w.clone(),
            bias: b.as_tensor().clone(),
            ..norm
        };
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
