//! The D3PO loss on one time index of a batch of preference pairs.

use candle_core::Tensor;

use crate::{D3poError, Result};

/// Hyper-parameters of the loss (d3po.md section 3; defaults from the reference).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct D3poLossConfig {
    /// Inverse temperature of the preference model.
    pub beta: f64,
    /// Trust region of the per-step ratio: `r = clamp(delta, ln(1 - eps), ln(1 + eps))`.
    pub clamp_eps: f64,
}

impl Default for D3poLossConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            clamp_eps: 0.1,
        }
    }
}

impl D3poLossConfig {
    /// Checks the ranges: `beta > 0`, `0 < clamp_eps < 1`.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(D3poError::InvalidArgument {
                name: "beta",
                reason: format!("must be finite and positive, got {}", self.beta),
            });
        }
        if !(self.clamp_eps > 0.0 && self.clamp_eps < 1.0) {
            return Err(D3poError::InvalidArgument {
                name: "clamp_eps",
                reason: format!("must lie in (0, 1), got {}", self.clamp_eps),
            });
        }
        Ok(())
    }
}

/// `-log_sigmoid(x)` computed stably as `max(-x, 0) + ln(1 + exp(-|x|))`.
fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let hinge = x.neg()?.maximum(&zeros)?;
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((hinge + soft)?)
}

/// Per-pair loss `-log_sigmoid(beta * (r_w - r_l))` with `r = clamp(delta, ln(1-eps), ln(1+eps))`,
/// for winners' and losers' log-ratios `delta_w`, `delta_l` of shape `[P]`. Returns `[P]`.
///
/// Outside the clamp an image's gradient is exactly zero: it stops pulling at that step.
pub fn d3po_loss(delta_w: &Tensor, delta_l: &Tensor, config: &D3poLossConfig) -> Result<Tensor> {
    config.validate()?;
    let (lo, hi) = ((1.0 - config.clamp_eps).ln(), (1.0 + config.clamp_eps).ln());
    let r_w = delta_w.clamp(lo, hi)?;
    let r_l = delta_l.clamp(lo, hi)?;
    let z = ((r_w - r_l)? * config.beta)?;
    neg_log_sigmoid(&z)
}
