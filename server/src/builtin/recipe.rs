//! The recipe of a pretraining run: architecture, schedule, optimiser, data and seed. The one
//! that made the built-in model is committed as `server/embedded/recipe.json` and recorded
//! again beside the weights.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::clip::ClipConfig;
use crate::model::{ModelError, UNetConfig};
use crate::pipeline::save::config_err;
use crate::sampler::SchedulerConfig;

/// Everything that defines a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Seed of the initial weights, the scenes, timesteps and noise.
    pub seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak AdamW learning rate.
    pub learning_rate: f64,
    /// Linear warm-up from 0 to the peak, in steps.
    pub warmup_steps: usize,
    /// The cosine decay ends at this learning rate.
    pub final_learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Decay of the exponential moving average of the weights that is written out.
    pub ema_decay: f64,
    /// Share of captions replaced by the empty prompt (what classifier-free guidance needs).
    pub caption_dropout: f64,
    /// With noise prediction, the x0 error joins the loss, weighted at most this much:
    /// `|eps err|^2 (1 + min(1/SNR, cap))`, as `|x0 err|^2 = |eps err|^2 / SNR`. Plain noise MSE
    /// (cap 0) barely trains the high-noise steps where the layout and colours are decided.
    #[serde(default)]
    pub x0_weight_cap: f64,
    /// Side of the generated images in pixels.
    pub image_size: usize,
    /// The pixel VAE's factor (2, 4 or 8): the UNet works on the image at `1 / pixel_factor`
    /// resolution (`unet.sample_size` = `image_size / pixel_factor`).
    #[serde(default = "default_pixel_factor")]
    pub pixel_factor: usize,
    /// The denoiser.
    pub unet: UNetConfig,
    /// The text encoder.
    pub text_encoder: ClipConfig,
    /// `scheduler/scheduler_config.json`: the noise schedule of training and sampling.
    pub scheduler: serde_json::Value,
}

impl Recipe {
    /// Reads a recipe file; the error names the file and what is wrong.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let recipe: Self = serde_json::from_str(&text).map_err(|e| config_err(path, e))?;
        recipe.validate().map_err(|reason| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(recipe)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.unet.validate()?;
        self.text_encoder.validate()?;
        SchedulerConfig::from_json(&self.scheduler.to_string()).map_err(|e| e.to_string())?;
        if self.steps == 0 || self.batch_size == 0 {
            return Err("steps and batch_size must be positive".into());
        }
        if self.unet.in_channels != 3 || self.unet.out_channels != 3 {
            return Err("the UNet must have 3 input and output channels (RGB pixel space)".into());
        }
        if self.unet.cross_attention_dim != self.text_encoder.hidden_size {
            return Err(format!(
                "the UNet's cross_attention_dim {} differs from the encoder's hidden_size {}",
                self.unet.cross_attention_dim, self.text_encoder.hidden_size
            ));
        }
        if ![2, 4, 8].contains(&self.pixel_factor) {
            return Err("pixel_factor must be 2, 4 or 8".into());
        }
        let multiple = self.pixel_factor << self.unet.downsample_levels();
        if self.image_size == 0 || !self.image_size.is_multiple_of(multiple) {
            return Err(format!("image_size must be a multiple of {multiple}"));
        }
        if self.unet.sample_size * self.pixel_factor != self.image_size {
            return Err(format!(
                "unet.sample_size must be image_size / pixel_factor = {}",
                self.image_size / self.pixel_factor
            ));
        }
        if !(self.x0_weight_cap >= 0.0 && self.x0_weight_cap.is_finite()) {
            return Err("x0_weight_cap must be finite and >= 0".into());
        }
        if !(0.0..1.0).contains(&self.caption_dropout) || !(0.0..1.0).contains(&self.ema_decay) {
            return Err("caption_dropout and ema_decay must lie in [0, 1)".into());
        }
        Ok(())
    }

    /// The learning rate at `step`: linear warm-up, then cosine decay to the final rate.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.final_learning_rate + (self.learning_rate - self.final_learning_rate) * cosine
    }
}

fn default_pixel_factor() -> usize {
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_recipe_is_the_one_the_weights_record() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("embedded");
        let recipe = Recipe::from_file(&dir.join("recipe.json")).unwrap();
        let recorded = Recipe::from_file(&dir.join("model/recipe.json")).unwrap();
        assert_eq!(recipe, recorded);
    }
}
