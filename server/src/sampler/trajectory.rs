//! What one generated image leaves behind for D3PO: its whole denoising chain and everything
//! needed to re-evaluate any step's policy (d3po.md section 1).

use std::sync::Arc;

use candle_core::Tensor;

/// The recorded denoising chain of one image.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// `[steps + 1, C, h, w]` f32 on the CPU: `x_T`, the latent after every step, ..., `x_0`.
    pub latents: Tensor,
    /// The timestep each step evaluated the model at (`steps` entries, highest first).
    pub timesteps: Vec<usize>,
    /// `log pi(x_{t-1} | x_t)` of each step under the generating policy (mean over elements).
    pub log_probs: Vec<f32>,
    /// The conditioning the chain was sampled under.
    pub conditioning: Conditioning,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// DDIM eta (> 0).
    pub eta: f64,
    /// This image's seed (the request's + its index): its per-step noise, and unless the
    /// request shared one initial noise its `x_T`, derive from it.
    pub seed: u64,
    /// Position of this image within its request.
    pub image_index: usize,
    /// The model that produced it.
    pub model_id: String,
    /// The adapter generation that produced it (`None` = the base model).
    pub adapter_generation: Option<String>,
}

impl Trajectory {
    /// Number of denoising steps.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether every latent and log-probability is finite (only such a chain can be trained on).
    pub fn is_finite(&self) -> bool {
        self.log_probs.iter().all(|v| v.is_finite())
            && crate::model::lora::all_finite(&self.latents).unwrap_or(false)
    }

    /// Bytes this trajectory holds (latents and its share of the embeddings), for buffer budgets.
    pub fn size_bytes(&self) -> usize {
        let dtype_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        dtype_bytes(&self.latents)
            + self.timesteps.len() * std::mem::size_of::<usize>()
            + self.log_probs.len() * 4
            + self.conditioning.size_bytes()
    }
}

/// The text conditioning of a chain, shared by the images of one request.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The prompt text.
    pub prompt: String,
    /// The negative prompt text (empty = unconditional).
    pub negative_prompt: String,
    /// `[1, S, D]` embeddings of the prompt, in the model's dtype.
    pub prompt_embeddings: Arc<Tensor>,
    /// `[1, S, D]` embeddings of the negative prompt.
    pub negative_embeddings: Arc<Tensor>,
}

impl Conditioning {
    /// Bytes of both embeddings (counted in full by each holder; they are shared in memory).
    pub fn size_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        b(&self.prompt_embeddings) + b(&self.negative_embeddings)
    }
}
