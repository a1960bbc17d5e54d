//! Scaled dot-product attention with the softmax fused between the two products, for serving on
//! the CPU: per head and band of query rows, `S = Q K^T` into a scratch that stays in cache, the
//! softmax in place, `O = S V` straight into the output. The `[heads, N, M]` score and
//! probability tensors never exist (at SD-1.5's 64x64 latent they are 512 MiB per layer and
//! image), nor the three passes over them.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use imagegen_gemm::MatRef;

use super::{Mode, matmul, softmax_last_dim};

/// `softmax(q k^T) v` per head: `q` `[H, N, d]` (already scaled), `k` `[H, M, d]`, `v`
/// `[H, M, dv]`, any strides; `[H, N, dv]`. Fused on the CPU in f32 when nothing is
/// differentiated; the composite of [`matmul`] and [`softmax_last_dim`] otherwise.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mode: Mode) -> Result<Tensor> {
    let fused = mode == Mode::Inference
        && !(q.track_op() || k.track_op() || v.track_op())
        && super::cpu_kernel_for(q, &[DType::F32])
        && [k, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if fused {
        return q.apply_op3_no_bwd(k, v, &FusedAttention);
    }
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
        let band = (BAND_SCORES / m.max(1)).clamp(16, 256).min(n);
        let mut tasks = Vec::new();
        for (h, head_out) in out.chunks_mut(n * d_out).enumerate() {
            let (qh, kh, vh) = (
                head_view(q, lq, h)?,
                head_view(k, lk, h)?,
                head_view(v, lv, h)?,
            );
            let kt = MatRef {
                rows: kh.cols,
                cols: kh.rows,
                row_stride: kh.col_stride,
                col_stride: kh.row_stride,
                ..kh
            };
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
            let composite = attention(&q, &k, &v, Mode::Training).unwrap();
            assert_eq!(fused.dims(), &[heads, n, dv]);
            let diff = max_abs_diff(&fused, &composite);
            assert!(diff < 1e-5, "({heads}, {n}, {m}): differ by {diff}");
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let q = input((1, 2, 4, 3)).squeeze(0).unwrap();
        let k = input((1, 2, 5, 4)).squeeze(0).unwrap();
        assert!(attention(&q, &k, &k, Mode::Inference).is_err());
    }
}
