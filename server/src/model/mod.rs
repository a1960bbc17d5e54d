//! The latent-diffusion model: UNet with LoRA, CLIP text encoder, VAE decoder, tokenizer.

pub mod clip;
pub mod device;
pub mod error;
pub mod lora;
pub mod nn;
pub mod seeded;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use device::DevicePlan;
pub use error::ModelError;
pub use lora::{AdapterBatch, LoraPair, LoraTarget, LoraWeights, TrainableLora};
pub use nn::Mode;
pub use unet::{UNet2DConditionModel, UNetConfig};
