//! The D3PO plugin: turns feedback into LoRA adapters while the server serves.
//!
//! Every `--d3po-interval-secs` (or on `TriggerTraining`), when at least `--d3po-min-pairs` new
//! preference pairs exist in the buffer, a round trains a LoRA adapter starting from the live one
//! (the reference policy is the round's starting point), checks it on held-out pairs, and, if it
//! passes the gate, publishes it and makes it live with a compare-and-swap. The algorithm itself
//! (pairs, loss, optimiser) is `plugin-d3po`'s; this module connects it to the host.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use clap::Args;
use plugin_d3po::{
    D3poLossConfig, D3poTrainer, GroupFeedback, PreferencePair, StepPolicy, TrainConfig,
    build_pairs, log_ratio, ranking_accuracy,
};
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use crate::adapters::{AdapterGeneration, TrainingStats};
use crate::buffer::{Group, StoredImage, Vote};
use crate::model::{AdapterBatch, LoraPair, LoraWeights, Mode, TrainableLora};
use crate::plugin::{Plugin, PluginHost};
use crate::sampler::{Trajectory, TransitionBatch};

/// `--d3po-*` settings (defaults from `../shared/docs/d3po.md`).
#[derive(Debug, Clone, Args)]
pub struct D3poConfig {
    /// Train adapters from feedback beside serving.
    #[arg(long = "d3po-enabled", env = "IMAGEGEN_D3PO_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Seconds between training rounds.
    #[arg(
        long = "d3po-interval-secs",
        env = "IMAGEGEN_D3PO_INTERVAL_SECS",
        default_value_t = 300
    )]
    pub interval_secs: u64,
    /// New preference pairs needed before a periodic round runs.
    #[arg(
        long = "d3po-min-pairs",
        env = "IMAGEGEN_D3PO_MIN_PAIRS",
        default_value_t = 8
    )]
    pub min_pairs: usize,
    /// Most pairs one round trains on (newest first).
    #[arg(
        long = "d3po-pairs-per-round",
        env = "IMAGEGEN_D3PO_PAIRS_PER_ROUND",
        default_value_t = 64
    )]
    pub pairs_per_round: usize,
    /// AdamW learning rate.
    #[arg(long = "d3po-lr", env = "IMAGEGEN_D3PO_LR", default_value_t = 3e-5)]
    pub lr: f64,
    /// LoRA rank.
    #[arg(long = "d3po-rank", env = "IMAGEGEN_D3PO_RANK", default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank; alpha = rank gives diffusers' default scale 1).
    #[arg(
        long = "d3po-alpha",
        env = "IMAGEGEN_D3PO_ALPHA",
        default_value_t = 4.0
    )]
    pub alpha: f64,
    /// Projections LoRA adapts.
    #[arg(
        long = "d3po-targets",
        env = "IMAGEGEN_D3PO_TARGETS",
        value_delimiter = ',',
        default_value = "to_q,to_k,to_v,to_out.0"
    )]
    pub targets: Vec<String>,
    /// Inverse temperature of the preference model.
    #[arg(long = "d3po-beta", env = "IMAGEGEN_D3PO_BETA", default_value_t = 0.1)]
    pub beta: f64,
    /// Ratio clamp: r = clamp(delta, ln(1 - eps), ln(1 + eps)).
    #[arg(
        long = "d3po-clamp-eps",
        env = "IMAGEGEN_D3PO_CLAMP_EPS",
        default_value_t = 0.1
    )]
    pub clamp_eps: f64,
    /// Fraction of each chain's time indices trained on.
    #[arg(
        long = "d3po-timestep-fraction",
        env = "IMAGEGEN_D3PO_TIMESTEP_FRACTION",
        default_value_t = 1.0
    )]
    pub timestep_fraction: f64,
    /// Global gradient-norm clip.
    #[arg(
        long = "d3po-max-grad-norm",
        env = "IMAGEGEN_D3PO_MAX_GRAD_NORM",
        default_value_t = 1.0
    )]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(
        long = "d3po-weight-decay",
        env = "IMAGEGEN_D3PO_WEIGHT_DECAY",
        default_value_t = 1e-4
    )]
    pub weight_decay: f64,
    /// Fraction of a round's pairs held out for the gate.
    #[arg(
        long = "d3po-heldout-fraction",
        env = "IMAGEGEN_D3PO_HELDOUT_FRACTION",
        default_value_t = 0.2
    )]
    pub heldout_fraction: f64,
    /// The new adapter's held-out accuracy must reach the live one's plus this margin.
    #[arg(
        long = "d3po-gate-margin",
        env = "IMAGEGEN_D3PO_GATE_MARGIN",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub gate_margin: f64,
    /// Seed of adapter initialisation and time-index shuffles.
    #[arg(long = "d3po-seed", env = "IMAGEGEN_D3PO_SEED", default_value_t = 0)]
    pub seed: u64,
}

impl D3poConfig {
    /// The optimiser settings.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            loss: D3poLossConfig {
                beta: self.beta,
                clamp_eps: self.clamp_eps,
            },
            lr: self.lr,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            timestep_fraction: self.timestep_fraction,
            ..TrainConfig::default()
        }
    }

    /// Checks ranges; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.train_config()
            .validate()
            .map_err(|e| format!("--d3po-*: {e}"))?;
        if self.rank == 0 || self.rank > 256 {
            return Err(format!("--d3po-rank must be in 1..=256, got {}", self.rank));
        }
        if !(self.heldout_fraction >= 0.0 && self.heldout_fraction < 1.0) {
            return Err(format!(
                "--d3po-heldout-fraction must be in [0, 1), got {}",
                self.heldout_fraction
            ));
        }
        if self.min_pairs == 0 || self.pairs_per_round == 0 {
            return Err("--d3po-min-pairs and --d3po-pairs-per-round must be at least 1".into());
        }
        let known = ["to_q", "to_k", "to_v", "to_out.0"];
        if let Some(t) = self.targets.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(format!(
                "--d3po-targets: unknown module `{t}` (to_q, to_k, to_v, to_out.0)"
            ));
        }
        Ok(())
    }
}

/// What the trainer is doing, for `GetTrainingStatus`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingStatus {
    /// Whether training is on.
    pub enabled: bool,
    /// `idle`, `waiting`, `training`, `gating`.
    pub state: String,
    /// Rounds whose adapter went live.
    pub published: u64,
    /// Rounds whose adapter the gate refused.
    pub rejected: u64,
    /// Why the last round was rejected or skipped.
    pub last_reason: String,
    /// Pairs not yet trained on.
    pub pending_pairs: usize,
    /// The last generation published.
    pub last_generation: String,
    /// Wall time of the last round.
    pub last_round_seconds: f64,
}

/// Shared between the trainer thread and the API: status, and a trigger.
#[derive(Debug, Default)]
pub struct TrainerControl {
    status: Mutex<TrainingStatus>,
    triggered: Mutex<bool>,
    wake: Condvar,
}

impl TrainerControl {
    /// The current status.
    pub fn status(&self) -> TrainingStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Asks for a round now.
    pub fn trigger(&self) {
        if let Ok(mut t) = self.triggered.lock() {
            *t = true;
            self.wake.notify_all();
        }
    }

    /// Wakes the trainer (shutdown).
    pub fn wake(&self) {
        self.wake.notify_all();
    }

    fn update(&self, f: impl FnOnce(&mut TrainingStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Waits for a trigger or the interval; returns whether a trigger arrived.
    fn wait(&self, interval: Duration, stop: &AtomicBool) -> bool {
        let Ok(mut triggered) = self.triggered.lock() else {
            return false;
        };
        let deadline = Instant::now() + interval;
        while !*triggered && !stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.wake.wait_timeout(triggered, deadline - now) {
                Ok((guard, _)) => triggered = guard,
                Err(_) => return false,
            }
        }
        std::mem::take(&mut *triggered)
    }
}

/// The plugin's metrics.
#[derive(Debug, Clone)]
struct D3poMetrics {
    rounds: IntCounterVec,
    round_duration: Histogram,
    loss: Gauge,
    pairs_used: IntCounter,
    heldout_accuracy: Gauge,
}

impl D3poMetrics {
    fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            rounds: IntCounterVec::new(
                Opts::new(
                    "imagegen_d3po_rounds_total",
                    "D3PO training rounds, by result.",
                ),
                &["result"],
            )?,
            round_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "imagegen_d3po_round_duration_seconds",
                    "Wall time of a D3PO round.",
                )
                .buckets(vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )?,
            loss: Gauge::new("imagegen_d3po_loss", "Mean D3PO loss of the last round.")?,
            pairs_used: IntCounter::new(
                "imagegen_d3po_pairs_used_total",
                "Preference pairs trained on.",
            )?,
            heldout_accuracy: Gauge::new(
                "imagegen_d3po_heldout_accuracy",
                "Held-out ranking accuracy of the last trained adapter.",
            )?,
        };
        registry.register(Box::new(m.rounds.clone()))?;
        registry.register(Box::new(m.round_duration.clone()))?;
        registry.register(Box::new(m.loss.clone()))?;
        registry.register(Box::new(m.pairs_used.clone()))?;
        registry.register(Box::new(m.heldout_accuracy.clone()))?;
        Ok(m)
    }
}

/// The D3PO plugin.
#[derive(Debug)]
pub struct D3poPlugin {
    config: D3poConfig,
    control: Arc<TrainerControl>,
}

impl D3poPlugin {
    /// A plugin with `config`, reporting through `control`.
    pub fn new(config: D3poConfig, control: Arc<TrainerControl>) -> Self {
        control.update(|s| {
            s.enabled = config.enabled;
            s.state = "idle".into();
        });
        Self { config, control }
    }
}

/// A preference pair with its chains.
struct TrainingPair {
    group_id: String,
    key: (String, String),
    winner: Arc<Trajectory>,
    loser: Arc<Trajectory>,
}

/// Pairs from every labelled group, newest groups first.
fn collect_pairs(groups: &[(String, Group, Vec<StoredImage>)]) -> Vec<TrainingPair> {
    let mut out = Vec::new();
    for (group_id, group, images) in groups.iter().rev() {
        let feedback = GroupFeedback {
            images: images.iter().map(|i| i.image_id.clone()).collect(),
            votes: images
                .iter()
                .flat_map(|i| {
                    i.votes.iter().map(move |(rater, v)| {
                        (
                            i.image_id.clone(),
                            rater.clone(),
                            if *v == Vote::Up { 1 } else { -1 },
                        )
                    })
                })
                .collect(),
            comparisons: group
                .comparisons
                .iter()
                .map(|c| (c.winner.clone(), c.loser.clone(), c.rater.clone()))
                .collect(),
            best_of: group
                .best_of
                .iter()
                .map(|(r, i)| (r.clone(), i.clone()))
                .collect(),
        };
        for PreferencePair { winner, loser } in build_pairs(&feedback) {
            let find = |id: &str| {
                images
                    .iter()
                    .find(|i| i.image_id == id)
                    .map(|i| i.trajectory.clone())
            };
            if let (Some(w), Some(l)) = (find(&winner), find(&loser)) {
                out.push(TrainingPair {
                    group_id: group_id.clone(),
                    key: (winner, loser),
                    winner: w,
                    loser: l,
                });
            }
        }
    }
    out
}

/// The served UNet as a D3PO policy: the trainable LoRA against the round's reference.
struct ServerPolicy<'a> {
    host: &'a PluginHost,
    policy: &'a LoraWeights,
    reference: Option<&'a LoraWeights>,
}

impl StepPolicy for ServerPolicy<'_> {
    type Item = Trajectory;

    fn steps(&self, item: &Trajectory) -> usize {
        item.steps()
    }

    fn log_ratios(&self, batch: &[(&Trajectory, usize)]) -> plugin_d3po::Result<Tensor> {
        let model = &self.host.model;
        let transitions = TransitionBatch::new(model, batch).map_err(to_d3po)?;
        // Policy and reference run the same (differentiable) kernels, so delta is exactly 0
        // while they are equal.
        let (mu, sigmas) = transitions
            .policy_mean(
                model,
                &AdapterBatch::Uniform(Some(self.policy)),
                Mode::Training,
            )
            .map_err(to_d3po)?;
        let (mu_ref, _) = transitions
            .policy_mean(
                model,
                &AdapterBatch::Uniform(self.reference),
                Mode::Training,
            )
            .map_err(to_d3po)?;
        log_ratio(&transitions.x_prev, &mu, &mu_ref.detach(), &sigmas)
    }
}

fn to_d3po(e: crate::error::ModelError) -> plugin_d3po::D3poError {
    match e {
        crate::error::ModelError::D3po(d) => d,
        crate::error::ModelError::Tensor(t) => plugin_d3po::D3poError::Tensor(t),
        other => plugin_d3po::D3poError::InvalidArgument {
            name: "model",
            reason: other.to_string(),
        },
    }
}

/// The implicit reward of a chain under `adapter`: the sum over its steps of the log-ratio to
/// the base model.
fn implicit_reward(
    host: &PluginHost,
    chain: &Trajectory,
    adapter: Option<&LoraWeights>,
) -> Result<f64, String> {
    let Some(adapter) = adapter else {
        return Ok(0.0);
    };
    let items: Vec<(&Trajectory, usize)> = (0..chain.steps()).map(|j| (chain, j)).collect();
    let batch = TransitionBatch::new(&host.model, &items).map_err(|e| e.to_string())?;
    let (mu, sigmas) = batch
        .policy_mean(
            &host.model,
            &AdapterBatch::Uniform(Some(adapter)),
            Mode::Inference,
        )
        .map_err(|e| e.to_string())?;
    let (mu_base, _) = batch
        .policy_mean(&host.model, &AdapterBatch::BASE, Mode::Inference)
        .map_err(|e| e.to_string())?;
    let delta = log_ratio(&batch.x_prev, &mu, &mu_base, &sigmas).map_err(|e| e.to_string())?;
    delta
        .sum_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F64))
        .and_then(|t| t.to_scalar::<f64>())
        .map_err(|e| e.to_string())
}

fn heldout_accuracy(
    host: &PluginHost,
    pairs: &[&TrainingPair],
    adapter: Option<&LoraWeights>,
) -> Result<f64, String> {
    let mut rewards = Vec::with_capacity(pairs.len());
    for p in pairs {
        rewards.push((
            implicit_reward(host, &p.winner, adapter)?,
            implicit_reward(host, &p.loser, adapter)?,
        ));
    }
    Ok(ranking_accuracy(&rewards))
}

fn all_finite(weights: &LoraWeights) -> bool {
    weights.layers().iter().flatten().all(|p| {
        [&p.down, &p.up].iter().all(|t| {
            t.abs()
                .and_then(|a| a.max_all())
                .and_then(|m| m.to_scalar::<f32>())
                .is_ok_and(f32::is_finite)
        })
    })
}

/// What one round ended with.
enum RoundResult {
    Published(String, TrainingStats),
    Rejected(String),
    Skipped(String),
}

impl D3poPlugin {
    fn round(
        &self,
        host: &PluginHost,
        trained: &mut HashSet<(String, String)>,
        triggered: bool,
        metrics: &D3poMetrics,
    ) -> RoundResult {
        let started = Instant::now();
        let groups = host.labelled_groups();
        let fresh: Vec<TrainingPair> = collect_pairs(&groups)
            .into_iter()
            .filter(|p| !trained.contains(&p.key))
            .collect();
        self.control.update(|s| s.pending_pairs = fresh.len());
        let needed = if triggered { 1 } else { self.config.min_pairs };
        if fresh.len() < needed {
            return RoundResult::Skipped(format!(
                "{} new preference pairs, {needed} needed",
                fresh.len()
            ));
        }
        let pairs: Vec<&TrainingPair> = fresh.iter().take(self.config.pairs_per_round).collect();
        // Every k-th pair is held out for the gate (none when there are too few).
        let heldout_every = if self.config.heldout_fraction > 0.0 && pairs.len() >= 3 {
            (1.0 / self.config.heldout_fraction).round().max(2.0) as usize
        } else {
            usize::MAX
        };
        let is_heldout =
            |i: usize| heldout_every != usize::MAX && i % heldout_every == heldout_every - 1;
        let heldout: Vec<&TrainingPair> = pairs
            .iter()
            .enumerate()
            .filter(|(i, _)| is_heldout(*i))
            .map(|(_, p)| *p)
            .collect();
        let train: Vec<&TrainingPair> = pairs
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_heldout(*i))
            .map(|(_, p)| *p)
            .collect();

        let live = match host.adapters.live() {
            Ok(l) => l,
            Err(e) => return RoundResult::Skipped(e.to_string()),
        };
        let targets = host.adapters.targets().to_vec();
        self.control.update(|s| s.state = "training".into());
        let trainable = match &live {
            Some(g) => TrainableLora::from_weights(&g.weights, &targets),
            None => {
                let mut rng = StdRng::seed_from_u64(self.config.seed ^ trained.len() as u64);
                let modules: Vec<&str> = self.config.targets.iter().map(String::as_str).collect();
                TrainableLora::init(
                    &targets,
                    self.config.rank,
                    self.config.alpha,
                    &modules,
                    &Device::Cpu,
                    || StandardNormal.sample(&mut rng),
                )
            }
        };
        let trainable = match trainable.and_then(|t| {
            let device = host.model.unet.device().clone();
            if device.is_cpu() {
                Ok(t)
            } else {
                to_device(t, &targets, &device)
            }
        }) {
            Ok(t) => t,
            Err(e) => return RoundResult::Skipped(format!("initialising the adapter: {e}")),
        };
        let reference = live.as_ref().map(|g| &g.weights);
        let mut trainer = match D3poTrainer::new(
            trainable.vars.clone(),
            self.config.train_config(),
            self.config.seed ^ trained.len() as u64,
        ) {
            Ok(t) => t,
            Err(e) => return RoundResult::Skipped(e.to_string()),
        };
        let policy = ServerPolicy {
            host,
            policy: &trainable.weights,
            reference,
        };
        let mut loss_sum = 0.0;
        for pair in &train {
            if host.stopping() {
                return RoundResult::Skipped("shutting down".into());
            }
            let mut pause = || host.yield_to_serving(Duration::from_secs(60));
            match trainer.train_pair(&policy, &pair.winner, &pair.loser, &mut pause) {
                Ok(outcome) => loss_sum += outcome.loss,
                Err(e) => return RoundResult::Skipped(format!("training step failed: {e}")),
            }
        }
        metrics.pairs_used.inc_by(train.len() as u64);
        let mean_loss = loss_sum / train.len().max(1) as f64;
        metrics.loss.set(mean_loss);

        self.control.update(|s| s.state = "gating".into());
        let candidate = match trainable.weights.detached() {
            Ok(c) => c,
            Err(e) => return RoundResult::Skipped(format!("copying the trained weights: {e}")),
        };
        if !all_finite(&candidate) {
            return RoundResult::Rejected("the trained weights are not finite".into());
        }
        let (new_acc, live_acc) = match (
            heldout_accuracy(host, &heldout, Some(&candidate)),
            heldout_accuracy(host, &heldout, reference),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                return RoundResult::Skipped(format!("evaluating held-out pairs: {e}"));
            }
        };
        metrics.heldout_accuracy.set(new_acc);
        for p in &pairs {
            trained.insert(p.key.clone());
        }
        if new_acc < live_acc + self.config.gate_margin {
            return RoundResult::Rejected(format!(
                "held-out accuracy {new_acc:.3} does not reach the live adapter's {live_acc:.3} + margin {}",
                self.config.gate_margin
            ));
        }
        let stats = TrainingStats {
            pairs: train.len(),
            mean_loss,
            heldout_accuracy: new_acc,
            parent_heldout_accuracy: live_acc,
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut learned_from: Vec<String> = pairs.iter().map(|p| p.group_id.clone()).collect();
        learned_from.sort();
        learned_from.dedup();
        let parent = live.as_ref().map(|g| g.meta.id.clone());
        let published: Result<Arc<AdapterGeneration>, _> = host.adapters.publish(
            candidate,
            parent.clone(),
            "trained",
            Some(stats.clone()),
            learned_from,
        );
        let generation = match published {
            Ok(g) => g,
            Err(e) => return RoundResult::Skipped(format!("publishing: {e}")),
        };
        match host
            .adapters
            .activate(Some(&generation.meta.id), parent.as_deref(), "trained")
        {
            Ok(()) => RoundResult::Published(generation.meta.id.clone(), stats),
            Err(e) => RoundResult::Rejected(format!("not made live: {e}")),
        }
    }
}

fn to_device(
    t: TrainableLora,
    targets: &[crate::model::LoraTarget],
    device: &Device,
) -> candle_core::Result<TrainableLora> {
    let moved = LoraWeights::new(
        t.weights.rank(),
        t.weights.alpha(),
        targets,
        t.weights
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
            .collect::<candle_core::Result<Vec<_>>>()?,
    )?;
    TrainableLora::from_weights(&moved, targets)
}

impl Plugin for D3poPlugin {
    fn name(&self) -> &'static str {
        "d3po"
    }

    fn run(self: Box<Self>, host: PluginHost) {
        let metrics = match D3poMetrics::register(&host.metrics) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "registering D3PO metrics; training disabled");
                return;
            }
        };
        let mut trained = HashSet::new();
        let interval = Duration::from_secs(self.config.interval_secs.max(1));
        while !host.stopping() {
            self.control.update(|s| s.state = "waiting".into());
            let triggered = self.control.wait(interval, host.stop_flag());
            if host.stopping() {
                break;
            }
            let started = Instant::now();
            let result = self.round(&host, &mut trained, triggered, &metrics);
            let seconds = started.elapsed().as_secs_f64();
            match &result {
                RoundResult::Published(id, stats) => {
                    metrics.rounds.with_label_values(&["published"]).inc();
                    metrics.round_duration.observe(seconds);
                    tracing::info!(generation = %id, pairs = stats.pairs, loss = stats.mean_loss, accuracy = stats.heldout_accuracy, "D3PO adapter published");
                }
                RoundResult::Rejected(reason) => {
                    metrics.rounds.with_label_values(&["rejected"]).inc();
                    metrics.round_duration.observe(seconds);
                    tracing::warn!(%reason, "D3PO adapter rejected");
                }
                RoundResult::Skipped(reason) => {
                    metrics.rounds.with_label_values(&["skipped"]).inc();
                    tracing::debug!(%reason, "D3PO round skipped");
                }
            }
            self.control.update(|s| {
                s.state = "idle".into();
                s.last_round_seconds = seconds;
                match result {
                    RoundResult::Published(id, _) => {
                        s.published += 1;
                        s.last_generation = id;
                        s.last_reason.clear();
                    }
                    RoundResult::Rejected(reason) => {
                        s.rejected += 1;
                        s.last_reason = reason;
                    }
                    RoundResult::Skipped(reason) => s.last_reason = reason,
                }
            });
        }
    }
}
