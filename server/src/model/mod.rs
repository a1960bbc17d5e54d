//! The latent-diffusion model: UNet with LoRA, CLIP text encoder, VAE decoder, and loading.

pub mod builtin;
pub mod clip;
pub mod loader;
pub mod lora;
pub mod nn;
pub mod pixel_vae;
pub mod seeded;
pub mod tiny;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use lora::{AdapterBatch, LoraPair, LoraTarget, LoraWeights, TrainableLora};
pub use nn::Mode;
pub use unet::{UNet2DConditionModel, UNetConfig};
