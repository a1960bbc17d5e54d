//! The model's one matrix product: f32 on the CPU goes through `imagegen-gemm` (OpenBLAS when the
//! build found it) split over candle's thread pool, everything else through candle's matmul.
//!
//! Why not candle's own CPU matmul: it runs the gemm crate on rayon's pool while every other op
//! runs on candle's barrier pool, whose worker spins for a while after each op. On two cores the
//! product then shares them with a spinning thread (a third of the samples of a tiny-UNet profile
//! were that spin). One pool for everything keeps two busy threads on two cores.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use imagegen_gemm::{GemmError, MatRef};

/// `a b` over the last two dimensions, leading (batch) dimensions equal as in candle's matmul;
/// differentiable, and only in the operands that are tracked (a frozen weight gets no gradient
/// computed, where candle's matmul backward computes both and drops one).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if takes_the_cpu_gemm(a, b) {
        a.apply_op2(b, MatMul)
    } else {
        a.matmul(b)
    }
}

/// `a b + bias` (`bias` over the last dimension), differentiable in every tracked operand. On the
/// CPU the bias goes onto each band of the product as it is computed (a separate pass over the
/// result ran serially: 4% of a tiny-UNet forward).
pub(crate) fn matmul_bias(a: &Tensor, b: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if takes_the_cpu_gemm(a, b) && bias.device().is_cpu() && bias.dtype() == DType::F32 {
        a.apply_op3(b, bias, MatMulBias)
    } else {
        a.matmul(b)?.broadcast_add(bias)
    }
}

/// Whether [`matmul`] runs on `imagegen-gemm` (f32 on the CPU) rather than candle's matmul.
pub(crate) fn takes_the_cpu_gemm(a: &Tensor, b: &Tensor) -> bool {
    super::cpu_kernel_for(a, &[DType::F32]) && b.device().is_cpu() && b.dtype() == DType::F32
}

/// Below this many multiply-adds the product runs on the calling thread (waking the pool costs
/// more than it saves).
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

#[derive(Debug, Clone, Copy)]
struct MatMul;

/// One batch element's operands as views into the storages.
struct Problem<'a> {
    a: MatRef<'a>,
    b: MatRef<'a>,
}

fn batch_offsets(layout: &Layout, batch_dims: &[usize]) -> Vec<usize> {
    let strides = &layout.stride()[..batch_dims.len()];
    let mut offsets = vec![layout.start_offset()];
    for (&dim, &stride) in batch_dims.iter().zip(strides) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..dim).map(move |i| o + i * stride))
            .collect();
    }
    offsets
}

fn view<'a>(data: &'a [f32], layout: &Layout, offset: usize) -> MatRef<'a> {
    let dims = layout.dims();
    let strides = layout.stride();
    let r = dims.len();
    MatRef {
        data: &data[offset.min(data.len())..],
        rows: dims[r - 2],
        cols: dims[r - 1],
        row_stride: strides[r - 2],
        col_stride: strides[r - 1],
    }
}

fn gemm_error(e: GemmError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The product of two f32 storages (shapes as candle's matmul), plus `bias` on every row.
fn product(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    bias: Option<&[f32]>,
) -> Result<(CpuStorage, Shape)> {
    let (CpuStorage::F32(a), CpuStorage::F32(b)) = (a, b) else {
        candle_core::bail!("matmul: f32 operands expected");
    };
    let (da, db) = (la.dims(), lb.dims());
    let r = da.len();
    if r < 2 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
        candle_core::bail!("matmul: shapes {da:?} and {db:?} do not multiply");
    }
    let (m, n) = (da[r - 2], db[r - 1]);
    let batch_dims = &da[..r - 2];
    let problems: Vec<Problem<'_>> = batch_offsets(la, batch_dims)
        .into_iter()
        .zip(batch_offsets(lb, batch_dims))
        .map(|(oa, ob)| Problem {
            a: view(a, la, oa),
            b: view(b, lb, ob),
        })
        .collect();
    let out = run(&problems, m, n, bias)?;
    let mut shape = da.to_vec();
    shape[r - 1] = n;
    Ok((CpuStorage::F32(out), Shape::from(shape)))
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        product(a, la, b, lb, None)
    }

    /// `da = g b^T`, `db = a^T g`, each only for a tracked operand.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = a
            .track_op()
            .then(|| matmul(grad, &b.detach().t()?))
            .transpose()?;
        let db = b
            .track_op()
            .then(|| matmul(&a.detach().t()?, grad))
            .transpose()?;
        Ok((da, db))
    }
}

#[derive(Debug, Clone, Copy)]
struct MatMulBias;

impl CustomOp3 for MatMulBias {
    fn name(&self) -> &'static str {
        "matmul-bias"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        bias: &CpuStorage,
        lbias: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(bias) = bias else {
            candle_core::bail!("matmul-bias: an f32 bias expected");
        };
        product(a, la, b, lb, Some(super::contiguous_slice(bias, lbias)?))
    }

    /// As [`MatMul`]'s, and `dbias = ones^T g` (one product) when the bias is tracked.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = MatMul.bwd(a, b, res, grad)?;
        let dbias = bias.track_op().then(|| column_sums(grad)).transpose()?;
        Ok((da, db, dbias))
    }
}

/// A bias gradient: the sums over every leading position of `grad`, `[n]` for the last
/// dimension `n`, as one product `ones^T g` (candle's reduction over rows runs strided, many times
/// slower).
pub(super) fn column_sums(grad: &Tensor) -> Result<Tensor> {
    let n = grad.dim(candle_core::D::Minus1)?;
    let rows = grad.elem_count() / n.max(1);
    let ones = Tensor::ones((1, rows), grad.dtype(), grad.device())?;
    matmul(&ones, &grad.contiguous()?.reshape((rows, n))?)?.reshape(n)
}

/// The threads of candle's pool, the caller included. Read once: candle's `get_num_threads`
/// parses `/proc/cpuinfo` on every call (5% of a tiny-UNet profile when called per product).
pub(super) fn pool_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// `rows[i] += bias` for every row of `rows` (`bias.len()` columns each).
pub(super) fn add_bias_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len().max(1)) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += *b;
        }
    }
}

/// Every problem's `m x n` result, one after the other, plus `bias` (`n` values) on every row
/// when given, each piece's bias added while its result is still in cache. Split into about two
/// pieces per pool thread: whole problems when there are enough, else bands of rows, each written
/// straight into fresh memory by the worker given it (`Pieces::take_product`), or of columns, into
/// scratch, when the result is wide and short, as a bias gradient's `1 x C`.
fn run(problems: &[Problem<'_>], m: usize, n: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    if bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!("matmul: a bias of {n} values expected");
    }
    let k = problems.first().map_or(0, |p| p.a.cols);
    let threads = pool_threads();
    let flops = problems.len() * m * n * k;
    let len = problems.len() * m * n;
    if threads == 1 || flops < PARALLEL_MIN_FLOPS || m * n == 0 {
        let mut out = vec![0f32; len];
        for (p, c) in problems.iter().zip(out.chunks_mut((m * n).max(1))) {
            imagegen_gemm::sgemm(p.a, p.b, c, n).map_err(gemm_error)?;
            if let Some(bias) = bias {
                add_bias_rows(c, bias);
            }
        }
        return Ok(out);
    }
    let pieces_per_problem = (2 * threads).div_ceil(problems.len());
    let error = Mutex::new(None);
    let fail = |e: GemmError| {
        if let Ok(mut slot) = error.lock() {
            slot.get_or_insert(e);
        }
    };
    let out = if pieces_per_problem <= 1 || m >= n {
        // Bands of rows: task `t` writes piece `t`, a contiguous slice of the output.
        let band = m.div_ceil(pieces_per_problem).max(1);
        let bands_per_problem = m.div_ceil(band);
        let pieces = imagegen_gemm::nested_pieces(len, m * n, band * n);
        let (out, ()) = imagegen_gemm::fresh_buffer(len, pieces, |bands| {
            candle_core::utils::barrier_pool().execute_chunked(bands.len(), |range| {
                for t in range {
                    let (p, i) = (&problems[t / bands_per_problem], t % bands_per_problem);
                    let a = MatRef {
                        data: &p.a.data[(i * band * p.a.row_stride).min(p.a.data.len())..],
                        rows: band.min(m - i * band),
                        ..p.a
                    };
                    match bands.take_product(t, a, p.b) {
                        Ok(Some(c)) => {
                            if let Some(bias) = bias {
                                add_bias_rows(c, bias);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => fail(e),
                    }
                }
            });
        });
        out
    } else {
        // Bands of columns, each into its own scratch, copied into place after.
        let mut out = vec![0f32; len];
        let band = n.div_ceil(pieces_per_problem).max(1);
        let mut tasks = Vec::new();
        for (pi, p) in problems.iter().enumerate() {
            for start in (0..n).step_by(band) {
                let cols = band.min(n - start);
                let b = MatRef {
                    data: &p.b.data[(start * p.b.col_stride).min(p.b.data.len())..],
                    cols,
                    ..p.b
                };
                tasks.push(Mutex::new((pi, start, p.a, b, vec![0f32; m * cols])));
            }
        }
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            for t in range {
                if let Ok(mut task) = tasks[t].lock() {
                    let (_, start, a, b, ref mut c) = *task;
                    match imagegen_gemm::sgemm(a, b, c, b.cols) {
                        Ok(()) => {
                            if let Some(bias) = bias {
                                add_bias_rows(c, &bias[start..start + b.cols]);
                            }
                        }
                        Err(e) => fail(e),
                    }
                }
            }
        });
        for task in tasks {
            let (pi, start, _, b, scratch) = task
                .into_inner()
                .map_err(|_| candle_core::Error::Msg("matmul: a worker panicked".into()))?;
            let block = &mut out[pi * m * n..][..m * n];
            for (dst, src) in block.chunks_mut(n).zip(scratch.chunks(b.cols)) {
                dst[start..start + b.cols].copy_from_slice(src);
            }
        }
        out
    };
    match error.into_inner() {
        Ok(None) => Ok(out),
        Ok(Some(e)) => Err(gemm_error(e)),
        Err(_) => candle_core::bail!("matmul: a worker panicked"),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::model::nn::{input, max_abs_diff};

    fn t(shape: (usize, usize, usize, usize), phase: f64) -> Tensor {
        (input(shape) + phase).unwrap().sin().unwrap()
    }

    /// [[1,2,3],[4,5,6]] [[7,8],[9,10],[11,12]] = [[58,64],[139,154]] (by hand).
    #[test]
    fn a_product_by_hand() {
        let a = Tensor::arange(1f32, 7.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(7f32, 13.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let c = matmul(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(c, [[58.0, 64.0], [139.0, 154.0]]);
    }

    /// The same matrices stored column-major: a transposed view over a transposed copy.
    fn column_major(t: &Tensor) -> Tensor {
        let copy = t.transpose(2, 3).unwrap().contiguous().unwrap();
        copy.transpose(2, 3).unwrap()
    }

    /// Batched, transposed and narrowed views, shapes that split into row and column bands and
    /// ones that run on one thread: all equal candle's matmul.
    #[test]
    fn equals_candles_matmul_on_views_and_every_split() {
        let cases = [
            // (a, b) before views; tiny, row bands, column bands (1 x wide), batched.
            (t((1, 1, 3, 5), 0.0), t((1, 1, 5, 4), 1.0)),
            (t((1, 1, 300, 64), 0.0), t((1, 1, 64, 40), 1.0)),
            (t((1, 1, 1, 700), 0.0), t((1, 1, 700, 640), 1.0)),
            (t((2, 3, 130, 24), 0.0), t((2, 3, 24, 77), 1.0)),
        ];
        for (a, b) in cases {
            let want = a.matmul(&b).unwrap();
            assert!(max_abs_diff(&matmul(&a, &b).unwrap(), &want) < 1e-4);
            // The same product through transposed views (strides, no copies).
            let (at, bt) = (column_major(&a), column_major(&b));
            assert!(max_abs_diff(&matmul(&at, &bt).unwrap(), &want) < 1e-4);
        }
        // A narrowed batch (offset storage) and a 2-D product against a transposed weight.
        let a = t((1, 4, 50, 30), 0.0).narrow(1, 1, 2).unwrap();
        let b = t((1, 4, 30, 20), 1.0).narrow(1, 2, 2).unwrap();
        assert!(max_abs_diff(&matmul(&a, &b).unwrap(), &a.matmul(&b).unwrap()) < 1e-4);
        let x = t((1, 1, 600, 33), 0.0)
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let w = t((1, 1, 17, 33), 2.0)
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let wt = w.t().unwrap();
        assert!(max_abs_diff(&matmul(&x, &wt).unwrap(), &x.matmul(&wt).unwrap()) < 1e-4);
    }

    #[test]
    fn shapes_that_do_not_multiply_are_refused() {
        let a = t((1, 1, 3, 5), 0.0).squeeze(0).unwrap();
        let b = t((1, 1, 4, 5), 0.0).squeeze(0).unwrap();
        assert!(matmul(&a, &b).is_err());
    }

    /// Both operands' gradients equal those of candle's matmul, for batched operands.
    #[test]
    fn gradients_match_candle() {
        let a = Var::from_tensor(&t((1, 2, 70, 9), 0.0).squeeze(0).unwrap()).unwrap();
        let b = Var::from_tensor(&t((1, 2, 9, 300), 1.0).squeeze(0).unwrap()).unwrap();
        let r = t((1, 2, 70, 300), 2.0).squeeze(0).unwrap();
        let grads = |y: Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [a.as_tensor(), b.as_tensor()].map(|v| g.get(v).unwrap().clone())
        };
        let ours = grads(matmul(&a, &b).unwrap());
        let candle = grads(a.matmul(&b).unwrap());
        for (o, c) in ours.iter().zip(&candle) {
            assert!(max_abs_diff(o, c) < 1e-3, "{}", max_abs_diff(o, c));
        }
    }
}
