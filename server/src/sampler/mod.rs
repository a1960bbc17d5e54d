//! The diffusion-step math: the DDIM schedule as diffusers computes it, the guided step mean, the
//! Gaussian log-probability of a step, recorded trajectories and their re-evaluation.
//!
//! The sampler is the one owner of this math. The pipeline samples with it, and a learning
//! plugin consumes it through the plugin host, so the chain that is sampled and the chain that is
//! trained on are computed by the same kernels (`../shared/docs/d3po.md`, pitfalls).

mod error;
mod guidance;
mod schedule;
mod step;
mod trajectory;
mod transitions;

pub use error::SamplerError;
pub use guidance::guided_mean;
pub use schedule::{
    BetaSchedule, DdimSchedule, PredictionType, SchedulerConfig, StepConstants, TimestepSpacing,
};
pub(crate) use step::per_item;
pub use step::{kl_divergence, log_prob, log_ratio, step_mean};
pub use trajectory::{Conditioning, Trajectory};
pub use transitions::TransitionBatch;

use crate::model::UNet2DConditionModel;

/// What the step math needs of a model: its UNet, its training schedule, and how many UNet rows
/// one call takes on this device.
#[derive(Debug, Clone, Copy)]
pub struct Denoiser<'a> {
    /// The noise (or v) predictor.
    pub unet: &'a UNet2DConditionModel,
    /// The training schedule the recorded timesteps come from.
    pub scheduler: &'a SchedulerConfig,
    /// Largest UNet call (rows) before a uniform batch is split.
    pub micro_batch_rows: usize,
}
