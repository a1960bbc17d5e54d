//! LoRA adapters applied without merging: the base weights stay shared and untouched, each
//! adapter adds `B (A x) * alpha / rank` to the targeted projections, and one batch can run
//! rows with different adapters (or none).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::nn::{Linear, matmul, upcast};

/// The attention projections LoRA can target (diffusers / PEFT module names).
pub const TARGET_MODULES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Whether every element of `t` is finite. `max(|t|)` would not do: comparisons with NaN are
/// false, so a NaN anywhere but the first element slips through. `0 * x` is NaN exactly for NaN
/// and infinite `x`, and one NaN makes the sum NaN.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let zeroed = (t.to_dtype(DType::F32)? * 0.0)?;
    Ok(zeroed.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// One projection of the UNet an adapter may modify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTarget {
    /// The module path under the UNet, as diffusers names it
    /// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub path: String,
    /// Input features of the projection.
    pub in_features: usize,
    /// Output features of the projection.
    pub out_features: usize,
}

impl LoraTarget {
    /// The projection's short name (`to_q`, `to_out.0`, ...).
    pub fn module(&self) -> &str {
        let attn = self.path.rfind(".attn").map(|i| i + 1).unwrap_or(0);
        self.path[attn..]
            .split_once('.')
            .map(|(_, m)| m)
            .unwrap_or(&self.path)
    }
}

/// The two factors of one adapted projection: `down` is A `[rank, in]`, `up` is B `[out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// A, `[rank, in_features]`, f32.
    pub down: Tensor,
    /// B, `[out_features, rank]`, f32.
    pub up: Tensor,
}

/// A set of LoRA factors for a UNet, indexed by the UNet's target slots.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    rank: usize,
    alpha: f64,
    /// One entry per [`LoraTarget`] of the UNet, in the UNet's order; `None` = not adapted.
    layers: Vec<Option<LoraPair>>,
}

impl LoraWeights {
    /// Builds weights from factors given per slot; checks every shape against its target.
    pub fn new(
        rank: usize,
        alpha: f64,
        targets: &[LoraTarget],
        layers: Vec<Option<LoraPair>>,
    ) -> Result<Self> {
        if rank == 0 || !alpha.is_finite() {
            candle_core::bail!(
                "LoRA rank must be positive and alpha finite (rank {rank}, alpha {alpha})"
            );
        }
        if layers.len() != targets.len() {
            candle_core::bail!(
                "{} LoRA layers for a UNet with {} targets",
                layers.len(),
                targets.len()
            );
        }
        for (target, layer) in targets.iter().zip(&layers) {
            if let Some(pair) = layer {
                let want_down = [rank, target.in_features];
                let want_up = [target.out_features, rank];
                if pair.down.dims() != want_down || pair.up.dims() != want_up {
                    candle_core::bail!(
                        "LoRA factors for `{}` have shapes {:?} / {:?}, expected {want_down:?} / {want_up:?}",
                        target.path,
                        pair.down.dims(),
                        pair.up.dims()
                    );
                }
            }
        }
        Ok(Self {
            rank,
            alpha,
            layers,
        })
    }

    /// The rank shared by every layer.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The LoRA alpha; the update is scaled by `alpha / rank`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The factors per slot.
    pub fn layers(&self) -> &[Option<LoraPair>] {
        &self.layers
    }

    /// Factors keyed by module path, for saving.
    pub fn named_layers<'a>(
        &'a self,
        targets: &'a [LoraTarget],
    ) -> impl Iterator<Item = (&'a str, &'a LoraPair)> {
        targets
            .iter()
            .zip(&self.layers)
            .filter_map(|(t, l)| l.as_ref().map(|l| (t.path.as_str(), l)))
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|p| p.down.elem_count() + p.up.elem_count())
            .sum()
    }

    /// Whether every factor is finite (NaN and infinities anywhere are found).
    pub fn all_finite(&self) -> Result<bool> {
        for pair in self.layers().iter().flatten() {
            if !(all_finite(&pair.down)? && all_finite(&pair.up)?) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The same adapter with `f` applied to every factor (detached views for a forward that
    /// builds no graph).
    pub(crate) fn map_factors(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|p| LoraPair {
                    down: f(&p.down),
                    up: f(&p.up),
                })
            })
            .collect();
        Self {
            rank: self.rank,
            alpha: self.alpha,
            layers,
        }
    }

    /// A copy whose factors are detached from any autograd graph (a frozen reference policy).
    pub fn detached(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|p| {
                        Ok::<_, candle_core::Error>(LoraPair {
                            down: p.down.copy()?.detach(),
                            up: p.up.copy()?.detach(),
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            rank: self.rank,
            alpha: self.alpha,
            layers,
        })
    }
}

/// A freshly initialised, trainable adapter: `A ~ N(0, 1/rank^2)`, `B = 0`, so it starts equal
/// to the base model (d3po.md section 3). The `Var`s are returned for the optimiser.
#[derive(Debug)]
pub struct TrainableLora {
    /// The weights whose tensors are the variables below.
    pub weights: LoraWeights,
    /// Every trainable tensor, A and B of each adapted layer.
    pub vars: Vec<Var>,
}

impl TrainableLora {
    /// Creates rank-`rank` factors on every target whose module is in `modules`.
    /// `normal` draws standard normal samples (host RNG, so seeds are reproducible).
    pub fn init(
        targets: &[LoraTarget],
        rank: usize,
        alpha: f64,
        modules: &[&str],
        device: &Device,
        mut normal: impl FnMut() -> f32,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut layers = Vec::with_capacity(targets.len());
        for target in targets {
            if !modules.contains(&target.module()) {
                layers.push(None);
                continue;
            }
            let std = 1.0 / rank as f32;
            let a: Vec<f32> = (0..rank * target.in_features)
                .map(|_| normal() * std)
                .collect();
            let down = Var::from_tensor(&Tensor::from_vec(a, (rank, target.in_features), device)?)?;
            let up = Var::zeros((target.out_features, rank), DType::F32, device)?;
            layers.push(Some(LoraPair {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
            }));
            vars.push(down);
            vars.push(up);
        }
        Ok(Self {
            weights: LoraWeights::new(rank, alpha, targets, layers)?,
            vars,
        })
    }

    /// Wraps existing factors (e.g. the live adapter) as trainable variables.
    pub fn from_weights(weights: &LoraWeights, targets: &[LoraTarget]) -> Result<Self> {
        let mut vars = Vec::new();
        let mut layers = Vec::with_capacity(weights.layers.len());
        for layer in &weights.layers {
            layers.push(match layer {
                None => None,
                Some(p) => {
                    let down = Var::from_tensor(&p.down.to_dtype(DType::F32)?)?;
                    let up = Var::from_tensor(&p.up.to_dtype(DType::F32)?)?;
                    let pair = LoraPair {
                        down: down.as_tensor().clone(),
                        up: up.as_tensor().clone(),
                    };
                    vars.push(down);
                    vars.push(up);
                    Some(pair)
                }
            });
        }
        Ok(Self {
            weights: LoraWeights::new(weights.rank, weights.alpha, targets, layers)?,
            vars,
        })
    }
}

/// Which adapter each row of a batch runs with.
#[derive(Debug, Clone)]
pub enum AdapterBatch<'a> {
    /// Every row uses the same adapter (or the base model with `None`).
    Uniform(Option<&'a LoraWeights>),
    /// Consecutive runs of rows: `(row count, adapter)`, covering the batch in order.
    Spans(Vec<(usize, Option<&'a LoraWeights>)>),
}

impl AdapterBatch<'_> {
    /// The base model for every row.
    pub const BASE: AdapterBatch<'static> = AdapterBatch::Uniform(None);
}

/// Owned adapters kept alive for the duration of a batch.
pub type SharedLora = Arc<LoraWeights>;

/// A projection that may carry a LoRA update: `W x + b + B (A x) * scale`.
#[derive(Debug, Clone)]
pub(crate) struct LoraLinear {
    base: Linear,
    slot: usize,
}

impl LoraLinear {
    /// Wraps `base` as target `slot`, recording the target in `targets`.
    pub(crate) fn new(base: Linear, path: String, targets: &mut Vec<LoraTarget>) -> Self {
        let slot = targets.len();
        targets.push(LoraTarget {
            path,
            in_features: base.in_dim(),
            out_features: base.out_dim(),
        });
        Self { base, slot }
    }

    pub(crate) fn forward(&self, x: &Tensor, adapters: &AdapterBatch<'_>) -> Result<Tensor> {
        use candle_core::Module;
        let y = self.base.forward(x)?;
        match adapters {
            AdapterBatch::Uniform(None) => Ok(y),
            AdapterBatch::Uniform(Some(w)) => match self.delta(x, w)? {
                Some(d) => y + d,
                None => Ok(y),
            },
            AdapterBatch::Spans(spans) => {
                let mut parts = Vec::with_capacity(spans.len());
                let mut any = false;
                let mut start = 0;
                for &(rows, adapter) in spans {
                    let xs = x.narrow(0, start, rows)?;
                    let d = match adapter {
                        Some(w) => self.delta(&xs, w)?,
                        None => None,
                    };
                    any |= d.is_some();
                    parts.push(match d {
                        Some(d) => d,
                        None => y.narrow(0, start, rows)?.zeros_like()?,
                    });
                    start += rows;
                }
                if start != x.dim(0)? {
                    candle_core::bail!(
                        "adapter spans cover {start} rows of a batch of {}",
                        x.dim(0)?
                    );
                }
                if any {
                    y + Tensor::cat(&parts, 0)?
                } else {
                    Ok(y)
                }
            }
        }
    }

    /// `B (A x) * scale` in f32, cast back to the activation dtype.
    fn delta(&self, x: &Tensor, w: &LoraWeights) -> Result<Option<Tensor>> {
        let Some(Some(pair)) = w.layers.get(self.slot) else {
            return Ok(None);
        };
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x
            .reshape((rows, in_dim))?
            .to_dtype(upcast(dtype).max_f32())?;
        let down = pair.down.to_dtype(x2.dtype())?;
        let up = pair.up.to_dtype(x2.dtype())?;
        let h = matmul(&matmul(&x2, &down.t()?)?, &up.t()?)?;
        let h = (h * w.scale())?.to_dtype(dtype)?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = pair.up.dim(0)?;
        Ok(Some(h.reshape(out_dims)?))
    }
}

/// LoRA math runs in f32, or f64 when the whole model does (gradient checks).
trait AtLeastF32 {
    fn max_f32(self) -> DType;
}

impl AtLeastF32 for DType {
    fn max_f32(self) -> DType {
        if self == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }
}

/// Target slots by path, for loading adapters saved under module names.
pub fn slots_by_path(targets: &[LoraTarget]) -> HashMap<&str, usize> {
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| (t.path.as_str(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_or_infinity_anywhere_is_found() {
        let dev = Device::Cpu;
        assert!(all_finite(&Tensor::new(&[1f32, -2.0, 3.0], &dev).unwrap()).unwrap());
        // The old check (`max(|t|)` finite) passed this one: NaN is not the first element.
        let nan_second = Tensor::new(&[1f32, f32::NAN, 3.0], &dev).unwrap();
        assert!(
            nan_second
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite()
        );
        assert!(!all_finite(&nan_second).unwrap());
        assert!(!all_finite(&Tensor::new(&[f32::INFINITY, 0.0], &dev).unwrap()).unwrap());
        assert!(!all_finite(&Tensor::new(&[0.0f64, f64::NEG_INFINITY], &dev).unwrap()).unwrap());
        assert!(all_finite(&Tensor::zeros((0, 4), DType::F32, &dev).unwrap()).unwrap());
    }
}
