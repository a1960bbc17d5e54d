//! Channels-last 2-D convolution as im2col + one gemm (gather with a scatter-add backward for
//! training), and nearest-neighbour upsampling.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::conv_cpu::FusedConv;
use super::matmul::takes_the_cpu_gemm;
use super::winograd::{MAX_CHANNEL_PAIRS, MIN_CHANNELS, WinogradConv, WinogradWeights};
use super::{contiguous_slice, frozen_matmul};

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
    /// The weights transformed for Winograd's 3x3 algorithm, made on the first call that takes it
    /// and shared by the layer's clones (the weights are constants whenever it is taken).
    winograd: Arc<OnceLock<Arc<WinogradWeights>>>,
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
            winograd: Arc::default(),
        })
    }

    /// The Winograd op for `x` (`[B, H, W, C]`) when this layer takes it: 3x3, stride 1,
    /// padding 1, constant f32 weights on the CPU, channel counts in the range where it pays,
    /// and enough tiles to keep the pool busy. A choice made from the layer and the shape only,
    /// so every forward of one shape (D3PO's policy and reference among them) runs one kernel.
    fn winograd_for(&self, x: &Tensor) -> Result<Option<WinogradConv>> {
        let (b, h, w, c) = x.dims4()?;
        let out_ch = self.weight_cols.dim(0)?;
        let takes = (self.kernel, self.stride, self.padding) == (3, 1, 1)
            && super::winograd::enabled()
            && c.min(out_ch) >= MIN_CHANNELS
            && c * out_ch <= MAX_CHANNEL_PAIRS
            && takes_the_cpu_gemm(x, &self.weight_cols)
            && takes_the_cpu_gemm(x, &self.bias)
            && !self.weight_cols.track_op()
            && !self.bias.track_op()
            && WinogradConv::worth_it(b, h, w);
        if !takes {
            return Ok(None);
        }
        let weights = match self.winograd.get() {
            Some(weights) => weights.clone(),
            None => {
                let cols: Vec<f32> = self.weight_cols.flatten_all()?.to_vec1()?;
                let made = Arc::new(WinogradWeights::new(&cols, c, out_ch));
                self.winograd.get_or_init(|| made).clone()
            }
        };
        Ok(Some(WinogradConv { weights }))
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
        let geometry = Im2Col {
            kernel: k,
            stride: s,
            padding: p,
            height: h,
            width: w,
        };
        if let Some(op) = self.winograd_for(x)? {
            return x.contiguous()?.apply_op3(&self.weight_cols, &self.bias, op);
        }
        let (oh, ow) = geometry.out_size();
        let out_ch = self.weight_cols.dim(0)?;
        let fused = FusedConv { geometry };
        if k > 1
            && takes_the_cpu_gemm(x, &self.weight_cols)
            && takes_the_cpu_gemm(x, &self.bias)
            && fused.band_rows(b, c, out_ch).is_some()
        {
            return x
                .contiguous()?
                .apply_op3(&self.weight_cols, &self.bias, fused);
        }
        let cols = if k == 1 && s == 1 && p == 0 {
            x.clone()
        } else if super::cpu_kernel_for(x, &[DType::F32, DType::F64]) {
            // One gather (with a scatter-add backward when training). The composite below makes
            // k*k padded window copies and concatenates them (candle's serial `cat`: 6% of a
            // tiny-UNet forward); differentiated, every window's narrows into zero-padded
            // copies of the input.
            let gather = geometry;
            let x = x.contiguous()?;
            if x.track_op() {
                x.apply_op1(gather)?
            } else {
                x.apply_op1_no_bwd(&gather)?
            }
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
pub(super) struct Im2Col {
    pub(super) kernel: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) height: usize,
    pub(super) width: usize,
}

impl Im2Col {
    pub(super) fn out_size(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.height), o(self.width))
    }

    /// Calls `visit(col_offset, input_offset)` for every in-bounds tap of image `b`.
    fn for_each_tap(&self, channels: usize, mut visit: impl FnMut(usize, usize)) {
        let (oh, ow) = self.out_size();
        for oy in 0..oh {
            let row = oy * ow * self.kernel * self.kernel * channels;
            self.for_each_tap_in_row(oy, channels, |col, inp| visit(row + col, inp));
        }
    }

    /// [`Self::for_each_tap`] for output row `oy`, column offsets from that row's start.
    fn for_each_tap_in_row(&self, oy: usize, channels: usize, mut visit: impl FnMut(usize, usize)) {
        let (_, ow) = self.out_size();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for ox in 0..ow {
            let col = ox * k * k * channels;
            for ky in 0..k {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&y| y < self.height) else {
                    continue;
                };
                for kx in 0..k {
                    let Some(ix) = (ox * s + kx).checked_sub(p).filter(|&x| x < self.width) else {
                        continue;
                    };
                    visit(
                        col + (ky * k + kx) * channels,
                        (iy * self.width + ix) * channels,
                    );
                }
            }
        }
    }

    /// The columns of output rows `rows` of one image `x` (`[H, W, C]`) into `dst`, every entry
    /// written (zeros for taps in the padding), so `dst` may be reused scratch.
    pub(super) fn fill_rows(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        channels: usize,
        dst: &mut [f32],
    ) {
        let (_, ow) = self.out_size();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let mut taps = dst.chunks_exact_mut(channels.max(1));
        for oy in rows {
            for ox in 0..ow {
                for ky in 0..k {
                    let iy = (oy * s + ky).checked_sub(p).filter(|&y| y < self.height);
                    for kx in 0..k {
                        let Some(tap) = taps.next() else {
                            return;
                        };
                        let ix = (ox * s + kx).checked_sub(p).filter(|&x| x < self.width);
                        match iy.zip(ix) {
                            Some((iy, ix)) => {
                                let at = (iy * self.width + ix) * channels;
                                tap.copy_from_slice(&x[at..at + channels]);
                            }
                            None => tap.fill(0.0),
                        }
                    }
                }
            }
        }
    }

    /// The columns, output row by output row over candle's pool.
    fn gather<T: Copy + Default + Send + Sync>(
        &self,
        x: &[T],
        batch: usize,
        channels: usize,
    ) -> Vec<T> {
        let (oh, ow) = self.out_size();
        let per_row = ow * self.kernel * self.kernel * channels;
        let per_img = self.height * self.width * channels;
        let mut out = vec![T::default(); batch * oh * per_row];
        if out.is_empty() {
            return out;
        }
        let rows: Vec<std::sync::Mutex<&mut [T]>> =
            out.chunks_mut(per_row).map(std::sync::Mutex::new).collect();
        candle_core::utils::barrier_pool().execute_chunked(rows.len(), |range| {
            for t in range {
                let Ok(mut dst) = rows[t].lock() else {
                    continue;
                };
                let src = &x[(t / oh) * per_img..];
                self.for_each_tap_in_row(t % oh, channels, |col, inp| {
                    dst[col..col + channels].copy_from_slice(&src[inp..inp + channels]);
                });
            }
        });
        drop(rows);
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
pub(super) struct Col2Im(pub(super) Im2Col);

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

/// Nearest-neighbour 2x upsampling of channels-last `[B, H, W, C]` (differentiable: a broadcast).
pub(crate) fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, 2, w, 2, c))?
        .contiguous()?
        .reshape((b, 2 * h, 2 * w, c))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};

    use super::*;
    use crate::model::nn::{input, max_abs_diff};
    use crate::model::seeded::SeededWeights;

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
}
