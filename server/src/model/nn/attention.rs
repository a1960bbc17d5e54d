//! Scaled dot-product attention with the softmax fused between the two products, on the CPU:
//! per head and band of query rows, `S = Q K^T` into a scratch that stays in cache, the softmax
//! in place, `O = S V` straight into the output. The `[heads, N, M]` score and probability
//! tensors never exist (at SD-1.5's 64x64 latent they are 512 MiB per layer and image), nor the
//! three passes over them. The backward recomputes the probabilities band by band (as flash
//! attention's does) instead of keeping them for the whole graph: training memory is then that
//! of q, k, v and the output.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use imagegen_gemm::MatRef;

use super::{Mode, matmul, softmax_last_dim};

/// `softmax(q k^T) v` per head: `q` `[H, N, d]` (already scaled), `k` `[H, M, d]`, `v`
/// `[H, M, dv]`, any strides; `[H, N, dv]`. Fused on the CPU in f32, in both modes (the policy
/// and the frozen reference of a training step must run the same kernels); the composite of
/// [`matmul`] and [`softmax_last_dim`] elsewhere.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mode: Mode) -> Result<Tensor> {
    let fused = super::cpu_kernel_for(q, &[DType::F32])
        && [k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !fused {
        return composite(q, k, v, mode);
    }
    if k.dim(1)? == 0 {
        candle_core::bail!("attention over no keys: k is {:?}", k.dims());
    }
    // Serving builds no graph, as every fused kernel of `Mode::Inference`.
    if mode == Mode::Training && (q.track_op() || k.track_op() || v.track_op()) {
        q.apply_op3(k, v, FusedAttention)
    } else {
        q.apply_op3_no_bwd(k, v, &FusedAttention)
    }
}

/// The portable path: the products and the softmax as separate tensors.
fn composite(q: &Tensor, k: &Tensor, v: &Tensor, mode: Mode) -> Result<Tensor> {
    let scores = matmul(q, &k.t()?)?;
    let dtype = scores.dtype();
    // Scores and softmax in f32 for half-precision weights (diffusers' upcast_attention).
    let probs = if matches!(dtype, DType::F16 | DType::BF16) {
        softmax_last_dim(&scores.to_dtype(DType::F32)?, mode)?.to_dtype(dtype)?
    } else {
        softmax_last_dim(&scores, mode)?
    };
    matmul(&probs, v)
}

/// Scratch of about this many scores per band (1 MiB: an L2's worth).
const BAND_SCORES: usize = 1 << 18;

#[derive(Debug, Clone, Copy)]
struct FusedAttention;

/// Query rows per band: the band's `rows x m` scores fill about [`BAND_SCORES`].
fn band_rows(n: usize, m: usize) -> usize {
    (BAND_SCORES / m.max(1)).clamp(16, 256).min(n).max(1)
}

fn head_view<'a>(data: &'a [f32], layout: &Layout, head: usize) -> Result<MatRef<'a>> {
    let (dims, strides) = (layout.dims(), layout.stride());
    if dims.len() != 3 {
        candle_core::bail!("attention: [heads, tokens, dim] expected, got {dims:?}");
    }
    let start = layout.start_offset() + head * strides[0];
    Ok(MatRef {
        data: data.get(start..).unwrap_or(&[]),
        rows: dims[1],
        cols: dims[2],
        row_stride: strides[1],
        col_stride: strides[2],
    })
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
        let (dq, dk, dv) = (lq.dims(), lk.dims(), lv.dims());
        if dq.len() != 3
            || dk.len() != 3
            || dv.len() != 3
            || dq[0] != dk[0]
            || dk[0] != dv[0]
            || dq[2] != dk[2]
            || dk[1] != dv[1]
        {
            candle_core::bail!("attention: q {dq:?}, k {dk:?}, v {dv:?} do not fit together");
        }
        let (heads, n, m, d_out) = (dq[0], dq[1], dk[1], dv[2]);
        let mut out = vec![0f32; heads * n * d_out];
        if n * d_out == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((heads, n, d_out))));
        }
        let band = band_rows(n, m);
        let mut tasks = Vec::new();
        for (h, head_out) in out.chunks_mut(n * d_out).enumerate() {
            let (qh, kh, vh) = (
                head_view(q, lq, h)?,
                head_view(k, lk, h)?,
                head_view(v, lv, h)?,
            );
            let kt = transpose(kh);
            for (i, rows) in head_out.chunks_mut(band * d_out).enumerate() {
                let qb = MatRef {
                    data: qh.data.get(i * band * qh.row_stride..).unwrap_or(&[]),
                    rows: rows.len() / d_out,
                    ..qh
                };
                tasks.push(Mutex::new((qb, kt, vh, rows)));
            }
        }
        let error = Mutex::new(None);
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            let mut scores = Vec::new();
            for t in range {
                let Ok(mut task) = tasks[t].lock() else {
                    continue;
                };
                let (qb, kt, vh, ref mut rows) = *task;
                scores.resize(qb.rows * m, 0f32);
                let mut run = || -> std::result::Result<(), imagegen_gemm::GemmError> {
                    imagegen_gemm::sgemm(qb, kt, &mut scores, m)?;
                    scores
                        .chunks_mut(m)
                        .for_each(super::activation::softmax_row_in_place);
                    let probs = MatRef {
                        data: &scores,
                        rows: qb.rows,
                        cols: m,
                        row_stride: m,
                        col_stride: 1,
                    };
                    imagegen_gemm::sgemm(probs, vh, rows, d_out)
                };
                if let Err(e) = run()
                    && let Ok(mut slot) = error.lock()
                {
                    slot.get_or_insert(e);
                }
            }
        });
        drop(tasks);
        match error.into_inner() {
            Ok(None) => Ok((CpuStorage::F32(out), Shape::from((heads, n, d_out)))),
            Ok(Some(e)) => candle_core::bail!("attention: {e}"),
            Err(_) => candle_core::bail!("attention: a worker panicked"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = backward(q, k, v, out, d_out)?;
        let keep = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((keep(q, dq), keep(k, dk), keep(v, dv)))
    }
}

/// A contiguous f32 copy of `t` (the backward's operands are a few `N x d`, never `N x M`).
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// A row-major `rows x cols` matrix.
fn dense(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef {
        data,
        rows,
        cols,
        row_stride: cols,
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

/// One piece of the backward: a band group of one head's query rows.
struct BackwardTask<'a> {
    head: usize,
    first_row: usize,
    /// This group's rows of `dQ`.
    dq: &'a mut [f32],
    /// This group's share of the head's `dK` and `dV`, summed over groups afterwards.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The gradients of `softmax(q k^T) v` with respect to `q`, `k` and `v`, from the output and its
/// gradient: per band of query rows, `P` recomputed, `dV += P^T dO`, `dP = dO V^T`,
/// `dS = P (dP - rowsum(dO * O))`, `dQ = dS K`, `dK += dS^T Q`.
fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (heads, n, d) = q.dims3()?;
    let (m, d_v) = (k.dim(1)?, v.dim(2)?);
    let (qs, ks, vs, os, gs) = (
        host_values(q)?,
        host_values(k)?,
        host_values(v)?,
        host_values(out)?,
        host_values(d_out)?,
    );
    let band = band_rows(n, m);
    // Enough groups to keep every pool thread busy when there are few heads.
    let groups = super::matmul::pool_threads()
        .div_ceil(heads.max(1))
        .min(n.div_ceil(band))
        .max(1);
    let group_rows = n.div_ceil(groups).div_ceil(band) * band;
    let mut dq_all = vec![0f32; heads * n * d];
    let tasks: Vec<Mutex<BackwardTask<'_>>> = dq_all
        .chunks_mut((n * d).max(1))
        .enumerate()
        .flat_map(|(head, dq_head)| {
            dq_head
                .chunks_mut((group_rows * d).max(1))
                .enumerate()
                .map(move |(g, dq)| {
                    Mutex::new(BackwardTask {
                        head,
                        first_row: g * group_rows,
                        dq,
                        dk: vec![0f32; m * d],
                        dv: vec![0f32; m * d_v],
                    })
                })
        })
        .collect();
    let error = Mutex::new(None);
    let run_task = |task: &mut BackwardTask<'_>,
                    probs: &mut Vec<f32>,
                    d_scores: &mut Vec<f32>|
     -> std::result::Result<(), imagegen_gemm::GemmError> {
        let h = task.head;
        let kh = dense(&ks[h * m * d..(h + 1) * m * d], m, d);
        let vh = dense(&vs[h * m * d_v..(h + 1) * m * d_v], m, d_v);
        let group = task.dq.len() / d.max(1);
        for start in (0..group).step_by(band) {
            let rows = band.min(group - start);
            let row0 = h * n + task.first_row + start;
            let qb = dense(&qs[row0 * d..(row0 + rows) * d], rows, d);
            let ob = &os[row0 * d_v..(row0 + rows) * d_v];
            let gb = dense(&gs[row0 * d_v..(row0 + rows) * d_v], rows, d_v);
            probs.resize(rows * m, 0.0);
            d_scores.resize(rows * m, 0.0);
            imagegen_gemm::sgemm(qb, transpose(kh), probs, m)?;
            probs
                .chunks_mut(m)
                .for_each(super::activation::softmax_row_in_place);
            let p = dense(probs, rows, m);
            imagegen_gemm::sgemm_accumulate(transpose(p), gb, &mut task.dv, d_v)?;
            imagegen_gemm::sgemm(gb, transpose(vh), d_scores, m)?;
            for (i, (ds_row, p_row)) in d_scores.chunks_mut(m).zip(probs.chunks(m)).enumerate() {
                let o_row = &ob[i * d_v..(i + 1) * d_v];
                let g_row = &gb.data[i * d_v..(i + 1) * d_v];
                let dot: f32 = o_row.iter().zip(g_row).map(|(o, g)| o * g).sum();
                for (ds, &p) in ds_row.iter_mut().zip(p_row) {
                    *ds = p * (*ds - dot);
                }
            }
            let ds = dense(d_scores, rows, m);
            imagegen_gemm::sgemm(ds, kh, &mut task.dq[start * d..(start + rows) * d], d)?;
            imagegen_gemm::sgemm_accumulate(transpose(ds), qb, &mut task.dk, d)?;
        }
        Ok(())
    };
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        let (mut probs, mut d_scores) = (Vec::new(), Vec::new());
        for t in range {
            let Ok(mut task) = tasks[t].lock() else {
                continue;
            };
            if let Err(e) = run_task(&mut task, &mut probs, &mut d_scores)
                && let Ok(mut slot) = error.lock()
            {
                slot.get_or_insert(e);
            }
        }
    });
    match error.into_inner() {
        Ok(None) => {}
        Ok(Some(e)) => candle_core::bail!("attention backward: {e}"),
        Err(_) => candle_core::bail!("attention backward: a worker panicked"),
    }
    let mut dk_all = vec![0f32; heads * m * d];
    let mut dv_all = vec![0f32; heads * m * d_v];
    for task in tasks {
        let task = task
            .into_inner()
            .map_err(|_| candle_core::Error::Msg("attention backward: a worker panicked".into()))?;
        let h = task.head;
        let add =
            |into: &mut [f32], from: &[f32]| into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
        add(&mut dk_all[h * m * d..(h + 1) * m * d], &task.dk);
        add(&mut dv_all[h * m * d_v..(h + 1) * m * d_v], &task.dv);
    }
    let device = q.device();
    let dtype = q.dtype();
    Ok((
        Tensor::from_vec(dq_all, (heads, n, d), device)?.to_dtype(dtype)?,
        Tensor::from_vec(dk_all, (heads, m, d), device)?.to_dtype(dtype)?,
        Tensor::from_vec(dv_all, (heads, m, d_v), device)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::{input, max_abs_diff};

    fn heads_view(t: Tensor, tokens: usize, heads: usize, dim: usize) -> Tensor {
        // [tokens, heads * dim] -> [heads, tokens, dim]: the strided view the UNet passes.
        t.reshape((tokens, heads, dim))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
    }

    /// The fused kernel equals the composite (products and softmax as separate tensors) on the
    /// UNet's strided head views, for bands that divide the rows and ones that do not, and for
    /// cross-attention (M != N, values wider than the keys).
    #[test]
    fn fused_attention_equals_the_composite() {
        for (heads, n, m, d, dv) in [(2, 5, 5, 3, 3), (8, 256, 256, 8, 8), (3, 1100, 77, 16, 24)] {
            let q = (input((1, 1, n, heads * d))
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                * 0.7)
                .unwrap();
            let k = (input((1, 1, m, heads * d))
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                + 0.3)
                .unwrap()
                .cos()
                .unwrap();
            let v = (input((1, 1, m, heads * dv))
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                * 1.3)
                .unwrap();
            let (q, k, v) = (
                heads_view(q, n, heads, d),
                heads_view(k, m, heads, d),
                heads_view(v, m, heads, dv),
            );
            let fused = attention(&q, &k, &v, Mode::Inference).unwrap();
            let composite = composite(&q, &k, &v, Mode::Training).unwrap();
            assert_eq!(fused.dims(), &[heads, n, dv]);
            let diff = max_abs_diff(&fused, &composite);
            assert!(diff < 1e-5, "({heads}, {n}, {m}): differ by {diff}");
        }
    }

    /// The recomputing backward equals the composite's gradients, in q, k and v, through
    /// strided head views, with one head (the rows split into groups over the pool), bands that
    /// do not divide the rows, and cross-attention; an untracked operand gets none.
    #[test]
    fn fused_gradients_equal_the_composite_ones() {
        use candle_core::Var;
        for (heads, n, m, d, dv) in [(1, 300, 300, 4, 4), (3, 70, 77, 8, 12), (2, 5, 5, 3, 3)] {
            let make = |tokens: usize, dim: usize, shift: f64| {
                let t = input((1, 1, tokens, heads * dim))
                    .squeeze(0)
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                Var::from_tensor(&((t + shift).unwrap().cos().unwrap() * 1.5).unwrap()).unwrap()
            };
            let (q, k, v) = (make(n, d, 0.0), make(m, d, 0.4), make(m, dv, 0.9));
            let weights = heads_view(
                input((1, 1, n, heads * dv))
                    .squeeze(0)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
                n,
                heads,
                dv,
            );
            let grads = |fused: bool| {
                let (qh, kh, vh) = (
                    heads_view(q.as_tensor().clone(), n, heads, d),
                    heads_view(k.as_tensor().clone(), m, heads, d),
                    heads_view(v.as_tensor().clone(), m, heads, dv),
                );
                let y = if fused {
                    attention(&qh, &kh, &vh, Mode::Training).unwrap()
                } else {
                    composite(&qh, &kh, &vh, Mode::Training).unwrap()
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
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = max_abs_diff(a, b);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "({heads}, {n}, {m}) d{name}: differ by {diff} (scale {scale})"
                );
            }
        }
        // Only the tracked operand gets a gradient.
        let q = Var::from_tensor(&input((1, 2, 6, 3)).squeeze(0).unwrap()).unwrap();
        let k = input((1, 2, 7, 3)).squeeze(0).unwrap();
        let y = attention(q.as_tensor(), &k, &k, Mode::Training).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some());
        assert!(g.get(&k).is_none());
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let q = input((1, 2, 4, 3)).squeeze(0).unwrap();
        let k = input((1, 2, 5, 4)).squeeze(0).unwrap();
        assert!(attention(&q, &k, &k, Mode::Inference).is_err());
        let none = Tensor::zeros((2, 0, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = input((1, 2, 4, 3)).squeeze(0).unwrap();
        let err = attention(&q, &none, &none, Mode::Inference).unwrap_err();
        assert!(err.to_string().contains("no keys"), "{err}");
    }
}
