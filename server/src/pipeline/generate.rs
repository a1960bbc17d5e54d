//! Text to images: a batch of requests sampled with DDIM and classifier-free guidance, every
//! step recorded as a trajectory, the final latents decoded.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::DiffusionModel;
use crate::model::{AdapterBatch, LoraWeights, Mode, ModelError};
use crate::sampler::{
    Conditioning, DdimSchedule, Denoiser, Trajectory, TransitionBatch, guided_mean, log_prob,
    per_item,
};

/// One text-to-image request as the pipeline sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// Images to draw.
    pub num_images: usize,
    /// Seed of the noise: image `i` draws its `x_T` and per-step noise from `seed + i`, so one
    /// image can be reproduced alone (A1111's and ComfyUI's batch convention).
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
    /// All images start from the one `x_T` of `seed` (controlled comparisons: variations that
    /// differ only by the sampling noise, which still comes from `seed + i`).
    pub shared_noise: bool,
}

/// Largest guidance scale a request may use: beyond it the guided prediction overflows f32 and
/// the recorded chain is not finite (3e38 did). Diffusers' users stay below 30.
pub const MAX_GUIDANCE_SCALE: f64 = 50.0;

/// Smallest DDIM eta a recorded chain may use: the step variance scales with eta squared, and
/// below this the last steps' log-probabilities are no longer finite in f32 (1e-30 made them
/// inf). Reproducing deterministic DDIM (eta 0) is not a recordable policy anyway.
pub const MIN_ETA: f64 = 0.01;

/// The bounds a [`SampleRequest`] is checked against: the model's own
/// ([`DiffusionModel::sample_limits`]) or the server's tighter ones. One check serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleLimits {
    /// Images per request.
    pub max_images: usize,
    /// Denoising steps.
    pub max_steps: usize,
    /// Width or height in pixels.
    pub max_size: usize,
    /// Width and height must be multiples of this (VAE factor times the UNet's downsampling).
    pub size_multiple: usize,
}

impl SampleRequest {
    /// The seed image `index` draws from (`seed + index`, wrapping).
    pub fn image_seed(&self, index: u64) -> u64 {
        self.seed.wrapping_add(index)
    }

    /// Checks every field against `limits`; the error names the field and the allowed range.
    pub fn check(&self, limits: &SampleLimits) -> Result<(), ModelError> {
        let invalid = |field, reason: String| Err(ModelError::InvalidRequest { field, reason });
        let at_most = |max: usize| {
            if max == usize::MAX {
                "must be at least 1".to_string()
            } else {
                format!("must be in 1..={max}")
            }
        };
        if self.num_images == 0 || self.num_images > limits.max_images {
            let range = at_most(limits.max_images);
            return invalid("num_images", format!("{range}, got {}", self.num_images));
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            let range = at_most(limits.max_steps);
            return invalid("steps", format!("{range}, got {}", self.steps));
        }
        if !(self.guidance_scale >= 0.0 && self.guidance_scale <= MAX_GUIDANCE_SCALE) {
            return invalid(
                "guidance_scale",
                format!(
                    "must be in [0, {MAX_GUIDANCE_SCALE}], got {}",
                    self.guidance_scale
                ),
            );
        }
        if !(self.eta >= MIN_ETA && self.eta <= 1.0) {
            return invalid(
                "eta",
                format!(
                    "must be in [{MIN_ETA}, 1] for a recorded chain, got {}",
                    self.eta
                ),
            );
        }
        let multiple = limits.size_multiple.max(1);
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v > limits.max_size || !v.is_multiple_of(multiple) {
                let range = if limits.max_size == usize::MAX {
                    format!("must be a positive multiple of {multiple} for this model")
                } else {
                    format!(
                        "must be a multiple of {multiple} in {multiple}..={}",
                        limits.max_size
                    )
                };
                return invalid(field, format!("{range}, got {v}"));
            }
        }
        Ok(())
    }
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
    /// The UNet, schedule and batching the step math runs with.
    pub fn denoiser(&self) -> Denoiser<'_> {
        Denoiser {
            unet: &self.unet,
            scheduler: &self.scheduler,
            micro_batch_rows: self.micro_batch_rows,
        }
    }

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

    /// The bounds this model itself puts on a request (the server's flags tighten them).
    pub fn sample_limits(&self) -> SampleLimits {
        SampleLimits {
            max_images: usize::MAX,
            max_steps: self.scheduler.num_train_timesteps,
            max_size: usize::MAX,
            size_multiple: self.vae_scale_factor() << self.unet.config().downsample_levels(),
        }
    }

    /// Checks a request against this model; the error names the field and the allowed range.
    pub fn check_request(&self, request: &SampleRequest) -> Result<(), ModelError> {
        request.check(&self.sample_limits())
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
        let limits = self.sample_limits();
        for r in requests {
            r.check(&limits)?;
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
        let denoiser = self.denoiser();

        // One row per image, each with its own noise stream `seed + i`; with shared noise every
        // image of a request starts from the first one's x_T (drawn from `seed`).
        let owners: Vec<usize> = requests
            .iter()
            .enumerate()
            .flat_map(|(i, r)| std::iter::repeat_n(i, r.num_images))
            .collect();
        let n = owners.len();
        let mut rngs: Vec<StdRng> = requests
            .iter()
            .flat_map(|r| (0..r.num_images).map(|i| StdRng::seed_from_u64(r.image_seed(i as u64))))
            .collect();
        let mut x_t_host = Vec::with_capacity(n * latent_len);
        let mut first_of_request: Option<Vec<f32>> = None;
        for (row, rng) in rngs.iter_mut().enumerate() {
            let req = &requests[owners[row]];
            let x_t = standard_normal(rng, latent_len);
            let starts_request = row == 0 || owners[row - 1] != owners[row];
            if starts_request {
                first_of_request = Some(x_t.clone());
            }
            match (&first_of_request, req.shared_noise) {
                (Some(first), true) => x_t_host.extend_from_slice(first),
                _ => x_t_host.extend_from_slice(&x_t),
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
                denoiser.unet,
                schedule.prediction(),
                &latents,
                &steps,
                &context,
                &guidance,
                &etas,
                &adapters,
                Mode::Inference,
                denoiser.micro_batch_rows,
            )?;
            let mut noise = Vec::with_capacity(n * latent_len);
            for rng in &mut rngs {
                noise.extend(standard_normal(rng, latent_len));
            }
            let noise = Tensor::from_vec(noise, (n, channels, h, w), &device)?;
            let x_prev = (&mu + noise.broadcast_mul(&per_item(&sigmas, &noise)?)?)?;
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
                seed: req.image_seed(generation.trajectories.len() as u64),
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
        let batch = TransitionBatch::new(self.denoiser(), items)?;
        let (mu, sigmas) =
            batch.policy_mean(self.denoiser(), &AdapterBatch::Uniform(adapter), mode)?;
        Ok(log_prob(&batch.x_prev, &mu, &sigmas)?
            .to_dtype(DType::F32)?
            .to_vec1()?)
    }
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
