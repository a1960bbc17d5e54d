//! Scaled dot-product attention with the softmax fused between the two products, on the CPU:
//! per batch item and band of query rows, for each head, `S = Q K^T` into a scratch that stays
//! in cache, the exponentials in place, `O = S V` straight into the output, then the softmax's
//! denominators on the `dv` outputs. The `[B, heads, N, M]` score and probability tensors never
//! exist (at SD-1.5's 64x64 latent they are 512 MiB per layer and image), nor the passes over
//! them, nor the copies between the heads-last layout the projections use and a heads-first one.
//! The backward recomputes the probabilities band by band (as flash attention's does) instead of
//! keeping them for the whole graph: training memory is then that of q, k, v and the output.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use imagegen_gemm::{GemmError, MatRef};

use super::simd::vectorized;
use super::{Mode, matmul, softmax_last_dim};

/// Multi-head `softmax(scale q k^T) v` in the projections' layout: `q` `[B, N, heads * d]`, `k`
/// `[B, M, heads * d]`, `v` `[B, M, heads * dv]`, any strides; `[B, N, heads * dv]`. Fused on
/// the CPU in f32, in both modes (the policy and the frozen reference of a training step must
/// run the same kernels); the composite of [`matmul`] and [`softmax_last_dim`] elsewhere.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mode: Mode,
) -> Result<Tensor> {
    let shape = Shapes::of(q.dims(), k.dims(), v.dims(), heads)?;
    let fused = super::cpu_kernel_for(q, &[DType::F32])
        && [k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !fused {
        return composite(q, k, v, shape, scale, mode);
    }
    let op = FusedAttention {
        heads,
        scale: scale as f32,
    };
    // Serving builds no graph, as every fused kernel of `Mode::Inference`.
    if mode == Mode::Training && (q.track_op() || k.track_op() || v.track_op()) {
        q.apply_op3(k, v, op)
    } else {
        q.apply_op3_no_bwd(k, v, &op)
    }
}

/// The sizes of one attention call, checked.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    d: usize,
    dv: usize,
}

impl Shapes {
    fn of(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<Self> {
        let fits = q.len() == 3
            && k.len() == 3
            && v.len() == 3
            && heads > 0
            && q[0] == k[0]
            && k[0] == v[0]
            && q[2] == k[2]
            && k[1] == v[1]
            && q[2].is_multiple_of(heads)
            && v[2].is_multiple_of(heads);
        if !fits {
            candle_core::bail!(
                "attention: q {q:?}, k {k:?}, v {v:?} do not fit together as [batch, tokens, \
                 {heads} heads x dim]"
            );
        }
        if k[1] == 0 {
            candle_core::bail!("attention over no keys: k is {k:?}");
        }
        Ok(Self {
            batch: q[0],
            n: q[1],
            m: k[1],
            heads,
            d: q[2] / heads,
            dv: v[2] / heads,
        })
    }
}

/// The portable path: the products and the softmax as separate tensors, heads first.
fn composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: Shapes,
    scale: f64,
    mode: Mode,
) -> Result<Tensor> {
    let heads_first = |t: &Tensor, len: usize, dim: usize| {
        t.reshape((s.batch, len, s.heads, dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = (heads_first(q, s.n, s.d)? * scale)?;
    let (k, v) = (heads_first(k, s.m, s.d)?, heads_first(v, s.m, s.dv)?);
    let scores = matmul(&q, &k.t()?)?;
    let dtype = scores.dtype();
    // Scores and softmax in f32 for half-precision weights (diffusers' upcast_attention).
    let probs = if matches!(dtype, DType::F16 | DType::BF16) {
        softmax_last_dim(&scores.to_dtype(DType::F32)?, mode)?.to_dtype(dtype)?
    } else {
        softmax_last_dim(&scores, mode)?
    };
    matmul(&probs, &v)?
        .transpose(1, 2)?
        .reshape((s.batch, s.n, s.heads * s.dv))
}

/// Scratch of about this many scores per band (1 MiB: an L2's worth).
const BAND_SCORES: usize = 1 << 18;

#[derive(Debug, Clone, Copy)]
struct FusedAttention {
    heads: usize,
    scale: f32,
}

/// Query rows per band: the band's `rows x m` scores fill about [`BAND_SCORES`], and small
/// calls still split into a few bands per pool thread.
fn band_rows(s: Shapes) -> usize {
    let per_thread = (s.batch * s.n).div_ceil(2 * super::matmul::pool_threads());
    (BAND_SCORES / s.m.max(1))
        .clamp(16, 256)
        .min(per_thread)
        .min(s.n)
        .max(1)
}

/// A row-major `rows x cols` matrix with rows `ld` apart.
fn strided(data: &[f32], rows: usize, cols: usize, ld: usize) -> MatRef<'_> {
    MatRef {
        data,
        rows,
        cols,
        row_stride: ld,
        col_stride: 1,
    }
}

/// The transpose of `x`, as a view.
fn transpose(x: MatRef<'_>) -> MatRef<'_> {
    MatRef {
        rows: x.cols,
        cols: x.rows,
        row_stride: x.col_stride,
        col_stride: x.row_stride,
        ..x
    }
}

/// Head `head` of batch item `item`, rows `rows`, of a `[B, T, heads * dim]` tensor's storage.
fn head_view<'a>(
    data: &'a [f32],
    layout: &Layout,
    item: usize,
    head: usize,
    rows: std::ops::Range<usize>,
    dim: usize,
) -> MatRef<'a> {
    let st = layout.stride();
    let start = layout.start_offset() + item * st[0] + rows.start * st[1] + head * dim * st[2];
    MatRef {
        data: data.get(start..).unwrap_or(&[]),
        rows: rows.len(),
        cols: dim,
        row_stride: st[1],
        col_stride: st[2],
    }
}

/// Rows `first..first + rows` of head `head` in a contiguous `[tokens, width]` buffer.
fn head_rows(
    data: &[f32],
    first: usize,
    rows: usize,
    width: usize,
    head: usize,
    dim: usize,
) -> MatRef<'_> {
    strided(
        data.get(first * width + head * dim..).unwrap_or(&[]),
        rows,
        dim,
        width,
    )
}

/// Runs `work` on every task over candle's pool; the first error wins.
fn on_pool<T: Send>(
    tasks: &[Mutex<T>],
    scratch: impl Fn() -> (Vec<f32>, Vec<f32>) + Sync,
    work: impl Fn(&mut T, &mut (Vec<f32>, Vec<f32>)) -> std::result::Result<(), GemmError> + Sync,
) -> Result<()> {
    let error = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let mut buffers = scratch();
        for t in range {
            let Ok(mut task) = tasks[t].lock() else {
                continue;
            };
            if let Err(e) = work(&mut task, &mut buffers)
                && let Ok(mut slot) = error.lock()
            {
                slot.get_or_insert(e);
            }
        }
    });
    match error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => candle_core::bail!("attention: {e}"),
        Err(_) => candle_core::bail!("attention: a worker panicked"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("attention: f32 operands expected");
        };
        let s = Shapes::of(lq.dims(), lk.dims(), lv.dims(), self.heads)?;
        let width = s.heads * s.dv;
        let len = s.batch * s.n * width;
        let shape = Shape::from((s.batch, s.n, width));
        if len == 0 {
            return Ok((CpuStorage::F32(Vec::new()), shape));
        }
        let band = band_rows(s);
        // Tasks are groups of bands of one item (all heads of each row: a contiguous block of
        // the output); within a group, head by head, so that the head's K and V stay in cache
        // over the group's bands (band by band over all heads streamed every head's K and V
        // from memory for each band: SD-1.5's 64x64 attention ran 1.3x slower).
        let groups = (2 * super::matmul::pool_threads())
            .div_ceil(s.batch)
            .min(s.n.div_ceil(band))
            .max(1);
        let group_rows = s.n.div_ceil(groups).div_ceil(band) * band;
        // Task `t` writes piece `t` of the output, zeroed by the worker that takes it.
        let groups_per_item = s.n.div_ceil(group_rows);
        let tasks: Vec<Mutex<(usize, usize, usize)>> = (0..s.batch * groups_per_item)
            .map(|t| Mutex::new((t, t / groups_per_item, (t % groups_per_item) * group_rows)))
            .collect();
        let pieces = imagegen_gemm::nested_pieces(len, s.n * width, group_rows * width);
        let scale = self.scale;
        let (out, done) = imagegen_gemm::fresh_buffer(len, pieces, |out| {
            on_pool(
                &tasks,
                || (Vec::new(), Vec::new()),
                |&mut (t, item, first), (scores, sums)| {
                    let Some(o) = out.take(t) else {
                        return Ok(());
                    };
                    let group = o.len() / width;
                    for h in 0..s.heads {
                        let kh = head_view(k, lk, item, h, 0..s.m, s.d);
                        let vh = head_view(v, lv, item, h, 0..s.m, s.dv);
                        for start in (0..group).step_by(band) {
                            let rows = band.min(group - start);
                            let row0 = first + start;
                            let qb = head_view(q, lq, item, h, row0..row0 + rows, s.d);
                            scores.resize(rows * s.m, 0.0);
                            imagegen_gemm::sgemm(qb, transpose(kh), scores, s.m)?;
                            sums.clear();
                            vectorized(
                                #[inline(always)]
                                || {
                                    for row in scores.chunks_mut(s.m) {
                                        sums.push(super::activation::exp_row_in_place(row, scale));
                                    }
                                },
                            );
                            let oh = &mut o[start * width + h * s.dv..];
                            imagegen_gemm::sgemm(strided(scores, rows, s.m, s.m), vh, oh, width)?;
                            // The softmax's denominators, on the dv outputs, not the m scores.
                            for (row, sum) in oh.chunks_mut(width).zip(sums.iter()) {
                                let inv = 1.0 / sum;
                                row[..s.dv].iter_mut().for_each(|x| *x *= inv);
                            }
                        }
                    }
                    Ok(())
                },
            )
        });
        done?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = backward(q, k, v, out, d_out, self.heads, self.scale)?;
        let keep = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((keep(q, dq), keep(k, dk), keep(v, dv)))
    }
}

/// A contiguous f32 copy of `t` (the backward's operands are a few `N x d`, never `N x M`).
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// One piece of the backward: a group of one batch item's query rows.
struct BackwardTask<'a> {
    item: usize,
    first_row: usize,
    /// This group's rows of `dQ` (all heads).
    dq: &'a mut [f32],
    /// This group's share of the item's `dK` and `dV`, summed over groups afterwards.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The gradients of the attention with respect to `q`, `k` and `v`, from the output and its
/// gradient: per band of query rows and head, `P` recomputed, `dV += P^T dO`, `dP = dO V^T`,
/// `dS = P (dP - rowsum(dO * O))`, `dQ = scale dS K`, `dK += scale dS^T Q`.
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = Shapes::of(q.dims(), k.dims(), v.dims(), heads)?;
    let (qs, ks, vs, os, gs) = (
        host_values(q)?,
        host_values(k)?,
        host_values(v)?,
        host_values(out)?,
        host_values(d_out)?,
    );
    let (wq, wv) = (s.heads * s.d, s.heads * s.dv);
    let band = band_rows(s);
    // Enough groups to keep every pool thread busy when the batch is small; each group keeps
    // its own dK and dV (`M x heads*d`), so no more than that.
    let groups = super::matmul::pool_threads()
        .div_ceil(s.batch.max(1))
        .min(s.n.div_ceil(band))
        .max(1);
    let group_rows = s.n.div_ceil(groups).div_ceil(band) * band;
    let mut dq_all = vec![0f32; s.batch * s.n * wq];
    let tasks: Vec<Mutex<BackwardTask<'_>>> = dq_all
        .chunks_mut((s.n * wq).max(1))
        .enumerate()
        .flat_map(|(item, dq_item)| {
            dq_item
                .chunks_mut((group_rows * wq).max(1))
                .enumerate()
                .map(move |(g, dq)| {
                    Mutex::new(BackwardTask {
                        item,
                        first_row: g * group_rows,
                        dq,
                        dk: vec![0f32; s.m * wq],
                        dv: vec![0f32; s.m * wv],
                    })
                })
        })
        .collect();
    on_pool(
        &tasks,
        || (Vec::new(), Vec::new()),
        |task, (probs, d_scores)| {
            let kv0 = task.item * s.m;
            let rows_in_group = task.dq.len() / wq.max(1);
            // Head by head, so that the head's K and V stay in cache over the bands.
            for h in 0..s.heads {
                let kh = head_rows(&ks, kv0, s.m, wq, h, s.d);
                let vh = head_rows(&vs, kv0, s.m, wv, h, s.dv);
                for start in (0..rows_in_group).step_by(band) {
                    let rows = band.min(rows_in_group - start);
                    let row0 = task.item * s.n + task.first_row + start;
                    probs.resize(rows * s.m, 0.0);
                    d_scores.resize(rows * s.m, 0.0);
                    let qb = head_rows(&qs, row0, rows, wq, h, s.d);
                    let gb = head_rows(&gs, row0, rows, wv, h, s.dv);
                    imagegen_gemm::sgemm(qb, transpose(kh), probs, s.m)?;
                    vectorized(
                        #[inline(always)]
                        || {
                            for row in probs.chunks_mut(s.m) {
                                let inv = 1.0 / super::activation::exp_row_in_place(row, scale);
                                row.iter_mut().for_each(|p| *p *= inv);
                            }
                        },
                    );
                    let p = strided(probs, rows, s.m, s.m);
                    imagegen_gemm::sgemm_accumulate(
                        transpose(p),
                        gb,
                        &mut task.dv[h * s.dv..],
                        wv,
                    )?;
                    imagegen_gemm::sgemm(gb, transpose(vh), d_scores, s.m)?;
                    vectorized(
                        #[inline(always)]
                        || {
                            for (i, (ds_row, p_row)) in
                                d_scores.chunks_mut(s.m).zip(probs.chunks(s.m)).enumerate()
                            {
                                let at_row = (row0 + i) * wv + h * s.dv;
                                let o_row = &os[at_row..at_row + s.dv];
                                let g_row = &gs[at_row..at_row + s.dv];
                                let dot: f32 = o_row.iter().zip(g_row).map(|(o, g)| o * g).sum();
                                for (ds, &p) in ds_row.iter_mut().zip(p_row) {
                                    *ds = scale * p * (*ds - dot);
                                }
                            }
                        },
                    );
                    let ds = strided(d_scores, rows, s.m, s.m);
                    imagegen_gemm::sgemm(ds, kh, &mut task.dq[start * wq + h * s.d..], wq)?;
                    imagegen_gemm::sgemm_accumulate(
                        transpose(ds),
                        qb,
                        &mut task.dk[h * s.d..],
                        wq,
                    )?;
                }
            }
            Ok(())
        },
    )?;
    let mut dk_all = vec![0f32; s.batch * s.m * wq];
    let mut dv_all = vec![0f32; s.batch * s.m * wv];
    for task in tasks {
        let task = task
            .into_inner()
            .map_err(|_| candle_core::Error::Msg("attention backward: a worker panicked".into()))?;
        let add = |into: &mut [f32], from: &[f32]| {
            into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
        };
        let (i, m) = (task.item, s.m);
        add(&mut dk_all[i * m * wq..(i + 1) * m * wq], &task.dk);
        add(&mut dv_all[i * m * wv..(i + 1) * m * wv], &task.dv);
    }
    let (device, dtype) = (q.device(), q.dtype());
    Ok((
        Tensor::from_vec(dq_all, q.shape(), device)?.to_dtype(dtype)?,
        Tensor::from_vec(dk_all, k.shape(), device)?.to_dtype(dtype)?,
        Tensor::from_vec(dv_all, v.shape(), device)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::{input, max_abs, max_abs_diff};
    use candle_core::Var;

    /// `[batch, tokens, width]` with values `f(sin(0.37 i) + shift)`.
    fn tokens(batch: usize, n: usize, width: usize, shift: f64) -> Tensor {
        let t = input((1, batch, n, width)).squeeze(0).unwrap();
        ((t + shift).unwrap().cos().unwrap() * 1.5).unwrap()
    }

    /// The fused kernel equals the composite (products and softmax as separate tensors, heads
    /// first) for bands that divide the rows and ones that do not, batches, one head and many,
    /// cross-attention (M != N, values wider than the keys) and a strided (transposed) query.
    #[test]
    fn fused_attention_equals_the_composite() {
        for (batch, heads, n, m, d, dv) in [
            (1, 2, 5, 5, 3, 3),
            (2, 8, 256, 256, 8, 8),
            (1, 3, 1100, 77, 16, 24),
            (3, 1, 64, 64, 32, 32),
        ] {
            let q = tokens(batch, n, heads * d, 0.0);
            let k = tokens(batch, m, heads * d, 0.3);
            let v = tokens(batch, m, heads * dv, 0.9);
            let s = Shapes::of(q.dims(), k.dims(), v.dims(), heads).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let fused = attention(&q, &k, &v, heads, scale, Mode::Inference).unwrap();
            let reference = composite(&q, &k, &v, s, scale, Mode::Training).unwrap();
            assert_eq!(fused.dims(), &[batch, n, heads * dv]);
            let diff = max_abs_diff(&fused, &reference);
            assert!(
                diff < 1e-5,
                "({batch}, {heads}, {n}, {m}): differ by {diff}"
            );
        }
        // A query that is a transposed view: [B, width, N] stored, read as [B, N, width].
        let stored = tokens(2, 12, 10, 0.1);
        let q = stored.transpose(1, 2).unwrap();
        let k = tokens(2, 10, 12, 0.5);
        let s = Shapes::of(q.dims(), k.dims(), k.dims(), 3).unwrap();
        let fused = attention(&q, &k, &k, 3, 0.5, Mode::Inference).unwrap();
        let reference =
            composite(&q.contiguous().unwrap(), &k, &k, s, 0.5, Mode::Training).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
    }

    /// The recomputing backward equals the composite's gradients, in q, k and v, with one
    /// item and one head (the rows split into groups over the pool), batches, bands that do not
    /// divide the rows, and cross-attention; an untracked operand gets none.
    #[test]
    fn fused_gradients_equal_the_composite_ones() {
        for (batch, heads, n, m, d, dv) in [
            (1, 1, 300, 300, 4, 4),
            (2, 3, 70, 77, 8, 12),
            (3, 2, 5, 5, 3, 3),
        ] {
            let var = |t: Tensor| Var::from_tensor(&t).unwrap();
            let q = var(tokens(batch, n, heads * d, 0.0));
            let k = var(tokens(batch, m, heads * d, 0.4));
            let v = var(tokens(batch, m, heads * dv, 0.9));
            let weights = input((1, batch, n, heads * dv)).squeeze(0).unwrap();
            let s = Shapes::of(q.dims(), k.dims(), v.dims(), heads).unwrap();
            let scale = 0.6;
            let grads = |fused: bool| {
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let y = if fused {
                    attention(qt, kt, vt, heads, scale, Mode::Training).unwrap()
                } else {
                    composite(qt, kt, vt, s, scale, Mode::Training).unwrap()
                };
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [&q, &k, &v].map(|x| g.get(x.as_tensor()).unwrap().clone())
            };
            let (fused, reference) = (grads(true), grads(false));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused.iter().zip(&reference)) {
                let scale = max_abs(b);
                let diff = max_abs_diff(a, b);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "({batch}, {heads}, {n}, {m}) d{name}: differ by {diff} (scale {scale})"
                );
            }
        }
        // Only the tracked operand gets a gradient; serving builds no graph.
        let q = Var::from_tensor(&tokens(1, 6, 6, 0.0)).unwrap();
        let k = tokens(1, 7, 6, 0.2);
        let y = attention(q.as_tensor(), &k, &k, 2, 1.0, Mode::Training).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some());
        assert!(g.get(&k).is_none());
        let y = attention(q.as_tensor(), &k, &k, 2, 1.0, Mode::Inference).unwrap();
        assert!(!y.track_op());
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let q = tokens(1, 4, 6, 0.0);
        let k = tokens(1, 5, 8, 0.0);
        let err = attention(&q, &k, &k, 2, 1.0, Mode::Inference).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let err = attention(&q, &q, &q, 4, 1.0, Mode::Inference).unwrap_err();
        assert!(err.to_string().contains("4 heads"), "{err}");
        let none = Tensor::zeros((1, 0, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
        let err = attention(&q, &none, &none, 2, 1.0, Mode::Inference).unwrap_err();
        assert!(err.to_string().contains("no keys"), "{err}");
    }
}
