//! Stored transitions re-evaluated under an adapter: what training and the gate need of a
//! recorded chain.

use candle_core::Tensor;

use super::{DdimSchedule, Denoiser, PredictionType, StepConstants, Trajectory, guided_mean};
use crate::model::{AdapterBatch, Mode, ModelError};

/// Stored transitions `(x_t, x_{t-1})` gathered into one batch for policy evaluation.
#[derive(Debug)]
pub struct TransitionBatch {
    /// `[n, C, h, w]` latents before the steps.
    pub x_t: Tensor,
    /// `[n, C, h, w]` latents after the steps (data: no gradient).
    pub x_prev: Tensor,
    steps: Vec<StepConstants>,
    context: Tensor,
    guidance: Vec<f64>,
    etas: Vec<f64>,
    prediction: PredictionType,
}

impl TransitionBatch {
    /// Gathers `(trajectory, step index)` pairs; every trajectory must come from `model`.
    pub fn new(model: Denoiser<'_>, items: &[(&Trajectory, usize)]) -> Result<Self, ModelError> {
        let device = model.unet.device();
        let mut x_t = Vec::with_capacity(items.len());
        let mut x_prev = Vec::with_capacity(items.len());
        let mut steps = Vec::with_capacity(items.len());
        let mut negatives = Vec::with_capacity(items.len());
        let mut prompts = Vec::with_capacity(items.len());
        let mut prediction = model.scheduler.prediction_type;
        for &(traj, j) in items {
            if j >= traj.steps() {
                return Err(ModelError::InvalidRequest {
                    field: "step_index",
                    reason: format!("must be below {}, got {j}", traj.steps()),
                });
            }
            let schedule = DdimSchedule::new(model.scheduler, traj.steps())?;
            prediction = schedule.prediction();
            let step = *schedule.step(j)?;
            if step.t != traj.timesteps[j] {
                return Err(ModelError::InvalidRequest {
                    field: "trajectory",
                    reason: format!(
                        "recorded timestep {} differs from this model's schedule ({})",
                        traj.timesteps[j], step.t
                    ),
                });
            }
            steps.push(step);
            x_t.push(traj.latents.get(j)?);
            x_prev.push(traj.latents.get(j + 1)?);
            negatives.push(traj.conditioning.negative_embeddings.as_ref().clone());
            prompts.push(traj.conditioning.prompt_embeddings.as_ref().clone());
        }
        negatives.extend(prompts);
        Ok(Self {
            x_t: Tensor::stack(&x_t, 0)?.to_device(device)?,
            x_prev: Tensor::stack(&x_prev, 0)?.to_device(device)?,
            steps,
            context: Tensor::cat(&negatives, 0)?,
            guidance: items.iter().map(|(t, _)| t.guidance_scale).collect(),
            etas: items.iter().map(|(t, _)| t.eta).collect(),
            prediction,
        })
    }

    /// The policy mean of every item under `adapters` and each item's sigma.
    pub fn policy_mean(
        &self,
        model: Denoiser<'_>,
        adapters: &AdapterBatch<'_>,
        mode: Mode,
    ) -> Result<(Tensor, Vec<f64>), ModelError> {
        guided_mean(
            model.unet,
            self.prediction,
            &self.x_t,
            &self.steps,
            &self.context,
            &self.guidance,
            &self.etas,
            adapters,
            mode,
            model.micro_batch_rows,
        )
    }

    /// The sigma of every item's step.
    pub fn sigmas(&self) -> Vec<f64> {
        self.steps
            .iter()
            .zip(&self.etas)
            .map(|(s, &e)| s.sigma(e))
            .collect()
    }
}
