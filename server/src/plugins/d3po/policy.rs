//! The served model as `plugin-d3po` sees it: a [`StepPolicy`] over recorded chains, and the
//! implicit reward the gate ranks held-out pairs by. Both ask the host for log-ratios computed
//! with the sampler's step math.

use candle_core::{DType, Tensor};
use plugin_d3po::{D3poError, StepPolicy, ranking_accuracy};

use super::pairs::TrainingPair;
use crate::model::{LoraWeights, Mode, ModelError};
use crate::plugins::PluginHost;
use crate::sampler::Trajectory;

/// The served UNet as a D3PO policy: the trainable LoRA against the round's reference.
pub(super) struct ServerPolicy<'a> {
    pub(super) host: &'a PluginHost,
    pub(super) policy: &'a LoraWeights,
    pub(super) reference: Option<&'a LoraWeights>,
}

impl StepPolicy for ServerPolicy<'_> {
    type Item = Trajectory;

    fn steps(&self, item: &Trajectory) -> usize {
        item.steps()
    }

    fn log_ratios(&self, batch: &[(&Trajectory, usize)]) -> plugin_d3po::Result<Tensor> {
        self.host
            .transitions(batch)
            .and_then(|t| t.log_ratios(Some(self.policy), self.reference, Mode::Training))
            .map_err(to_d3po)
    }
}

fn to_d3po(e: ModelError) -> D3poError {
    match e {
        ModelError::Tensor(t) => D3poError::Tensor(t),
        other => D3poError::Policy(other.to_string()),
    }
}

/// The implicit reward of a chain under `adapter`: the sum over its steps of the log-ratio to
/// the base model (0 for the base model itself).
fn implicit_reward(
    host: &PluginHost,
    chain: &Trajectory,
    adapter: Option<&LoraWeights>,
) -> Result<f64, ModelError> {
    let Some(adapter) = adapter else {
        return Ok(0.0);
    };
    let items: Vec<(&Trajectory, usize)> = (0..chain.steps()).map(|j| (chain, j)).collect();
    let delta = host
        .transitions(&items)?
        .log_ratios(Some(adapter), None, Mode::Inference)?;
    Ok(delta.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// How often `adapter`'s implicit reward ranks the winner of a held-out pair above its loser.
pub(super) fn heldout_accuracy(
    host: &PluginHost,
    pairs: &[&TrainingPair],
    adapter: Option<&LoraWeights>,
) -> Result<f64, ModelError> {
    let mut rewards = Vec::with_capacity(pairs.len());
    for p in pairs {
        rewards.push((
            implicit_reward(host, &p.winner, adapter)?,
            implicit_reward(host, &p.loser, adapter)?,
        ));
    }
    Ok(ranking_accuracy(&rewards))
}

/// How far `adapter` has drifted from the base model: the mean over every step of `chains` of
/// the per-element KL divergence of its denoising step from the base model's (nats).
pub(super) fn drift_from_base(
    host: &PluginHost,
    chains: &[&Trajectory],
    adapter: &LoraWeights,
) -> Result<f64, ModelError> {
    let (mut total, mut steps) = (0.0, 0usize);
    for chain in chains {
        let items: Vec<(&Trajectory, usize)> = (0..chain.steps()).map(|j| (*chain, j)).collect();
        let kl = host
            .transitions(&items)?
            .kl_divergence(Some(adapter), None)?;
        total += kl.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        steps += items.len();
    }
    Ok(total / steps.max(1) as f64)
}
