//! [`PluginHost`]: everything a plugin may touch, as methods.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::adapters::AdapterRegistry;
use crate::model::{AdapterBatch, LoraTarget, LoraWeights, Mode, ModelError};
use crate::pipeline::DiffusionModel;
use crate::sampler::{Trajectory, TransitionBatch, kl_divergence, log_ratio};
use crate::store::LearningStore;
use crate::store::buffer::GroupSnapshot;

/// What must hold before a round may train (scale-out): this process holds the trainer lease,
/// and its replay of the learning stream has caught up (or it would retrain pairs whose ledger
/// entries it has not read yet). Both absent on one machine.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrainingGate {
    /// Set while this process holds the trainer lease.
    pub lease: Option<Arc<AtomicBool>>,
    /// Set once the replay reached the stream's end as it was at start.
    pub caught_up: Option<Arc<AtomicBool>>,
}

impl TrainingGate {
    fn blocked(&self) -> Option<&'static str> {
        let unset = |flag: &Option<Arc<AtomicBool>>| {
            flag.as_ref().is_some_and(|f| !f.load(Ordering::Acquire))
        };
        if unset(&self.lease) {
            Some("another process holds the trainer lease")
        } else if unset(&self.caught_up) {
            Some("replaying the learning stream")
        } else {
            None
        }
    }
}

/// What the host gives a plugin.
#[derive(Clone)]
pub struct PluginHost {
    store: Arc<dyn LearningStore>,
    model: Arc<DiffusionModel>,
    adapters: Arc<AdapterRegistry>,
    metrics: prometheus::Registry,
    queue_depth: prometheus::IntGauge,
    stop: Arc<AtomicBool>,
    gate: TrainingGate,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("model", &self.model.id)
            .finish()
    }
}

impl PluginHost {
    /// A host over the server's parts.
    pub(crate) fn new(
        store: Arc<dyn LearningStore>,
        model: Arc<DiffusionModel>,
        adapters: Arc<AdapterRegistry>,
        metrics: prometheus::Registry,
        queue_depth: prometheus::IntGauge,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            store,
            model,
            adapters,
            metrics,
            queue_depth,
            stop,
            gate: TrainingGate::default(),
        }
    }

    /// Trains only while `gate` holds.
    pub(crate) fn with_gate(mut self, gate: TrainingGate) -> Self {
        self.gate = gate;
        self
    }

    /// Why training may not run now (`None`: it may).
    pub fn training_blocked(&self) -> Option<&'static str> {
        self.gate.blocked()
    }

    /// The store's groups that carry feedback, oldest first (a consistent copy).
    pub fn labelled_groups(&self) -> Vec<GroupSnapshot> {
        self.store.groups(false).unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the learning store");
            Vec::new()
        })
    }

    /// The ledger: every `(winner, loser)` pair already trained on. It is the store's ledger
    /// plus the pairs the live generation and its ancestors record, so a round that published
    /// but died before recording its pairs does not train them again.
    pub fn trained_pairs(&self) -> HashSet<(String, String)> {
        let mut pairs = self.store.trained_pairs().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the ledger of trained pairs");
            HashSet::new()
        });
        let mut next = self
            .adapters
            .live()
            .ok()
            .flatten()
            .map(|g| g.meta.id.clone());
        let mut seen = HashSet::new();
        while let Some(id) = next.filter(|id| seen.insert(id.clone())) {
            let Ok(meta) = self.adapters.meta(&id) else {
                break;
            };
            if let Some(stats) = &meta.stats {
                pairs.extend(stats.trained_pairs.iter().cloned());
            }
            next = meta.parent;
        }
        pairs
    }

    /// Records trained pairs `(group, winner, loser)` in the ledger, and groups whose feedback
    /// is consumed in full at the version seen (they may then be evicted like any other);
    /// returns whether it was made durable.
    pub fn record_trained(
        &self,
        pairs: &[(String, String, String)],
        settled: &[(String, u64)],
    ) -> bool {
        match self.store.mark_trained(pairs, settled) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "recording trained pairs");
                false
            }
        }
    }

    /// Stored steps of recorded chains gathered for evaluation under adapters; every chain must
    /// come from the served model.
    pub fn transitions(
        &self,
        items: &[(&Trajectory, usize)],
    ) -> Result<Transitions<'_>, ModelError> {
        Ok(Transitions {
            batch: TransitionBatch::new(self.model.denoiser(), items)?,
            model: &self.model,
        })
    }

    /// Adapter generations and the live alias.
    pub fn adapters(&self) -> &AdapterRegistry {
        &self.adapters
    }

    /// The projections an adapter of the served model covers, in the registry's order.
    pub fn lora_targets(&self) -> &[LoraTarget] {
        self.adapters.targets()
    }

    /// Where the served model runs (adapters to train must live there too).
    pub fn device(&self) -> &Device {
        self.model.unet.device()
    }

    /// Where plugin metrics are registered.
    pub fn metrics(&self) -> &prometheus::Registry {
        &self.metrics
    }

    /// Requests admitted and not finished: the plugin should wait while this is non-zero.
    pub fn serving_load(&self) -> i64 {
        self.queue_depth.get()
    }

    /// Blocks while requests are in flight (serving has priority), at most `max`.
    pub fn yield_to_serving(&self, max: Duration) {
        let start = Instant::now();
        while self.serving_load() > 0 && !self.stopping() && start.elapsed() < max {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The flag set when the server shuts down.
    pub fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// Whether the server is shutting down.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// Stored transitions `(x_t, x_{t-1})` of recorded chains, evaluated with the sampler's step math.
#[derive(Debug)]
pub struct Transitions<'a> {
    batch: TransitionBatch,
    model: &'a DiffusionModel,
}

impl Transitions<'_> {
    /// `delta = log pi_policy(x_{t-1} | x_t) - log pi_reference(x_{t-1} | x_t)` of every stored
    /// step, `[n]` (`None` = the base model). In [`Mode::Training`] it is differentiable with
    /// respect to the policy adapter's variables; the reference is held fixed. Both run the same
    /// kernels, so delta is exactly 0 while the two adapters are equal.
    pub fn log_ratios(
        &self,
        policy: Option<&LoraWeights>,
        reference: Option<&LoraWeights>,
        mode: Mode,
    ) -> Result<Tensor, ModelError> {
        let denoiser = self.model.denoiser();
        let (mu, sigmas) =
            self.batch
                .policy_mean(denoiser, &AdapterBatch::Uniform(policy), mode)?;
        let (mu_ref, _) =
            self.batch
                .policy_mean(denoiser, &AdapterBatch::Uniform(reference), mode)?;
        Ok(log_ratio(
            &self.batch.x_prev,
            &mu,
            &mu_ref.detach(),
            &sigmas,
        )?)
    }

    /// `KL(pi_policy || pi_reference)` of every stored step, per latent element, `[n]`
    /// (`None` = the base model): how far one adapter's denoising steps sit from another's on
    /// these states. No graph is built.
    pub fn kl_divergence(
        &self,
        policy: Option<&LoraWeights>,
        reference: Option<&LoraWeights>,
    ) -> Result<Tensor, ModelError> {
        let denoiser = self.model.denoiser();
        let (mu, sigmas) =
            self.batch
                .policy_mean(denoiser, &AdapterBatch::Uniform(policy), Mode::Inference)?;
        let (mu_ref, _) =
            self.batch
                .policy_mean(denoiser, &AdapterBatch::Uniform(reference), Mode::Inference)?;
        Ok(kl_divergence(&mu, &mu_ref, &sigmas)?)
    }
}
