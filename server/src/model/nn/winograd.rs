//! The CPU f32 3x3 convolution (stride 1, padding 1) by Winograd's F(2x2, 3x3): each 2x2 block of
//! outputs comes from a 4x4 block of inputs through 16 products of the transformed input and
//! weights, where im2col spends 36 multiplies per output pixel and channel pair against 16 per
//! 2x2 block here (2.25x fewer). The products are 16 gemms per band of tiles with the input
//! channels as their inner dimension, so they run at the gemm's full rate, and the transforms are
//! additions over contiguous channels.
//!
//! Used where the weights are constants (serving, and training an adapter: the convolutions carry
//! no LoRA) and both channel counts are large (SD-1.5's 64x64 and 32x32 levels): small channel counts
//! make the 16 products too thin, and the transformed weights take 16/9 of the weights' memory.
//! The algorithm is chosen from the layer and the input's shape, never from whether the input is
//! tracked, so D3PO's policy and reference forwards run the same kernel (d3po.md's pitfall). The
//! backward is the convolution's exact gradient, as for the im2col forward (`FusedConv::bwd`):
//! the two forwards compute one function, to within f32 rounding.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use imagegen_gemm::MatRef;

use super::contiguous_slice;
use super::conv::Im2Col;
use super::conv_cpu::{FusedConv, output_or_first_error, record_first};
use super::simd::vectorized;

/// Fewest input and output channels for which the transform pays.
pub(super) const MIN_CHANNELS: usize = 128;
/// Most `in * out` channel pairs: the transformed weights take `16 * in * out` floats, 100 MiB at
/// 1280 x 1280. This takes in SD-1.5's 32x32 level up to its 1280-channel upsampler (79 of its
/// 215 GFLOP of other 3x3 convolutions, for 275 MiB); the 16x16 and 8x8 levels, whose
/// convolutions have too few tiles per image for the transforms to pay, would cost over 1 GiB.
pub(super) const MAX_CHANNEL_PAIRS: usize = 1 << 21;
/// Tiles per band: enough rows for the 16 gemms to run at full rate and to repack each
/// transformed weight rarely, few enough that a band's scratch stays a few MiB.
const BAND_TILES: usize = 128;

thread_local! {
    /// A band's transformed inputs and products (`16 x tiles x in` and `16 x tiles x out`),
    /// reused across calls by candle's pool threads.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The weights transformed once: `u[xi]` is the `[in, out]` matrix of tap `xi` of the 4x4 tile.
#[derive(Debug)]
pub(crate) struct WinogradWeights {
    u: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
}

impl WinogradWeights {
    /// From im2col-ordered weights `[out, 3 * 3 * in]` (kh, kw, in): `U = G g G^T` per pair.
    pub(crate) fn new(weight_cols: &[f32], in_ch: usize, out_ch: usize) -> Self {
        const G: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        let mut u = vec![0f32; 16 * in_ch * out_ch];
        for k in 0..out_ch {
            let taps = &weight_cols[k * 9 * in_ch..(k + 1) * 9 * in_ch];
            for c in 0..in_ch {
                let g = |i: usize, j: usize| f64::from(taps[(i * 3 + j) * in_ch + c]);
                for a in 0..4 {
                    // (G g)[a][j], then times G^T.
                    let gg: [f64; 3] =
                        std::array::from_fn(|j| (0..3).map(|i| G[a][i] * g(i, j)).sum());
                    for b in 0..4 {
                        let v: f64 = (0..3).map(|j| gg[j] * G[b][j]).sum();
                        u[((a * 4 + b) * in_ch + c) * out_ch + k] = v as f32;
                    }
                }
            }
        }
        Self { u, in_ch, out_ch }
    }

    fn tap(&self, xi: usize) -> MatRef<'_> {
        let size = self.in_ch * self.out_ch;
        MatRef {
            data: &self.u[xi * size..(xi + 1) * size],
            rows: self.in_ch,
            cols: self.out_ch,
            row_stride: self.out_ch,
            col_stride: 1,
        }
    }
}

/// `[B, H, W, in]` conv 3x3 (stride 1, padding 1) `+ bias` into `[B, H, W, out]`; the op's second
/// operand is the im2col-ordered weight, for the backward.
#[derive(Debug, Clone)]
pub(super) struct WinogradConv {
    pub(super) weights: Arc<WinogradWeights>,
}

/// Whether the algorithm is on: `IMAGEGEN_WINOGRAD=0` turns it off, for side-by-side runs of the
/// im2col path (read once).
pub(super) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("IMAGEGEN_WINOGRAD").map_or(true, |v| v != "0"))
}

impl WinogradConv {
    /// Whether `batch` images of `h x w` make at least one full band per pool thread.
    pub(super) fn worth_it(batch: usize, h: usize, w: usize) -> bool {
        let tiles = batch * h.div_ceil(2) * w.div_ceil(2);
        tiles >= BAND_TILES * super::matmul::pool_threads()
    }
}

impl CustomOp3 for WinogradConv {
    fn name(&self) -> &'static str {
        "conv2d-winograd"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        _w: &CpuStorage,
        _lw: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(bias)) = (x, bias) else {
            candle_core::bail!("conv2d: f32 input and bias expected");
        };
        let (b, h, w, c) = lx.shape().dims4()?;
        let (x, bias) = (contiguous_slice(x, lx)?, contiguous_slice(bias, lb)?);
        let wt = &*self.weights;
        if c != wt.in_ch || bias.len() != wt.out_ch {
            candle_core::bail!(
                "conv2d: built for {} to {} channels, got {c} inputs and {} biases",
                wt.in_ch,
                wt.out_ch,
                bias.len()
            );
        }
        let k = wt.out_ch;
        let (tiles_y, tiles_x) = (h.div_ceil(2), w.div_ceil(2));
        let tile_rows = (BAND_TILES / tiles_x).max(1);
        // Bands of tile rows within one image: output rows 2 * tile_rows at a time, each zeroed
        // by the worker that writes it rather than the whole output up front.
        let (image_len, band_len) = (h * w * k, 2 * tile_rows * w * k);
        let bands_per_image = image_len.div_ceil(band_len.max(1)).max(1);
        let band_lens = imagegen_gemm::nested_pieces(b * image_len, image_len, band_len);
        let error = Mutex::new(None);
        let per_img = h * w * c;
        let (out, ()) = imagegen_gemm::fresh_buffer(b * image_len, band_lens, |bands| {
            candle_core::utils::barrier_pool().execute_chunked(bands.len(), |range| {
                for band in range {
                    let Some(dst) = bands.take(band) else {
                        continue;
                    };
                    let (img, ty0) = (band / bands_per_image, (band % bands_per_image) * tile_rows);
                    let rows = tile_rows.min(tiles_y - ty0);
                    let tiles = rows * tiles_x;
                    let geometry = Tiles {
                        h,
                        w,
                        c,
                        k,
                        tiles_x,
                    };
                    let result = SCRATCH.with(|scratch| {
                        let (v, m) = &mut *scratch.borrow_mut();
                        v.resize(16 * tiles * c, 0.0);
                        m.resize(16 * tiles * k, 0.0);
                        let image = &x[img * per_img..][..per_img];
                        vectorized(
                            #[inline(always)]
                            || geometry.input_transform(image, ty0, rows, v),
                        );
                        for xi in 0..16 {
                            let a = MatRef {
                                data: &v[xi * tiles * c..(xi + 1) * tiles * c],
                                rows: tiles,
                                cols: c,
                                row_stride: c,
                                col_stride: 1,
                            };
                            imagegen_gemm::sgemm(
                                a,
                                wt.tap(xi),
                                &mut m[xi * tiles * k..][..tiles * k],
                                k,
                            )?;
                        }
                        vectorized(
                            #[inline(always)]
                            || geometry.output_transform(m, bias, ty0, rows, dst),
                        );
                        Ok::<(), imagegen_gemm::GemmError>(())
                    });
                    if let Err(e) = result {
                        record_first(&error, e);
                    }
                }
            });
        });
        output_or_first_error(error, out, Shape::from((b, h, w, k)))
    }

    /// The convolution's exact gradient, as after an im2col forward.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, h, wd, _) = x.dims4()?;
        let geometry = Im2Col {
            kernel: 3,
            stride: 1,
            padding: 1,
            height: h,
            width: wd,
        };
        FusedConv { geometry }.bwd(x, w, bias, res, grad)
    }
}

/// One image's tiling: `h x w` pixels, `c` input and `k` output channels, `tiles_x` tiles a row.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    tiles_x: usize,
}

/// `out = x + y` (`sign` 1) or `x - y` (`sign` -1), element-wise over equal lengths: every step
/// of both transforms is one of these (or [`sum3`], [`sum3_bias`]), a loop the compiler
/// vectorises.
#[inline(always)]
fn sum2(out: &mut [f32], x: &[f32], y: &[f32], sign: f32) {
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
        *o = a + sign * b;
    }
}

/// `out = x + sy * y + sz * z` element-wise.
#[inline(always)]
fn sum3(out: &mut [f32], x: &[f32], y: &[f32], z: &[f32], (sy, sz): (f32, f32)) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(x).zip(y).zip(z) {
        *o = a + sy * b + sz * c;
    }
}

/// [`sum3`] plus `bias` (a slice of the same length): the output transform's last step.
#[inline(always)]
fn sum3_bias(out: &mut [f32], x: &[f32], y: &[f32], z: &[f32], (sy, sz): (f32, f32), bias: &[f32]) {
    for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(x).zip(y).zip(z).zip(bias) {
        *o = a + sy * b + sz * c + d;
    }
}

/// `B^T`'s rows as (first index, second index, sign of the second): d0-d2, d1+d2, d2-d1, d1-d3.
const BT: [(usize, usize, f32); 4] = [(0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)];

impl Tiles {
    /// `V = B^T d B` for every tile of tile rows `ty0..ty0 + rows`, tap-major into `v`
    /// (`16 x tiles x c`). Tile `(ty, tx)` reads rows `2ty - 1 .. 2ty + 3`, columns likewise;
    /// outside the image reads zeros.
    #[inline(always)]
    fn input_transform(self, image: &[f32], ty0: usize, rows: usize, v: &mut [f32]) {
        let (c, tiles) = (self.c, rows * self.tiles_x);
        let zeros = vec![0f32; c];
        let mut r = vec![0f32; 16 * c];
        for t in 0..tiles {
            let (ty, tx) = (ty0 + t / self.tiles_x, t % self.tiles_x);
            let pixel = |i: usize, j: usize| -> &[f32] {
                let (y, x) = ((2 * ty + i).wrapping_sub(1), (2 * tx + j).wrapping_sub(1));
                if y < self.h && x < self.w {
                    &image[(y * self.w + x) * c..][..c]
                } else {
                    &zeros
                }
            };
            // Rows: r[a][j] = (B^T d)[a][j].
            for (idx, out) in r.chunks_exact_mut(c).enumerate() {
                let ((p, q, sign), j) = (BT[idx / 4], idx % 4);
                sum2(out, pixel(p, j), pixel(q, j), sign);
            }
            // Columns: V[a][b] = (r B)[a][b], into tap a*4+b's row t.
            for (xi, &(p, q, sign)) in (0..16).map(|xi| (xi, &BT[xi % 4])) {
                let a = xi / 4;
                let out = &mut v[(xi * tiles + t) * c..][..c];
                sum2(
                    out,
                    &r[(a * 4 + p) * c..][..c],
                    &r[(a * 4 + q) * c..][..c],
                    sign,
                );
            }
        }
    }

    /// `Y = A^T M A + bias` for every tile into the band's output rows (`dst` starts at output
    /// row `2 * ty0`); the last row or column of an odd-sized image is not written past its edge.
    #[inline(always)]
    fn output_transform(self, m: &[f32], bias: &[f32], ty0: usize, rows: usize, dst: &mut [f32]) {
        let (k, tiles) = (self.k, rows * self.tiles_x);
        // A^T's rows as (first, second, third, signs of the second and third): m0+m1+m2, m1-m2-m3.
        const AT: [(usize, usize, usize, (f32, f32)); 2] =
            [(0, 1, 2, (1.0, 1.0)), (1, 2, 3, (-1.0, -1.0))];
        let mut s = vec![0f32; 8 * k];
        for t in 0..tiles {
            let (ty, tx) = (t / self.tiles_x, t % self.tiles_x);
            let tap = |xi: usize| &m[(xi * tiles + t) * k..][..k];
            // Rows: s[dy][b] = (A^T M)[dy][b].
            for (idx, out) in s.chunks_exact_mut(k).enumerate() {
                let ((p, q, r, signs), b) = (AT[idx / 4], idx % 4);
                sum3(out, tap(p * 4 + b), tap(q * 4 + b), tap(r * 4 + b), signs);
            }
            // Columns, plus the bias, into the output pixels that exist.
            for dy in 0..2 {
                if 2 * (ty0 + ty) + dy >= self.h {
                    continue;
                }
                for (dx, &(p, q, r, signs)) in AT.iter().enumerate() {
                    if 2 * tx + dx >= self.w {
                        continue;
                    }
                    let row = |b: usize| &s[(dy * 4 + b) * k..][..k];
                    let at = ((2 * ty + dy) * self.w + 2 * tx + dx) * k;
                    sum3_bias(&mut dst[at..at + k], row(p), row(q), row(r), signs, bias);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::model::nn::{max_abs, max_abs_diff};

    /// candle's NCHW conv of channels-last `x`, channels-last, plus bias.
    fn candle_conv(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let out = weight.dim(0).unwrap();
        x.permute((0, 3, 1, 2))
            .unwrap()
            .conv2d(weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, out, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
    }

    fn weight_cols(weight: &Tensor) -> Tensor {
        let (out, inp, _, _) = weight.dims4().unwrap();
        weight
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, 9 * inp))
            .unwrap()
    }

    /// Hand-checked: one channel of ones through a kernel of ones (bias 0.5) counts each
    /// output's in-bounds taps: 4 at corners, 6 on edges, 9 inside; a 3x3 image has all three.
    #[test]
    fn counts_the_taps_of_a_kernel_of_ones() {
        let dev = &Device::Cpu;
        let w = Tensor::ones((1, 9), candle_core::DType::F32, dev).unwrap();
        let b = Tensor::new(&[0.5f32], dev).unwrap();
        let weights = WinogradWeights::new(&w.flatten_all().unwrap().to_vec1().unwrap(), 1, 1);
        let op = WinogradConv {
            weights: Arc::new(weights),
        };
        let x = Tensor::ones((1, 3, 3, 1), candle_core::DType::F32, dev).unwrap();
        let y: Vec<f32> = x
            .apply_op3_no_bwd(&w, &b, &op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, [4.5, 6.5, 4.5, 6.5, 9.5, 6.5, 4.5, 6.5, 4.5]);
    }

    /// Against candle's conv on even and odd sizes and several images (bands of one tile row
    /// and of many), with the input, weights and bias tracked: values within f32 rounding of the
    /// scale, and the three gradients those of the convolution.
    #[test]
    fn matches_candle_with_gradients_on_even_and_odd_sizes() {
        let dev = &Device::Cpu;
        for (batch, side, cin, cout) in [(2, 6, 5, 3), (1, 7, 4, 6), (3, 9, 3, 2), (1, 40, 8, 4)] {
            let n = batch * side * side * cin;
            let xv: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
            let x = Var::from_tensor(&Tensor::from_vec(xv, (batch, side, side, cin), dev).unwrap())
                .unwrap();
            let wv: Vec<f32> = (0..cout * cin * 9)
                .map(|i| ((i as f32) * 0.91).cos())
                .collect();
            let weight =
                Var::from_tensor(&Tensor::from_vec(wv, (cout, cin, 3, 3), dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::arange(0f32, cout as f32, dev).unwrap()).unwrap();
            let cols = weight_cols(&weight);
            let weights =
                WinogradWeights::new(&cols.flatten_all().unwrap().to_vec1().unwrap(), cin, cout);
            let op = WinogradConv {
                weights: Arc::new(weights),
            };
            let ours = x.as_tensor().apply_op3(&cols, &bias, op).unwrap();
            let want = candle_conv(&x, &weight, &bias);
            let err = max_abs_diff(&ours, &want);
            assert!(
                err < 2e-6 * max_abs(&want),
                "{batch}x{side}x{cin}->{cout}: {err}"
            );
            let r = (want.ones_like().unwrap() * 0.5)
                .unwrap()
                .cumsum(3)
                .unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [x.as_tensor(), weight.as_tensor(), bias.as_tensor()]
                    .map(|t| g.get(t).unwrap().clone())
            };
            for (o, c) in grads(&ours).iter().zip(grads(&want).iter()) {
                assert!(
                    max_abs_diff(o, c) < 1e-5 * max_abs(c),
                    "{}",
                    max_abs_diff(o, c)
                );
            }
        }
    }
}
