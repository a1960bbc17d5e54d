//! The latent-diffusion model: UNet with LoRA, CLIP text encoder, VAE decoder, and loading.

pub mod lora;
pub mod nn;
pub mod seeded;
pub mod unet;

pub use lora::{AdapterBatch, LoraPair, LoraTarget, LoraWeights, TrainableLora};
pub use nn::Mode;
pub use unet::{UNet2DConditionModel, UNetConfig};
