//! Element-wise CPU kernels compiled for the widest vectors the CPU has, chosen at run time.
//!
//! The workspace builds for baseline x86-64 (SSE2: four f32 lanes), so that one binary runs on
//! every x86-64 CPU. The kernels' loops (exponentials, norms, activations) vectorise, but only as
//! wide as the build allows: the attention's exponentials were 19.5% of a tiny-model profile at
//! four lanes. [`vectorized`] runs a closure inside a function compiled for AVX-512 or AVX2+FMA
//! when the CPU has them (`pulp`'s dispatch, which checks the CPU once), so the loops inlined into
//! it use 16 or 8 lanes. The code and the order of every sum are the same on each path; the
//! policy and reference forwards of D3PO run on one machine and so on one path (d3po.md's
//! same-kernel pitfall).

use std::sync::OnceLock;

/// The instruction set the kernels run with on this CPU.
fn arch() -> pulp::Arch {
    static ARCH: OnceLock<pulp::Arch> = OnceLock::new();
    *ARCH.get_or_init(|| {
        capped(
            pulp::Arch::new(),
            std::env::var("IMAGEGEN_SIMD").ok().as_deref(),
        )
    })
}

/// `IMAGEGEN_SIMD=avx2` or `baseline` caps the instruction set below what the CPU has, so that
/// the narrower paths can be measured side by side on a wider CPU; it never widens it.
fn capped(detected: pulp::Arch, cap: Option<&str>) -> pulp::Arch {
    match cap {
        Some("baseline") => pulp::Arch::Scalar,
        #[cfg(target_arch = "x86_64")]
        Some("avx2") if matches!(detected, pulp::Arch::V4(_)) => {
            pulp::x86::V3::try_new().map_or(pulp::Arch::Scalar, pulp::Arch::V3)
        }
        _ => detected,
    }
}

/// Runs `f` compiled for the CPU's widest vectors. `f` itself and everything it calls must be
/// inlined to be compiled with them (`vectorized(#[inline(always)] || ...)`, kernels marked
/// `#[inline(always)]`, plain loops rather than `map`/`fold` closures): a call that is not
/// inlined runs baseline code.
/// Call it once per band of work, not per element (the dispatch is a branch and a call).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    arch().dispatch(f)
}

/// Values per block of [`fill_row_blocks`]: enough to amortise the pool's hand-off, small
/// enough that a layer's rows spread over every thread.
const BLOCK_VALUES: usize = 16_384;

/// A new buffer of `len` values whose blocks of whole rows of `row_len` values are written by
/// `f(first_row, block)`, spread over candle's thread pool; each block is zeroed by the worker
/// given it, right before `f` (`imagegen_gemm::fresh_buffer`: zeroing the whole output up front on
/// the calling thread was a serial pass over it). `f` is run inside [`vectorized`].
pub(crate) fn fill_row_blocks(
    len: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let row_len = row_len.max(1);
    let rows_per_block = (BLOCK_VALUES / row_len).max(1);
    let block = std::iter::repeat(rows_per_block * row_len);
    let (out, ()) = imagegen_gemm::fresh_buffer(len, block, |blocks| {
        candle_core::utils::barrier_pool().execute_chunked(blocks.len(), |range| {
            for b in range {
                if let Some(dst) = blocks.take(b) {
                    vectorized(
                        #[inline(always)]
                        || f(b * rows_per_block, dst),
                    );
                }
            }
        });
    });
    out
}

/// A new buffer of `x`'s length whose every row of `cols` values is `f(row of x, row of out)`,
/// over [`fill_row_blocks`]; `f` must be `#[inline(always)]` to be vectorised.
pub(crate) fn map_rows(x: &[f32], cols: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let cols = cols.max(1);
    fill_row_blocks(
        x.len(),
        cols,
        #[inline(always)]
        |first, dst| {
            let src = &x[first * cols..][..dst.len()];
            for (row, out) in src.chunks_exact(cols).zip(dst.chunks_exact_mut(cols)) {
                f(row, out);
            }
        },
    )
}

/// The widest instruction set the kernels use here: `avx512`, `avx2` or `baseline` (logs, benches).
pub fn vector_isa() -> &'static str {
    match arch() {
        #[cfg(target_arch = "x86_64")]
        pulp::Arch::V4(_) => "avx512",
        #[cfg(target_arch = "x86_64")]
        pulp::Arch::V3(_) => "avx2",
        _ => "baseline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same sums on whichever path the CPU takes, to the bit, as the baseline code's.
    #[test]
    fn the_dispatched_loop_computes_what_the_plain_loop_does() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain = |xs: &[f32]| -> Vec<f32> {
            xs.iter()
                .map(|&x| super::super::activation::fast_exp(x) * 2.0 + 1.0)
                .collect()
        };
        let wide = vectorized(
            #[inline(always)]
            || plain(&xs),
        );
        assert_eq!(wide, plain(&xs));
        assert!(["avx512", "avx2", "baseline"].contains(&vector_isa()));
    }

    #[test]
    fn a_cap_narrows_and_never_widens() {
        let detected = pulp::Arch::new();
        assert!(matches!(
            capped(detected, Some("baseline")),
            pulp::Arch::Scalar
        ));
        assert!(matches!(
            capped(pulp::Arch::Scalar, Some("avx2")),
            pulp::Arch::Scalar
        ));
        #[cfg(target_arch = "x86_64")]
        if let pulp::Arch::V4(_) = detected {
            assert!(matches!(capped(detected, Some("avx2")), pulp::Arch::V3(_)));
        }
        #[cfg(target_arch = "x86_64")]
        assert!(matches!(
            (capped(detected, None), detected),
            (pulp::Arch::Scalar, pulp::Arch::Scalar)
                | (pulp::Arch::V3(_), pulp::Arch::V3(_))
                | (pulp::Arch::V4(_), pulp::Arch::V4(_))
        ));
    }
}
