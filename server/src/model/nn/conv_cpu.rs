//! The CPU f32 convolution as one op: for each band of output rows, the band's im2col columns go
//! into a per-thread scratch, one gemm multiplies them by the weights and the bias is added, all
//! while the band is in cache, straight into the output.
//!
//! Gathering the whole im2col matrix first (`k*k` times the input: 47 MB per image at SD-1.5's
//! first level) sent it through memory three times (zeroed, written, read by the gemm); zeroing it
//! alone was 6% of a tiny-UNet forward, on one thread. The backward needs only the input and the
//! weights (`dx = col2im(g W)`), so a training graph no longer keeps the columns alive either.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use imagegen_gemm::{GemmError, MatRef};

use super::contiguous_slice;
use super::conv::{Col2Im, Im2Col};
use super::matmul::{add_bias_rows, column_sums, pool_threads};

/// Most columns one band gathers (16 MiB of f32).
const MAX_BAND_COLUMNS: usize = 4 << 20;

/// Weights (`k*k*in x out` f32) above this size cost a noticeable pass to pack for each gemm,
/// so their bands are kept at 256 output pixels or more.
const LARGE_WEIGHTS_BYTES: usize = 1 << 20;

thread_local! {
    /// The band's columns: reused across calls by candle's pool threads, which live as long as
    /// the process (at most [`MAX_BAND_COLUMNS`] each).
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `[B, H, W, C]` conv `[out, k*k*C]` weights, `+ bias`, into `[B, OH, OW, out]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct FusedConv {
    pub(super) geometry: Im2Col,
}

impl FusedConv {
    /// Output rows (across images) per band, or `None` when the problem splits into fewer bands
    /// than the pool has threads (deep, small layers: a plain im2col and a product that splits
    /// its columns instead serve them better).
    pub(super) fn band_rows(&self, batch: usize, channels: usize, out_ch: usize) -> Option<usize> {
        let (oh, ow) = self.geometry.out_size();
        let kkc = self.geometry.kernel * self.geometry.kernel * channels;
        let total_rows = batch * oh;
        let threads = pool_threads();
        let min_pixels: usize = if kkc * out_ch * 4 > LARGE_WEIGHTS_BYTES {
            256
        } else {
            32
        };
        let max_rows = (MAX_BAND_COLUMNS / (ow * kkc).max(1)).max(1);
        let rows = total_rows
            .div_ceil(4 * threads)
            .max(min_pixels.div_ceil(ow.max(1)))
            .min(max_rows)
            .max(1);
        (total_rows.div_ceil(rows) >= threads && total_rows > 0).then_some(rows)
    }
}

impl CustomOp3 for FusedConv {
    fn name(&self) -> &'static str {
        "conv2d-band-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(bias)) = (x, w, bias) else {
            candle_core::bail!("conv2d: f32 input, weights and bias expected");
        };
        let g = self.geometry;
        let (b, h, wd, c) = lx.shape().dims4()?;
        let (out_ch, kkc) = lw.shape().dims2()?;
        if (h, wd) != (g.height, g.width) || kkc != g.kernel * g.kernel * c {
            candle_core::bail!(
                "conv2d built for {}x{} inputs and {kkc} columns, got {h}x{wd}x{c}",
                g.height,
                g.width
            );
        }
        let (x, w, bias) = (
            contiguous_slice(x, lx)?,
            contiguous_slice(w, lw)?,
            contiguous_slice(bias, lb)?,
        );
        if bias.len() != out_ch {
            candle_core::bail!("conv2d: {} bias values for {out_ch} outputs", bias.len());
        }
        let (oh, ow) = g.out_size();
        let Some(rows_per_band) = self.band_rows(b, c, out_ch) else {
            candle_core::bail!("conv2d: {b}x{oh}x{ow} outputs are too few to split into bands");
        };
        let weights = MatRef {
            data: w,
            rows: kkc,
            cols: out_ch,
            row_stride: 1,
            col_stride: kkc,
        };
        let per_img = h * wd * c;
        let error = Mutex::new(None);
        // Each band's product written straight into fresh memory by the worker given it.
        let band_len = std::iter::repeat(rows_per_band * ow * out_ch);
        let (out, ()) = imagegen_gemm::fresh_buffer(b * oh * ow * out_ch, band_len, |bands| {
            candle_core::utils::barrier_pool().execute_chunked(bands.len(), |range| {
                for band in range {
                    let first = band * rows_per_band;
                    let rows = rows_per_band.min(b * oh - first);
                    let result = COLUMNS.with(|scratch| {
                        let mut scratch = scratch.borrow_mut();
                        if scratch.len() < rows * ow * kkc {
                            scratch.resize(rows * ow * kkc, 0.0);
                        }
                        let cols = &mut scratch[..rows * ow * kkc];
                        // The band's rows, image by image (a band may straddle two).
                        let mut done = 0;
                        while done < rows {
                            let (img, oy) = ((first + done) / oh, (first + done) % oh);
                            let n = (oh - oy).min(rows - done);
                            g.fill_rows(
                                &x[img * per_img..][..per_img],
                                oy..oy + n,
                                c,
                                &mut cols[done * ow * kkc..(done + n) * ow * kkc],
                            );
                            done += n;
                        }
                        let a = MatRef {
                            data: cols,
                            rows: rows * ow,
                            cols: kkc,
                            row_stride: kkc,
                            col_stride: 1,
                        };
                        bands.take_product(band, a, weights)
                    });
                    match result {
                        Ok(Some(dst)) => add_bias_rows(dst, bias),
                        Ok(None) => {}
                        Err(e) => record_first(&error, e),
                    }
                }
            });
        });
        output_or_first_error(error, out, Shape::from((b, oh, ow, out_ch)))
    }

    /// `dx = col2im(g W)`, `dW = g^T im2col(x)`, `db = ones^T g`, each only when tracked.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, oh, ow, out_ch) = grad.dims4()?;
        let kkc = w.dim(1)?;
        let pixels = b * oh * ow;
        let g = grad.contiguous()?.reshape((pixels, out_ch))?;
        let dx = x
            .track_op()
            .then(|| {
                super::matmul(&g, &w.detach())?
                    .reshape((b, oh, ow, kkc))?
                    .apply_op1_no_bwd(&Col2Im(self.geometry))
            })
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| {
                let cols = x
                    .detach()
                    .apply_op1_no_bwd(&self.geometry)?
                    .reshape((pixels, kkc))?;
                super::matmul(&g.t()?, &cols)
            })
            .transpose()?;
        let db = bias.track_op().then(|| column_sums(&g)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// Keeps the first error a band met (the others are its consequences or alike).
pub(super) fn record_first(error: &Mutex<Option<GemmError>>, e: GemmError) {
    if let Ok(mut slot) = error.lock() {
        slot.get_or_insert(e);
    }
}

/// How a banded convolution ends: its output, or the first error a band met.
pub(super) fn output_or_first_error(
    error: Mutex<Option<GemmError>>,
    out: Vec<f32>,
    shape: Shape,
) -> Result<(CpuStorage, Shape)> {
    match error.into_inner() {
        Ok(None) => Ok((CpuStorage::F32(out), shape)),
        Ok(Some(e)) => Err(candle_core::Error::Msg(e.to_string())),
        Err(_) => candle_core::bail!("conv2d: a worker panicked"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::model::nn::{input, max_abs, max_abs_diff};

    /// candle's NCHW `conv2d` of channels-last `x` with `[out, in, k, k]` weights, channels-last.
    fn candle_conv(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        pad: usize,
        stride: usize,
    ) -> Tensor {
        let nchw = x.permute((0, 3, 1, 2)).unwrap();
        let out = weight.dim(0).unwrap();
        nchw.conv2d(weight, pad, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, out, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
    }

    /// Bands that straddle images and a last short band; input, weight and bias all tracked:
    /// values and the three gradients equal candle's differentiable conv.
    #[test]
    fn bands_across_images_and_all_three_gradients_match_candle() {
        // 3 images of 5x5: 15 output rows in bands of 7 (5 + 2, 3 + 4, 1).
        for (stride, pad, side) in [(1, 1, 5), (2, 1, 9), (1, 0, 7)] {
            let (cin, cout, k) = (3, 4, 3);
            let x = Var::from_tensor(
                &input((3, side, side, cin))
                    .reshape((3, side, side, cin))
                    .unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(&input((cout, cin, k, k)).cos().unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::arange(0f32, cout as f32, &Device::Cpu).unwrap())
                .unwrap();
            let cols = w
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((cout, k * k * cin))
                .unwrap();
            let op = FusedConv {
                geometry: Im2Col {
                    kernel: k,
                    stride,
                    padding: pad,
                    height: side,
                    width: side,
                },
            };
            let rows = op.band_rows(3, cin, cout).unwrap();
            let (oh, _) = op.geometry.out_size();
            assert!(oh % rows != 0 || rows > oh, "bands of {rows} rows of {oh}");
            let ours = x.as_tensor().apply_op3(&cols, &b, op).unwrap();
            let want = candle_conv(&x, &w, &b, pad, stride);
            assert!(max_abs_diff(&ours, &want) < 1e-5 * max_abs(&want));
            let r = input(want.dims4().unwrap());
            let grads = |y: &Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| g.get(t).unwrap().clone())
            };
            for (o, c) in grads(&ours).iter().zip(grads(&want).iter()) {
                assert!(
                    max_abs_diff(o, c) < 1e-5 * max_abs(c),
                    "s{stride} p{pad}: {} of {}",
                    max_abs_diff(o, c),
                    max_abs(c)
                );
            }
        }
    }

    /// Hand-checked: a 1-channel 8x8 image of ones, a 3x3 kernel of ones, padding 1, bias 0.5:
    /// each output counts the in-bounds taps (corners 4, edges 6, inside 9) plus the bias. The
    /// scratch of an earlier, larger call holds other values: the padding must still read 0.
    #[test]
    fn padding_reads_zero_even_from_reused_scratch() {
        let dev = &Device::Cpu;
        let op = |side| FusedConv {
            geometry: Im2Col {
                kernel: 3,
                stride: 1,
                padding: 1,
                height: side,
                width: side,
            },
        };
        let w = Tensor::ones((1, 9), candle_core::DType::F32, dev).unwrap();
        let b = Tensor::new(&[0.5f32], dev).unwrap();
        let big = (input((2, 16, 16, 1)) + 3.0).unwrap();
        big.apply_op3_no_bwd(&w, &b, &op(16)).unwrap();
        let ones = Tensor::ones((2, 8, 8, 1), candle_core::DType::F32, dev).unwrap();
        let y = ones.apply_op3_no_bwd(&w, &b, &op(8)).unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let span = |i: usize| if i == 0 || i == 7 { 2.0 } else { 3.0 };
        let image: Vec<f32> = (0..64).map(|i| span(i / 8) * span(i % 8) + 0.5).collect();
        assert_eq!(got, [image.clone(), image].concat());
    }
}
