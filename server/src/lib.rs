//! The image-generation server: model, sampler, trajectories, engine, gRPC API, metrics.

pub mod adapters;
pub mod auth;
pub mod buffer;
pub mod config;
pub mod d3po;
pub mod demo;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod pretrain;
pub mod sampler;
pub mod server;
pub mod shapes;
pub mod tokens;
