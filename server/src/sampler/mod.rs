//! DDIM sampling with classifier-free guidance that records every step as D3PO needs it.
//!
//! The step that is sampled and the step that is later re-evaluated for training share one
//! function ([`guided_mean`]): the same batch layout, guidance and schedule arithmetic, so a
//! recomputed log-probability reproduces the recorded one.

mod trajectory;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use plugin_d3po::{DdimSchedule, PredictionType, StepConstants, log_prob, step_mean};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

pub use trajectory::{Conditioning, Trajectory};

use crate::error::ModelError;
use crate::model::loader::DiffusionModel;
use crate::model::{AdapterBatch, LoraWeights, Mode, UNet2DConditionModel};

/// One text-to-image request as the sampler sees it (already validated by the caller's API).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// Images to draw; they share `x_T`.
    pub num_images: usize,
    /// Seed of `x_T` and of the per-step noise.
    pub seed: u64,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none; the unconditional pass is still run).
    pub guidance_scale: f64,
    /// DDIM eta in (0, 1].
    pub eta: f64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
}

/// The adapter a batch runs with, pinned for its whole duration.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdapterChoice<'a> {
    /// Its generation id, recorded in trajectories (`None` = base model).
    pub generation: Option<&'a str>,
    /// Its weights (`None` = base model).
    pub weights: Option<&'a LoraWeights>,
}

/// An RGB image, 8 bits per channel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// What one batch took: the denoising loop and the VAE decode (shared by its requests).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchTimings {
    /// Encoding excluded: from the first UNet call to the last step.
    pub denoise: std::time::Duration,
    /// Decoding the final latents into pixels.
    pub decode: std::time::Duration,
}

/// The result of one request: its images and their trajectories, in the same order.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The decoded images.
    pub images: Vec<RgbImage>,
    /// One recorded chain per image.
    pub trajectories: Vec<Trajectory>,
}

impl DiffusionModel {
    /// Embeds a prompt and a negative prompt for [`DiffusionModel::generate`].
    pub fn conditioning(
        &self,
        prompt: &str,
        negative_prompt: &str,
    ) -> Result<Conditioning, ModelError> {
        Ok(Conditioning {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            prompt_embeddings: Arc::new(self.encode_prompt(prompt)?),
            negative_embeddings: Arc::new(self.encode_prompt(negative_prompt)?),
        })
    }

    /// Checks a request against this model; the error names the field and the allowed range.
    pub fn check_request(&self, request: &SampleRequest) -> Result<(), ModelError> {
        let invalid = |field, reason: String| Err(ModelError::InvalidRequest { field, reason });
        let multiple = self.vae_scale_factor() << self.unet.config().downsample_levels();
        let max_steps = self.scheduler.num_train_timesteps;
        if request.num_images == 0 {
            return invalid("num_images", "must be at least 1".into());
        }
        if request.steps == 0 || request.steps > max_steps {
            return invalid(
                "steps",
                format!("must be in 1..={max_steps}, got {}", request.steps),
            );
        }
        if !(request.eta > 0.0 && request.eta <= 1.0) {
            return invalid(
                "eta",
                format!(
                    "must be in (0, 1] for a recorded chain, got {}",
                    request.eta
                ),
            );
        }
        if !(request.guidance_scale.is_finite() && request.guidance_scale >= 0.0) {
            return invalid(
                "guidance_scale",
                format!("must be finite and >= 0, got {}", request.guidance_scale),
            );
        }
        for (field, v) in [("width", request.width), ("height", request.height)] {
            if v == 0 || v % multiple != 0 {
                return invalid(
                    field,
                    format!("must be a positive multiple of {multiple} for this model, got {v}"),
                );
            }
        }
        Ok(())
    }

    /// Samples a batch of compatible requests (same steps and size) with one adapter, recording
    /// every image's chain. `conditioning[i]` belongs to `requests[i]`. `progress(step, total)` is
    /// called after every step; returning `false` cancels the batch.
    pub fn generate(
        &self,
        requests: &[SampleRequest],
        conditioning: &[Conditioning],
        adapter: AdapterChoice<'_>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<Generation>, ModelError> {
        Ok(self
            .generate_timed(requests, conditioning, adapter, progress)?
            .0)
    }

    /// [`DiffusionModel::generate`], also reporting where the time went.
    pub fn generate_timed(
        &self,
        requests: &[SampleRequest],
        conditioning: &[Conditioning],
        adapter: AdapterChoice<'_>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(Vec<Generation>, BatchTimings), ModelError> {
        let Some(first) = requests.first() else {
            return Ok((Vec::new(), BatchTimings::default()));
        };
        let started = std::time::Instant::now();
        if conditioning.len() != requests.len() {
            return Err(ModelError::InvalidRequest {
                field: "conditioning",
                reason: format!(
                    "{} conditionings for {} requests",
                    conditioning.len(),
                    requests.len()
                ),
            });
        }
        for r in requests {
            self.check_request(r)?;
            if (r.steps, r.width, r.height) != (first.steps, first.width, first.height) {
                return Err(ModelError::InvalidRequest {
                    field: "batch",
                    reason: "requests of one batch must share steps, width and height".into(),
                });
            }
        }
        let device = self.unet.device().clone();
        let factor = self.vae_scale_factor();
        let (h, w) = (first.height / factor, first.width / factor);
        let channels = self.unet.config().in_channels;
        let latent_len = channels * h * w;
        let schedule = DdimSchedule::new(&self.scheduler, first.steps)?;

        // One row per image; each request's images share x_T and draw fresh noise per step.
        let owners: Vec<usize> = requests
            .iter()
            .enumerate()
            .flat_map(|(i, r)| std::iter::repeat_n(i, r.num_images))
            .collect();
        let n = owners.len();
        let mut rngs: Vec<StdRng> = requests
            .iter()
            .map(|r| StdRng::seed_from_u64(r.seed))
            .collect();
        let mut x_t_host = Vec::with_capacity(n * latent_len);
        for (req, rng) in requests.iter().zip(&mut rngs) {
            let x_t = standard_normal(rng, latent_len);
            for _ in 0..req.num_images {
                x_t_host.extend_from_slice(&x_t);
            }
        }
        let mut latents = Tensor::from_vec(x_t_host, (n, channels, h, w), &device)?;
        let context = batch_context(conditioning, &owners)?;
        let guidance: Vec<f64> = owners.iter().map(|&o| requests[o].guidance_scale).collect();
        let etas: Vec<f64> = owners.iter().map(|&o| requests[o].eta).collect();
        let adapters = AdapterBatch::Uniform(adapter.weights);

        let mut recorded = vec![latents.to_device(&Device::Cpu)?];
        let mut log_probs: Vec<Vec<f32>> = vec![Vec::with_capacity(first.steps); n];
        for step in schedule.steps() {
            let steps = vec![*step; n];
            let (mu, sigmas) = guided_mean(
                &self.unet,
                schedule.prediction(),
                &latents,
                &steps,
                &context,
                &guidance,
                &etas,
                &adapters,
                Mode::Inference,
                self.micro_batch_rows,
            )?;
            let mut noise = Vec::with_capacity(n * latent_len);
            for (req, rng) in requests.iter().zip(&mut rngs) {
                for _ in 0..req.num_images {
                    noise.extend(standard_normal(rng, latent_len));
                }
            }
            let noise = Tensor::from_vec(noise, (n, channels, h, w), &device)?;
            let x_prev = (&mu + noise.broadcast_mul(&per_item(&sigmas, &device)?)?)?;
            let lp: Vec<f32> = log_prob(&x_prev, &mu, &sigmas)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            for (row, v) in log_probs.iter_mut().zip(lp) {
                row.push(v);
            }
            latents = x_prev;
            recorded.push(latents.to_device(&Device::Cpu)?);
            if !progress(step.index + 1, schedule.len()) {
                return Err(ModelError::Cancelled);
            }
        }

        let denoised = std::time::Instant::now();
        let images = self
            .vae
            .decode_rgb8(&latents.to_dtype(self.unet.dtype())?)?;
        let timings = BatchTimings {
            denoise: denoised - started,
            decode: denoised.elapsed(),
        };
        let chains = Tensor::stack(&recorded, 1)?; // [n, steps + 1, C, h, w]
        let timesteps: Vec<usize> = schedule.steps().iter().map(|s| s.t).collect();
        let mut out: Vec<Generation> = requests
            .iter()
            .map(|_| Generation {
                images: Vec::new(),
                trajectories: Vec::new(),
            })
            .collect();
        for (row, (image, lps)) in images.into_iter().zip(log_probs).enumerate() {
            let owner = owners[row];
            let req = &requests[owner];
            let generation = &mut out[owner];
            generation.images.push(RgbImage {
                width: req.width,
                height: req.height,
                data: image,
            });
            generation.trajectories.push(Trajectory {
                latents: chains.get(row)?,
                timesteps: timesteps.clone(),
                log_probs: lps,
                conditioning: conditioning[owner].clone(),
                guidance_scale: req.guidance_scale,
                eta: req.eta,
                seed: req.seed,
                image_index: generation.trajectories.len(),
                model_id: self.id.clone(),
                adapter_generation: adapter.generation.map(String::from),
            });
        }
        Ok((out, timings))
    }

    /// Re-evaluates recorded steps: for each `(trajectory, step index)` the log-probability of the
    /// stored `x_{t-1}` given the stored `x_t` under `adapter`. Items may sit at different steps.
    pub fn recompute_log_probs(
        &self,
        items: &[(&Trajectory, usize)],
        adapter: Option<&LoraWeights>,
        mode: Mode,
    ) -> Result<Vec<f32>, ModelError> {
        let batch = TransitionBatch::new(self, items)?;
        let (mu, sigmas) = batch.policy_mean(self, &AdapterBatch::Uniform(adapter), mode)?;
        Ok(log_prob(&batch.x_prev, &mu, &sigmas)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    }
}

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
    /// Gathers `(trajectory, step index)` pairs; every trajectory must come from this model.
    pub fn new(model: &DiffusionModel, items: &[(&Trajectory, usize)]) -> Result<Self, ModelError> {
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
            let schedule = DdimSchedule::new(&model.scheduler, traj.steps())?;
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
        model: &DiffusionModel,
        adapters: &AdapterBatch<'_>,
        mode: Mode,
    ) -> Result<(Tensor, Vec<f64>), ModelError> {
        guided_mean(
            &model.unet,
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
    let chunk = max_rows.max(1);
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
    let g = per_item(guidance, x_t.device())?.to_dtype(x_t.dtype())?;
    let guided = (&uncond + (cond - &uncond)?.broadcast_mul(&g)?)?;
    let coefficients: Vec<(f64, f64)> = steps
        .iter()
        .zip(etas)
        .map(|(s, &e)| s.mean_coefficients(e, prediction))
        .collect();
    let sigmas = steps.iter().zip(etas).map(|(s, &e)| s.sigma(e)).collect();
    Ok((step_mean(x_t, &guided, &coefficients)?, sigmas))
}

/// `[n, 1, 1, 1]` f32 tensor of per-item values.
fn per_item(values: &[f64], device: &Device) -> Result<Tensor, ModelError> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, (values.len(), 1, 1, 1), device)?)
}

/// `[2n, S, D]`: every row's negative embedding, then every row's prompt embedding.
fn batch_context(conditioning: &[Conditioning], owners: &[usize]) -> Result<Tensor, ModelError> {
    let negatives = owners
        .iter()
        .map(|&o| conditioning[o].negative_embeddings.as_ref());
    let prompts = owners
        .iter()
        .map(|&o| conditioning[o].prompt_embeddings.as_ref());
    let rows: Vec<&Tensor> = negatives.chain(prompts).collect();
    Ok(Tensor::cat(&rows, 0)?)
}

fn standard_normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}
