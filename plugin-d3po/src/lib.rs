//! D3PO (Yang et al., CVPR 2024): direct preference optimisation over the DDIM denoising chain.
//!
//! This crate owns the algorithm and nothing else: the DDIM schedule as diffusers computes it,
//! the Gaussian policy of one denoising step (its mean, its log-probability and the log-ratio
//! between two policies), and the clamped D3PO loss. It knows nothing of gRPC or of the server;
//! the server's sampler uses the same step code, so the chain that is sampled and the chain that
//! is trained on are computed by the same kernels (`../shared/docs/d3po.md`, pitfalls).

mod error;
pub mod loss;
pub mod pairs;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use error::{D3poError, Result};
pub use loss::{D3poLossConfig, d3po_loss};
pub use pairs::{GroupFeedback, PreferencePair, build_pairs};
pub use schedule::{
    BetaSchedule, DdimSchedule, PredictionType, SchedulerConfig, StepConstants, TimestepSpacing,
};
pub use step::{log_prob, log_ratio, step_mean};
pub use trainer::{D3poTrainer, PairOutcome, StepPolicy, TrainConfig, ranking_accuracy};
