//! SiLU, erf-GELU and the inference softmax on the CPU with a branch-free `exp` the compiler
//! vectorises. candle's CPU versions call libm's scalar `expf`/`erff` per element: 17% of a tiny
//! UNet forward went to them (perf, AMD EPYC). Other devices and dtypes use candle's ops. The
//! same kernel runs whether or not the input is tracked, so a policy and a reference forward agree
//! to the bit while their adapters do; the backward passes are single kernels too.

use candle_core::cpu_backend::{binary_map_vec_par, unary_map_vec_par};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

use super::contiguous_slice;
use super::simd::{fill_row_blocks, map_rows, vectorized};

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

/// `dy * gelu'(x)`, `gelu'(x) = Phi(x) + x phi(x)`.
#[inline(always)]
fn gelu_grad_f32(x: f32, dy: f32) -> f32 {
    let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
    // 1 / sqrt(2 pi)
    let pdf = 0.398_942_3 * fast_exp(-0.5 * x * x);
    dy * (cdf + x * pdf)
}

/// An element-wise f32 map on the CPU with `f`, whose gradient `grad(x, dy) = dy f'(x)` is one
/// kernel too (candle's composite of the derivative was five to ten tensors per activation).
/// `F` and `G` are function items, so the loops are monomorphised and vectorised (a `fn`
/// pointer would be one indirect call per element).
#[derive(Clone, Copy)]
struct Map<F, G> {
    name: &'static str,
    f: F,
    grad: G,
}

impl<F, G> CustomOp1 for Map<F, G>
where
    F: Fn(f32) -> f32 + Copy + Send + Sync + 'static,
    G: Fn(f32, f32) -> f32 + Copy + Send + Sync + 'static,
{
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
        Ok(Some(arg.detach().apply_op2_no_bwd(grad, &MapGrad(*self))?))
    }
}

/// The backward of a [`Map`] over `(x, dy)`.
struct MapGrad<F, G>(Map<F, G>);

impl<F, G> CustomOp2 for MapGrad<F, G>
where
    F: Fn(f32) -> f32 + Copy + Send + Sync + 'static,
    G: Fn(f32, f32) -> f32 + Copy + Send + Sync + 'static,
{
    fn name(&self) -> &'static str {
        "activation-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(dy)) = (x, dy) else {
            candle_core::bail!("{} backward: f32 expected", self.0.name);
        };
        if lx.shape() != ldy.shape() {
            candle_core::bail!(
                "{} backward: input {:?} and gradient {:?} differ in shape",
                self.0.name,
                lx.shape(),
                ldy.shape()
            );
        }
        let g = self.0.grad;
        let out = binary_map_vec_par(
            lx,
            ldy,
            x,
            dy,
            g,
            |x: &[f32], dy: &[f32], out: &mut [f32]| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((o, &v), &d) in out.iter_mut().zip(x).zip(dy) {
                            *o = g(v, d);
                        }
                    },
                )
            },
            |x: f32, dy: &[f32], out: &mut [f32]| {
                for (o, &d) in out.iter_mut().zip(dy) {
                    *o = g(x, d);
                }
            },
        );
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

fn fast_path(x: &Tensor) -> bool {
    super::cpu_kernel_for(x, &[DType::F32])
}

/// `x * sigmoid(x)`; differentiable.
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.silu();
    }
    x.apply_op1(Map {
        name: "silu",
        f: silu_f32,
        grad: silu_grad_f32,
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
        grad: gelu_grad_f32,
    })
}

/// diffusers' GEGLU activation, `hidden * gelu(gate)` with `[hidden, gate]` the two halves of
/// `h`'s last dimension; differentiable. On the CPU in f32 one pass forward and one backward,
/// where the composite copied out each half and ran the GELU and the product apart (and their
/// four backwards).
pub(crate) fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.rank().saturating_sub(1);
    let width = h.dim(last)?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("geglu: the last dimension of {:?} is odd", h.dims());
    }
    let inner = width / 2;
    if !fast_path(h) {
        return h.narrow(last, 0, inner)? * h.narrow(last, inner, inner)?.gelu_erf()?;
    }
    h.contiguous()?.apply_op1(Geglu { inner })
}

#[derive(Clone, Copy)]
struct Geglu {
    inner: usize,
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("geglu: f32 expected");
        };
        let h = contiguous_slice(data, layout)?;
        let inner = self.inner;
        let out = fill_row_blocks(
            h.len() / 2,
            inner,
            #[inline(always)]
            |first, dst| {
                let src = &h[first * 2 * inner..][..2 * dst.len()];
                for (o, row) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(2 * inner)) {
                    let (hidden, gate) = row.split_at(inner);
                    for ((o, &a), &g) in o.iter_mut().zip(hidden).zip(gate) {
                        *o = a * gelu_f32(g);
                    }
                }
            },
        );
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.detach().apply_op2_no_bwd(
            &grad.contiguous()?,
            &GegluGrad(*self),
        )?))
    }
}

/// The backward of [`Geglu`] over `(h, dy)`: `d hidden = dy gelu(gate)`,
/// `d gate = dy hidden gelu'(gate)`.
struct GegluGrad(Geglu);

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(h), CpuStorage::F32(dy)) = (h, dy) else {
            candle_core::bail!("geglu backward: f32 expected");
        };
        let (h, dy) = (contiguous_slice(h, lh)?, contiguous_slice(dy, ldy)?);
        let inner = self.0.inner;
        if dy.len() * 2 != h.len() {
            candle_core::bail!(
                "geglu backward: gradient {:?} does not fit input {:?}",
                ldy.shape(),
                lh.shape()
            );
        }
        let out = fill_row_blocks(
            h.len(),
            2 * inner,
            #[inline(always)]
            |first, dst| {
                let src = &h[first * 2 * inner..][..dst.len()];
                let dy = &dy[first * inner..][..dst.len() / 2];
                for ((d, row), g) in dst
                    .chunks_exact_mut(2 * inner)
                    .zip(src.chunks_exact(2 * inner))
                    .zip(dy.chunks_exact(inner))
                {
                    let (hidden, gate) = row.split_at(inner);
                    let (d_hidden, d_gate) = d.split_at_mut(inner);
                    for ((((dh, dg), &a), &b), &g) in d_hidden
                        .iter_mut()
                        .zip(d_gate.iter_mut())
                        .zip(hidden)
                        .zip(gate)
                        .zip(g)
                    {
                        *dh = g * gelu_f32(b);
                        *dg = gelu_grad_f32(b, g * a);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), lh.shape().clone()))
    }
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
        // `softmax_row` is `#[inline(always)]`, so it is vectorised inside the rows' driver.
        let out = map_rows(x, self.cols, softmax_row);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Sixteen independent lanes: a reduction the compiler can keep in vector registers (a plain
/// fold is a serial dependency chain it may not reorder).
#[inline(always)]
pub(super) fn reduce16(xs: &[f32], init: f32, op: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
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

/// `sum a_i b_i` in sixteen independent lanes, as [`reduce16`].
#[inline(always)]
pub(super) fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let mut acc = lanes.into_iter().fold(0.0, |s, l| s + l);
    for (&x, &y) in ta.iter().zip(tb) {
        acc += x * y;
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

    /// The fused GEGLU equals the composite of candle's ops, values and gradients.
    #[test]
    fn geglu_matches_the_composite_and_its_gradient() {
        let values: Vec<f32> = (0..3 * 5 * 2 * 24)
            .map(|i| (i as f32 * 0.377).sin() * 4.0)
            .collect();
        let h = candle_core::Var::from_vec(values, (3, 5 * 2, 24), &Device::Cpu).unwrap();
        let dy = Tensor::arange(0f32, (3 * 10 * 12) as f32, &Device::Cpu)
            .unwrap()
            .reshape((3, 10, 12))
            .unwrap()
            .cos()
            .unwrap();
        let fused = geglu(h.as_tensor()).unwrap();
        let composite = (h.narrow(2, 0, 12).unwrap()
            * h.narrow(2, 12, 12).unwrap().gelu_erf().unwrap())
        .unwrap();
        assert_eq!(fused.dims(), &[3, 10, 12]);
        let diff = super::super::max_abs_diff(&fused, &composite);
        assert!(diff < 1e-5, "{diff}");
        let grad = |y: &Tensor| {
            (y * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(h.as_tensor())
                .unwrap()
                .clone()
        };
        let diff = super::super::max_abs_diff(&grad(&fused), &grad(&composite));
        assert!(diff < 1e-5, "{diff}");
        assert!(geglu(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
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
            // A gradient that differs per element, so that x and dy cannot be confused.
            let dy = (x.cos().unwrap() * 3.0).unwrap();
            let g1 = (tracked * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs(var.as_tensor()).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(diff(g1.get(&var).unwrap(), g2.get(&var).unwrap()) < 6e-6);
        }
    }
}
