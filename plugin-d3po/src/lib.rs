//! D3PO (Yang et al., CVPR 2024): direct preference optimisation over the DDIM denoising chain.
//!
//! This crate owns the algorithm and nothing else: preference pairs from feedback, the clamped
//! D3PO loss, the trainer (time-index shuffles, accumulation, clipping, AdamW) and the
//! implicit-reward ranking the gate uses. It knows nothing of gRPC or of the server. The model
//! reaches it as a [`StepPolicy`]: the host's sampler owns the diffusion-step math (schedule,
//! step mean, log-probabilities) and hands the trainer log-ratios computed by the same kernels
//! that sampled the chain (`../shared/docs/d3po.md`, pitfalls).

mod error;
pub mod loss;
pub mod pairs;
pub mod trainer;

pub use error::{D3poError, Result};
pub use loss::{D3poLossConfig, d3po_loss};
pub use pairs::{GroupFeedback, PreferencePair, build_pairs};
pub use trainer::{D3poTrainer, PairOutcome, StepPolicy, TrainConfig, ranking_accuracy};
