//! SiLU, erf-GELU and the inference softmax on the CPU with a branch-free `exp` the compiler
//! vectorises. candle's CPU versions call libm's scalar `expf`/`erff` per element: 17% of a tiny
//! UNet forward went to them (perf, AMD EPYC). Other devices and dtypes use candle's ops. The
//! same kernel runs whether or not the input is tracked, so a policy and a reference forward agree
//! to the bit while their adapters do; the backward passes are candle compositions of the
//! derivative.

use candle_core::cpu_backend::unary_map_vec_par;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Tensor};

use super::contiguous_slice;
use super::simd::vectorized;

/// `e^x` for f32, relative error below 3e-7 (about 2 ulp) on [-87, 88] (below: a tiny positive number, not 0; above: the
/// largest finite power). Range reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, then a degree-6
/// polynomial for `e^r`, and `2^n` put into the exponent bits. No branches, no calls.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer with plain arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.666_666_7e-1 + r * (4.166_662e-2 + r * (8.333_452e-3 + r * 1.388_0e-3)))));
    // n is integral and in [-126, 127], and `shifted`'s bits are ROUND's plus n: n + 127 shifted
    // into the exponent field gives 2^n. Integer arithmetic on the bits, not `n as i32` (Rust's
    // saturating float-to-int cast kept the loops around it scalar).
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    p * f32::from_bits(biased << 23)
}

/// `erf(x)` within 1.5e-7 (Abramowitz and Stegun 7.1.26), branch-free.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

#[inline(always)]
pub(super) fn silu_f32(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

/// `dy * silu'(x)`, `silu'(x) = s (1 + x (1 - s))` with `s = sigmoid(x)`.
#[inline(always)]
pub(super) fn silu_grad_f32(x: f32, dy: f32) -> f32 {
    let s = 1.0 / (1.0 + fast_exp(-x));
    dy * s * (1.0 + x * (1.0 - s))
}

#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// An element-wise f32 map on the CPU with `f`, whose gradient is `grad * derivative(x)`. `F` is
/// a function item, so the map is monomorphised and its loop vectorised (a `fn` pointer would
/// be one indirect call per element).
struct Map<F> {
    name: &'static str,
    f: F,
    derivative: fn(&Tensor) -> Result<Tensor>,
}

impl<F: Fn(f32) -> f32 + Copy + Send + Sync + 'static> CustomOp1 for Map<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: f32 expected", self.name);
        };
        let f = self.f;
        // candle's parallel element-wise driver (its thread pool, any layout); the inner loop
        // over a chunk is what the compiler vectorises.
        let out = unary_map_vec_par(data, layout, f, |src: &[f32], dst: &mut [f32]| {
            vectorized(
                #[inline(always)]
                || {
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = f(v);
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.mul(&(self.derivative)(&arg.detach())?)?))
    }
}

fn fast_path(x: &Tensor) -> bool {
    super::cpu_kernel_for(x, &[DType::F32])
}

/// `silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`.
fn silu_derivative(x: &Tensor) -> Result<Tensor> {
    let s = candle_nn::ops::sigmoid(x)?;
    let one_minus = s.affine(-1.0, 1.0)?;
    s.mul(&(x.mul(&one_minus)? + 1.0)?)
}

/// `gelu'(x) = Phi(x) + x phi(x)`.
fn gelu_derivative(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    cdf? + x.mul(&pdf?)?
}

/// `x * sigmoid(x)`; differentiable.
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.silu();
    }
    x.apply_op1(Map {
        name: "silu",
        f: silu_f32,
        derivative: silu_derivative,
    })
}

/// GELU in the exact (erf) form, as diffusers' GEGLU and `gelu` use; differentiable.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.gelu_erf();
    }
    x.apply_op1(Map {
        name: "gelu-erf",
        f: gelu_f32,
        derivative: gelu_derivative,
    })
}

/// Row-wise softmax over the last dimension of a contiguous CPU f32 tensor (inference only:
/// no backward); anything else goes to candle's fused kernel.
pub(crate) fn softmax_last_dim_inference(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) || !x.is_contiguous() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    x.apply_op1_no_bwd(&SoftmaxRows {
        cols: x.dim(D::Minus1)?,
    })
}

struct SoftmaxRows {
    cols: usize,
}

impl CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "softmax-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("softmax-rows: f32 expected");
        };
        let x = contiguous_slice(data, layout)?;
        let cols = self.cols.max(1);
        let mut out = vec![0f32; x.len()];
        // Blocks of whole rows, spread over candle's thread pool; each block's lock is taken
        // once, by the one worker given that block.
        let rows_per_block = (16_384 / cols).max(1);
        let blocks: Vec<std::sync::Mutex<&mut [f32]>> = out
            .chunks_mut(rows_per_block * cols)
            .map(std::sync::Mutex::new)
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(blocks.len(), |range| {
            for b in range {
                let Ok(mut dst) = blocks[b].lock() else {
                    continue;
                };
                let src = &x[b * rows_per_block * cols..][..dst.len()];
                vectorized(
                    #[inline(always)]
                    || {
                        for (row, out) in src.chunks(cols).zip(dst.chunks_mut(cols)) {
                            softmax_row(row, out);
                        }
                    },
                );
            }
        });
        drop(blocks);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Sixteen independent lanes: a reduction the compiler can keep in vector registers (a plain
/// fold is a serial dependency chain it may not reorder).
#[inline(always)]
fn reduce16(xs: &[f32], init: f32, op: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut lanes = [init; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = op(*l, v);
        }
    }
    let mut acc = lanes.into_iter().fold(init, op);
    for &v in tail {
        acc = op(acc, v);
    }
    acc
}

/// `exp(scale (x - max(x)))` over a row in place (`scale > 0`); returns the row's sum, the
/// softmax's denominator, which the fused attention applies to its `dv` outputs rather than to
/// the `m` scores. Inlined, so that a caller inside [`vectorized`] gets it compiled for the
/// wide vectors.
#[inline(always)]
pub(super) fn exp_row_in_place(row: &mut [f32], scale: f32) -> f32 {
    let max = reduce16(row, f32::NEG_INFINITY, max_of);
    // Three plain passes over a row in L1 (max, exponentials, sum): each is a loop the
    // compiler vectorises at the full width, where one fused pass kept eight lanes.
    for d in row.iter_mut() {
        *d = fast_exp((*d - max) * scale);
    }
    reduce16(row, 0.0, |a, b| a + b)
}

/// The larger of two scores, as one `max` instruction (`f32::max`'s NaN rule costs a compare and
/// a blend per lane; scores are finite).
#[inline(always)]
fn max_of(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

#[inline(always)]
fn softmax_row(row: &[f32], out: &mut [f32]) {
    let max = reduce16(row, f32::NEG_INFINITY, max_of);
    for (d, &v) in out.iter_mut().zip(row) {
        *d = fast_exp(v - max);
    }
    let inv = 1.0 / reduce16(out, 0.0, |a, b| a + b);
    for d in out.iter_mut() {
        *d *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_within_about_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (fast_exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!((fast_exp(1.0) - std::f32::consts::E).abs() < 3e-7);
        // Saturates instead of overflowing into NaN or garbage bits.
        assert!(fast_exp(-1000.0) >= 0.0 && fast_exp(-1000.0) < 1e-37);
        assert!(fast_exp(1000.0).is_finite() && fast_exp(1000.0) > 1e38);
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn kernels_match_candle_and_keep_the_gradient() {
        let values: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.731).sin() * 12.0).collect();
        let x = Tensor::from_vec(values, (64, 64), &Device::Cpu).unwrap();
        let diff = |a: &Tensor, b: &Tensor| super::super::max_abs_diff(a, b);
        assert!(diff(&silu(&x).unwrap(), &x.silu().unwrap()) < 2e-6);
        assert!(diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 3e-6);
        let soft = softmax_last_dim_inference(&x).unwrap();
        assert!(diff(&soft, &candle_nn::ops::softmax_last_dim(&x).unwrap()) < 1e-6);
        // Tracked: the same values as untracked (to the bit), candle's gradient.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        type Act = fn(&Tensor) -> candle_core::Result<Tensor>;
        let pairs: [(Act, Act); 2] = [(silu, |t| t.silu()), (gelu_erf, |t| t.gelu_erf())];
        for (ours, theirs) in pairs {
            let tracked = ours(var.as_tensor()).unwrap();
            assert_eq!(diff(&tracked, &ours(&x).unwrap()), 0.0);
            let g1 = tracked.sum_all().unwrap().backward().unwrap();
            let g2 = theirs(var.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(diff(g1.get(&var).unwrap(), g2.get(&var).unwrap()) < 2e-6);
        }
    }
}
