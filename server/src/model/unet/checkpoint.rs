//! Gradient checkpointing for the UNet's training forward on the CPU: a checkpointed block keeps
//! nothing for the backward but its input. Its forward runs without a graph; its backward runs
//! the block again on that input, with the graph, and differentiates that. One block's
//! intermediates exist at a time instead of the whole UNet's: at SD-1.5's 64x64 latent those are
//! the im2col columns of every convolution and the feed-forward activations of every
//! transformer, several GiB per image.
//!
//! candle has no hook for this: each checkpointed block is one [`CustomOp2`] node of the outer
//! graph, over `(x, theta)` where `theta` is the block's LoRA factors flattened into one tensor,
//! so that their gradients reach the variables through candle's own `cat` backward.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, Var};

use crate::model::lora::{LoraPair, LoraWeights};

/// A block's computation from its input, with the adapter it runs under (`None`: the base).
pub(crate) type BlockFn = dyn Fn(&Tensor, Option<&LoraWeights>) -> Result<Tensor> + Send + Sync;

/// Below this many activation elements at the UNet's first level (`B * H * W * C`) the
/// recomputation costs more than the memory it saves: the tiny models train without it.
const MIN_ELEMENTS: usize = 1 << 20;

/// Whether a training forward whose first level holds `elements` activation values checkpoints.
pub(crate) fn wanted(elements: usize) -> bool {
    #[cfg(test)]
    if let Some(forced) = FORCED.with(std::cell::Cell::get) {
        return forced;
    }
    elements >= MIN_ELEMENTS
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with checkpointing on or off whatever the size (tests on the tiny UNet).
#[cfg(test)]
pub(crate) fn forced<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = FORCED.with(|c| c.replace(Some(on)));
    let out = f();
    FORCED.with(|c| c.set(before));
    out
}

/// `f(x, adapter)` for the training graph, keeping only `x` (and the adapter's factors in
/// `slots`) for the backward. Runs `f` directly when nothing it uses is tracked (a frozen
/// reference's forward builds no graph either way).
pub(crate) fn checkpointed(
    x: &Tensor,
    adapter: Option<&LoraWeights>,
    slots: Range<usize>,
    f: Arc<BlockFn>,
) -> Result<Tensor> {
    let params: Vec<Tensor> = adapter
        .map(|w| {
            w.layers()
                .get(slots.clone())
                .unwrap_or(&[])
                .iter()
                .flatten()
                .flat_map(|p: &LoraPair| [p.down.clone(), p.up.clone()])
                .filter(Tensor::track_op)
                .collect()
        })
        .unwrap_or_default();
    if !x.track_op() && params.is_empty() {
        return f(x, adapter);
    }
    let theta = if params.is_empty() {
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        let flat = params
            .iter()
            .map(|p| p.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)?
    };
    x.contiguous()?.apply_op2(
        &theta,
        Recompute {
            f,
            adapter: adapter.cloned(),
            params,
        },
    )
}

struct Recompute {
    f: Arc<BlockFn>,
    /// The adapter as the caller passed it (its factors tracked).
    adapter: Option<LoraWeights>,
    /// The tracked factors `theta` flattens, in its order.
    params: Vec<Tensor>,
}

impl Recompute {
    /// The adapter with every factor detached (same storage, no graph).
    fn untracked_adapter(&self) -> Option<LoraWeights> {
        self.adapter.as_ref().map(|w| w.map_factors(|t| t.detach()))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        layout: &Layout,
        _theta: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = x else {
            candle_core::bail!("checkpointing runs on f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("checkpointing expects a contiguous input");
        };
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &candle_core::Device::Cpu)?;
        let y = (self.f)(&x, self.untracked_adapter().as_ref())?;
        let shape = y.shape().clone();
        let values = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let y = (self.f)(input.as_tensor(), self.adapter.as_ref())?;
        let grads = (y * grad)?.sum_all()?.backward()?;
        let dx = if x.track_op() {
            grads.get(input.as_tensor()).cloned()
        } else {
            None
        };
        let dtheta = if theta.track_op() {
            let flat = self
                .params
                .iter()
                .map(|p| match grads.get(p) {
                    Some(g) => g.flatten_all(),
                    None => Tensor::zeros(p.elem_count(), p.dtype(), p.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&flat, 0)?)
        } else {
            None
        };
        Ok((dx, dtheta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraTarget;
    use crate::model::nn::max_abs_diff;
    use candle_core::Device;

    fn tensor(values: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    /// `f(x) = tanh(x A^T) B^T`-shaped block: the checkpointed gradients in x and in both
    /// factors equal the plain graph's, and the output is the same.
    #[test]
    fn the_recomputed_gradients_equal_the_plain_graph() {
        let targets = vec![
            LoraTarget {
                path: "skipped".into(),
                in_features: 3,
                out_features: 3,
            },
            LoraTarget {
                path: "block".into(),
                in_features: 3,
                out_features: 3,
            },
        ];
        let down = Var::from_tensor(&tensor(&[0.5, -0.2, 0.1, 0.3, 0.8, -0.6], (2, 3))).unwrap();
        let up = Var::from_tensor(&tensor(&[0.7, 0.1, -0.4, 0.9, 0.2, 0.3], (3, 2))).unwrap();
        let pair = LoraPair {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
        };
        let adapter = LoraWeights::new(2, 2.0, &targets, vec![None, Some(pair)]).unwrap();
        let f: Arc<BlockFn> = Arc::new(|x: &Tensor, w: Option<&LoraWeights>| {
            let Some(Some(p)) = w.map(|w| &w.layers()[1]) else {
                return x.tanh();
            };
            x.matmul(&p.down.t()?)?.tanh()?.matmul(&p.up.t()?)? + x
        });
        let x0 = Var::from_tensor(&tensor(&[0.1, 0.2, 0.3, -0.4, 0.5, -0.6], (2, 3))).unwrap();
        let weights = tensor(&[1.0, -2.0, 0.5, 0.25, 3.0, -1.0], (2, 3));
        let run = |checkpoint: bool| {
            let x = (x0.as_tensor() * 2.0).unwrap(); // tracked, not a variable
            let y = if checkpoint {
                checkpointed(&x, Some(&adapter), 1..2, f.clone()).unwrap()
            } else {
                f(&x, Some(&adapter)).unwrap()
            };
            let g = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads = [&x0, &down, &up].map(|v| g.get(v.as_tensor()).unwrap().clone());
            (y, grads)
        };
        let ((y1, g1), (y2, g2)) = (run(true), run(false));
        assert!(max_abs_diff(&y1, &y2) < 1e-7);
        for (a, b) in g1.iter().zip(&g2) {
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-6, "gradients differ by {diff}: {a} vs {b}");
        }
        // Nothing tracked: no node, the plain result.
        let frozen = adapter.map_factors(|t| t.detach());
        let x = x0.as_tensor().detach();
        let y = checkpointed(&x, Some(&frozen), 1..2, f.clone()).unwrap();
        assert!(!y.track_op());
    }
}
