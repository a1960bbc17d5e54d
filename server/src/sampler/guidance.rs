//! One guided denoising step over a batch: the UNet's two CFG halves combined into the policy
//! mean. Sampling and training both call [`guided_mean`], so a recomputed log-probability
//! reproduces the recorded one.

use candle_core::Tensor;

use super::step::per_item;
use super::{PredictionType, StepConstants, step_mean};
use crate::model::{AdapterBatch, Mode, ModelError, UNet2DConditionModel};

/// The guided policy mean `mu` of a batch of latents `x_t` `[n, C, h, w]` (f32), each item at its
/// own step, with `context` `[2n, S, D]` holding the negative rows first, then the prompts.
/// Returns `mu` in f32 and each item's sigma.
#[allow(clippy::too_many_arguments)]
pub fn guided_mean(
    unet: &UNet2DConditionModel,
    prediction: PredictionType,
    x_t: &Tensor,
    steps: &[StepConstants],
    context: &Tensor,
    guidance: &[f64],
    etas: &[f64],
    adapters: &AdapterBatch<'_>,
    mode: Mode,
    max_rows: usize,
) -> Result<(Tensor, Vec<f64>), ModelError> {
    let n = x_t.dim(0)?;
    let input = Tensor::cat(&[x_t, x_t], 0)?.to_dtype(unet.dtype())?;
    let timesteps: Vec<f64> = steps.iter().chain(steps).map(|s| s.t as f64).collect();
    // Both halves of the CFG batch run with the same adapter rows.
    let doubled;
    let adapters = match adapters {
        AdapterBatch::Spans(spans) => {
            doubled = AdapterBatch::Spans(spans.iter().chain(spans).copied().collect());
            &doubled
        }
        uniform => uniform,
    };
    // On the CPU, UNet calls of a few rows run faster per row than one large call (the
    // activations stay in cache): 8 images (16 rows) in chunks of 4 rows take 240 ms per image
    // against 286 ms in one call. Mixed-adapter batches run whole.
    let mut chunk = max_rows.max(1);
    // A checkpointed training forward's peak is one block recomputed over the call's rows:
    // two rows per call halve it (the rows' graphs are small and kept either way).
    if mode == Mode::Training && unet.checkpoints(2, x_t.dim(2)?, x_t.dim(3)?) {
        chunk = chunk.min(2);
    }
    let out = if matches!(adapters, AdapterBatch::Uniform(_)) && 2 * n > chunk {
        let parts = (0..2 * n)
            .step_by(chunk)
            .map(|s| {
                let len = chunk.min(2 * n - s);
                unet.forward(
                    &input.narrow(0, s, len)?,
                    &timesteps[s..s + len],
                    &context.narrow(0, s, len)?,
                    adapters,
                    mode,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(x_t.dtype())?
    } else {
        unet.forward(&input, &timesteps, context, adapters, mode)?
            .to_dtype(x_t.dtype())?
    };
    let uncond = out.narrow(0, 0, n)?;
    let cond = out.narrow(0, n, n)?;
    let g = per_item(guidance, x_t)?;
    let guided = (&uncond + (cond - &uncond)?.broadcast_mul(&g)?)?;
    let coefficients: Vec<(f64, f64)> = steps
        .iter()
        .zip(etas)
        .map(|(s, &e)| s.mean_coefficients(e, prediction))
        .collect();
    let sigmas = steps.iter().zip(etas).map(|(s, &e)| s.sigma(e)).collect();
    Ok((step_mean(x_t, &guided, &coefficients)?, sigmas))
}
