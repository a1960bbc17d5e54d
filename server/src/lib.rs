//! The image-generation server: model, sampler, trajectories, adapters.

pub mod error;
pub mod model;
pub mod sampler;
