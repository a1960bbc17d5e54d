//! The image-generation server: model, sampler, trajectories, adapters.

pub mod model;
