//! One training round: pick fresh pairs, train an adapter from the live one, gate it on the
//! held-out pairs, publish it and make it live.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use plugin_d3po::D3poTrainer;
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::D3poPlugin;
use super::metrics::D3poMetrics;
use super::pairs::{TrainingPair, collect_pairs};
use super::policy::{ServerPolicy, drift_from_base, heldout_accuracy};
use crate::adapters::{AdapterGeneration, TrainingStats};
use crate::model::{LoraPair, LoraTarget, LoraWeights, TrainableLora};
use crate::plugins::PluginHost;
use crate::sampler::Trajectory;
use crate::store::buffer::GroupSnapshot;

/// What one round ended with.
pub(super) enum RoundResult {
    /// A new generation went live: its id and how it was trained.
    Published(String, TrainingStats),
    /// The gate (or the live alias's CAS) refused the trained adapter.
    Rejected(String),
    /// Nothing was trained: too few pairs, shutdown, or a failure on the way.
    Skipped(String),
}

/// What a trained round hands to the gate.
struct Round<'a> {
    trainable: &'a TrainableLora,
    live: Option<&'a AdapterGeneration>,
    pairs: &'a [&'a TrainingPair],
    train: &'a [&'a TrainingPair],
    heldout: &'a [&'a TrainingPair],
    mean_loss: f64,
    started: Instant,
}

/// `(train, held out)`: every k-th pair is held out for the gate, none when there are too few.
fn split_heldout<T: Copy>(pairs: &[T], heldout_fraction: f64) -> (Vec<T>, Vec<T>) {
    if !(heldout_fraction > 0.0 && pairs.len() >= 3) {
        return (pairs.to_vec(), Vec::new());
    }
    let every = (1.0 / heldout_fraction).round().max(2.0) as usize;
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for (i, p) in pairs.iter().enumerate() {
        if i % every == every - 1 {
            heldout.push(*p);
        } else {
            train.push(*p);
        }
    }
    (train, heldout)
}

/// Chains the drift guard measures on: those of the held-out pairs (the states users are shown,
/// which the round did not train on), else of the trained ones; at most [`PROBE_CHAINS`].
fn probe_chains<'a>(
    heldout: &[&'a TrainingPair],
    train: &[&'a TrainingPair],
) -> Vec<&'a Trajectory> {
    let pairs = if heldout.is_empty() { train } else { heldout };
    pairs
        .iter()
        .flat_map(|p| [p.winner.as_ref(), p.loser.as_ref()])
        .take(PROBE_CHAINS)
        .collect()
}

/// Enough chains for a stable mean, few enough to keep the gate cheap beside training.
const PROBE_CHAINS: usize = 16;

/// A round that stopped at `what` because of an error.
fn skipped(what: &str) -> impl Fn(&dyn std::fmt::Display) -> RoundResult + '_ {
    move |e| RoundResult::Skipped(format!("{what}: {e}"))
}

/// Groups with no fresh pair left outside `taken`, at the feedback version seen: the trainer has
/// consumed them, and the store may evict them like any other.
fn settled(
    groups: &[GroupSnapshot],
    fresh: &[TrainingPair],
    taken: &HashSet<&(String, String)>,
) -> Vec<(String, u64)> {
    groups
        .iter()
        .filter(|g| {
            !fresh
                .iter()
                .any(|p| p.group_id == g.group_id && !taken.contains(&p.key))
        })
        .map(|g| (g.group_id.clone(), g.version))
        .collect()
}

impl D3poPlugin {
    /// Runs one round over the store's labelled groups and its ledger of trained pairs.
    pub(super) fn round(
        &self,
        host: &PluginHost,
        triggered: bool,
        metrics: &D3poMetrics,
    ) -> RoundResult {
        match self.try_round(host, triggered, metrics) {
            Ok(result) | Err(result) => result,
        }
    }

    fn try_round(
        &self,
        host: &PluginHost,
        triggered: bool,
        metrics: &D3poMetrics,
    ) -> Result<RoundResult, RoundResult> {
        let started = Instant::now();
        let groups = host.labelled_groups();
        let ledger = host.trained_pairs();
        let fresh: Vec<TrainingPair> = collect_pairs(&groups)
            .into_iter()
            .filter(|p| !ledger.contains(&p.key))
            .collect();
        let idle = settled(&groups, &fresh, &HashSet::new());
        if !idle.is_empty() {
            host.record_trained(&[], &idle);
        }
        self.control.update(|s| s.pending_pairs = fresh.len());
        let needed = if triggered { 1 } else { self.config.min_pairs };
        if fresh.len() < needed {
            return Err(RoundResult::Skipped(format!(
                "{} new preference pairs, {needed} needed",
                fresh.len()
            )));
        }
        let pairs: Vec<&TrainingPair> = fresh.iter().take(self.config.pairs_per_round).collect();
        let (train, heldout) = split_heldout(&pairs, self.config.heldout_fraction);

        let live = host
            .adapters()
            .live()
            .map_err(|e| RoundResult::Skipped(e.to_string()))?;
        self.control.update(|s| s.state = "training".into());
        let seed = self.config.seed ^ ledger.len() as u64;
        let trainable = self
            .starting_adapter(host, live.as_deref(), seed)
            .map_err(|e| skipped("initialising the adapter")(&e))?;
        let reference = live.as_ref().map(|g| &g.weights);
        let mean_loss = self.train(host, &trainable, reference, &train, seed, metrics)?;
        metrics.pairs_used.inc_by(train.len() as u64);
        metrics.loss.set(mean_loss);
        let round = Round {
            trainable: &trainable,
            live: live.as_deref(),
            pairs: &pairs,
            train: &train,
            heldout: &heldout,
            mean_loss,
            started,
        };
        let outcome = self.gate_and_publish(host, round, metrics);
        // The round has used these pairs whatever the gate decided: a rejected round must never
        // pick the same (possibly damaged) pairs again ahead of fresh ones. A published round's
        // generation lists them too, so a crash before this line does not train them twice.
        let taken: HashSet<&(String, String)> = pairs.iter().map(|p| &p.key).collect();
        let used: Vec<(String, String, String)> = pairs
            .iter()
            .map(|p| (p.group_id.clone(), p.key.0.clone(), p.key.1.clone()))
            .collect();
        host.record_trained(&used, &settled(&groups, &fresh, &taken));
        self.control
            .update(|s| s.pending_pairs = fresh.len() - pairs.len());
        outcome
    }

    /// Gates the trained adapter on the held-out pairs; publishes it and makes it live.
    fn gate_and_publish(
        &self,
        host: &PluginHost,
        round: Round<'_>,
        metrics: &D3poMetrics,
    ) -> Result<RoundResult, RoundResult> {
        self.control.update(|s| s.state = "gating".into());
        let candidate = round
            .trainable
            .weights
            .detached()
            .map_err(|e| skipped("copying the trained weights")(&e))?;
        if !candidate.all_finite().unwrap_or(false) {
            return Ok(RoundResult::Rejected(
                "the trained weights are not finite".into(),
            ));
        }
        let reference = round.live.map(|g| &g.weights);
        let new_acc = heldout_accuracy(host, round.heldout, Some(&candidate))
            .map_err(|e| skipped("evaluating held-out pairs")(&e))?;
        let live_acc = heldout_accuracy(host, round.heldout, reference)
            .map_err(|e| skipped("evaluating held-out pairs")(&e))?;
        metrics.heldout_accuracy.set(new_acc);
        if new_acc < live_acc + self.config.gate_margin {
            return Ok(RoundResult::Rejected(format!(
                "held-out accuracy {new_acc:.3} does not reach the live adapter's {live_acc:.3} + margin {}",
                self.config.gate_margin
            )));
        }
        // Measured whether or not the guard is on: every generation records how far it moved.
        let probe = probe_chains(round.heldout, round.train);
        let drift = drift_from_base(host, &probe, &candidate)
            .map_err(|e| skipped("measuring the drift from the base model")(&e))?;
        metrics.drift.set(drift);
        if self.config.max_drift > 0.0 && drift > self.config.max_drift {
            return Ok(RoundResult::Rejected(format!(
                "drift from the base model {drift:.4} (mean KL per step and latent element on {} probe chains) exceeds --d3po-max-drift {}",
                probe.len(),
                self.config.max_drift
            )));
        }
        let stats = TrainingStats {
            pairs: round.train.len(),
            mean_loss: round.mean_loss,
            heldout_accuracy: new_acc,
            parent_heldout_accuracy: live_acc,
            seconds: round.started.elapsed().as_secs_f64(),
            drift: Some(drift),
            trained_pairs: round.pairs.iter().map(|p| p.key.clone()).collect(),
        };
        let mut learned_from: Vec<String> =
            round.pairs.iter().map(|p| p.group_id.clone()).collect();
        learned_from.sort();
        learned_from.dedup();
        // A trainer that lost its lease during the round must not publish (another one may be
        // training the same pairs now).
        if let Some(reason) = host.training_blocked() {
            return Ok(RoundResult::Skipped(format!("not published: {reason}")));
        }
        let parent = round.live.map(|g| g.meta.id.clone());
        let generation: Arc<AdapterGeneration> = host
            .adapters()
            .publish(
                candidate,
                parent.clone(),
                "trained",
                Some(stats.clone()),
                learned_from,
            )
            .map_err(|e| skipped("publishing")(&e))?;
        Ok(
            match host
                .adapters()
                .activate(Some(&generation.meta.id), parent.as_deref(), "trained")
            {
                Ok(()) => RoundResult::Published(generation.meta.id.clone(), stats),
                Err(e) => RoundResult::Rejected(format!("not made live: {e}")),
            },
        )
    }

    /// The adapter a round trains: a copy of the live one, or a fresh one (B = 0) over the
    /// configured modules, on the model's device.
    fn starting_adapter(
        &self,
        host: &PluginHost,
        live: Option<&AdapterGeneration>,
        seed: u64,
    ) -> candle_core::Result<TrainableLora> {
        let targets = host.lora_targets();
        let trainable = match live {
            Some(g) => TrainableLora::from_weights(&g.weights, targets)?,
            None => {
                let mut rng = StdRng::seed_from_u64(seed);
                let modules: Vec<&str> = self.config.targets.iter().map(String::as_str).collect();
                TrainableLora::init(
                    targets,
                    self.config.rank,
                    self.config.alpha,
                    &modules,
                    &Device::Cpu,
                    || StandardNormal.sample(&mut rng),
                )?
            }
        };
        if host.device().is_cpu() {
            Ok(trainable)
        } else {
            to_device(trainable, targets, host.device())
        }
    }

    /// One pass of D3PO over `train`; returns the mean loss of the updates applied.
    fn train(
        &self,
        host: &PluginHost,
        trainable: &TrainableLora,
        reference: Option<&LoraWeights>,
        train: &[&TrainingPair],
        seed: u64,
        metrics: &D3poMetrics,
    ) -> Result<f64, RoundResult> {
        let mut trainer =
            D3poTrainer::new(trainable.vars.clone(), self.config.train_config(), seed)
                .map_err(|e| RoundResult::Skipped(e.to_string()))?;
        let policy = ServerPolicy {
            host,
            policy: &trainable.weights,
            reference,
        };
        let (mut loss_sum, mut applied) = (0.0, 0usize);
        for pair in train {
            if host.stopping() {
                return Err(RoundResult::Skipped("shutting down".into()));
            }
            let mut pause = || host.yield_to_serving(Duration::from_secs(60));
            let outcome = trainer
                .train_pair(&policy, &pair.winner, &pair.loser, &mut pause)
                .map_err(|e| RoundResult::Skipped(format!("training step failed: {e}")))?;
            metrics.skipped_steps.inc_by(outcome.skipped_steps as u64);
            if outcome.applied {
                loss_sum += outcome.loss;
                applied += 1;
            } else {
                metrics.skipped_updates.inc();
                tracing::warn!(
                    group = %pair.group_id,
                    skipped_steps = outcome.skipped_steps,
                    "D3PO update skipped: its loss or gradient is not finite"
                );
            }
        }
        Ok(loss_sum / applied.max(1) as f64)
    }
}

fn to_device(
    t: TrainableLora,
    targets: &[LoraTarget],
    device: &Device,
) -> candle_core::Result<TrainableLora> {
    let layers = t
        .weights
        .layers()
        .iter()
        .map(|l| {
            l.as_ref()
                .map(|p| {
                    Ok::<_, candle_core::Error>(LoraPair {
                        down: p.down.to_device(device)?,
                        up: p.up.to_device(device)?,
                    })
                })
                .transpose()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let moved = LoraWeights::new(t.weights.rank(), t.weights.alpha(), targets, layers)?;
    TrainableLora::from_weights(&moved, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fifth_pair_is_held_out_and_small_rounds_hold_none_out() {
        let pairs: Vec<usize> = (0..10).collect();
        assert_eq!(
            split_heldout(&pairs, 0.2),
            (vec![0, 1, 2, 3, 5, 6, 7, 8], vec![4, 9])
        );
        assert_eq!(split_heldout(&pairs[..2], 0.2), (vec![0, 1], vec![]));
        assert_eq!(split_heldout(&pairs, 0.0), (pairs.clone(), vec![]));
        // A fraction above one half still holds out every second pair at most.
        assert_eq!(split_heldout(&pairs[..4], 0.9), (vec![0, 2], vec![1, 3]));
    }
}
