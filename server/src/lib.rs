//! The image-generation server: model, sampler, trajectories, engine, gRPC API, metrics.

pub mod adapters;
pub mod auth;
pub mod buffer;
pub mod builtin;
mod clock;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod plugins;
pub mod sampler;
pub mod server;
pub mod tiny;
pub mod tokens;
