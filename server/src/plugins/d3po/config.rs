//! The `--d3po-*` flags.

use clap::Args;
use plugin_d3po::{D3poLossConfig, TrainConfig};

use crate::model::lora::TARGET_MODULES;

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
    /// AdamW learning rate. The reference's 3e-5 is tuned for tens of thousands of samples; a
    /// server learns from a few hundred labels, and 1e-3 is what moved every taste of the
    /// learning benchmark within 200 (the drift guard bounds how far it may go).
    #[arg(long = "d3po-lr", env = "IMAGEGEN_D3PO_LR", default_value_t = 1e-3)]
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
        default_values_t = TARGET_MODULES.map(String::from)
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
    /// Fraction of each chain's time indices trained on (a fresh random subset per pair). Half
    /// (the reference uses all) learns as fast per label in the learning benchmark at half the
    /// training time, which keeps a 50-label round under two minutes on two CPU cores.
    #[arg(
        long = "d3po-timestep-fraction",
        env = "IMAGEGEN_D3PO_TIMESTEP_FRACTION",
        default_value_t = 0.5
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
    /// Drift budget: the gate refuses an adapter whose denoising steps diverge from the base
    /// model's by more than this mean KL divergence per step and latent element (nats), measured
    /// on the round's probe chains. 0 turns the guard off.
    #[arg(
        long = "d3po-max-drift",
        env = "IMAGEGEN_D3PO_MAX_DRIFT",
        default_value_t = 0.1
    )]
    pub max_drift: f64,
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
        if !(self.max_drift >= 0.0 && self.max_drift.is_finite()) {
            return Err(format!(
                "--d3po-max-drift must be a finite number >= 0 (0: no guard), got {}",
                self.max_drift
            ));
        }
        if self.min_pairs == 0 || self.pairs_per_round == 0 {
            return Err("--d3po-min-pairs and --d3po-pairs-per-round must be at least 1".into());
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| !TARGET_MODULES.contains(&t.as_str()))
        {
            return Err(format!(
                "--d3po-targets: unknown module `{t}` (one of {})",
                TARGET_MODULES.join(", ")
            ));
        }
        Ok(())
    }
}
