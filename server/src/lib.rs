//! The image-generation server: model, sampler, pipeline, engine, trajectory buffer, adapter
//! registry, plugin host, gRPC API and metrics (see the README's Architecture section).
//!
//! The library's public face is what binaries, benches and end-to-end tests use: the
//! configuration and start of a server, the model and its pipeline, the sampler's step math,
//! the adapter registry and the built-in model. Everything else is crate-private.

#![warn(unreachable_pub)]

pub mod adapters;
pub mod allocator;
mod auth;
pub mod builtin;
mod clock;
pub mod config;
mod engine;
mod grpc;
mod metrics;
pub mod model;
pub mod pipeline;
pub mod plugins;
pub mod sampler;
pub mod server;
mod store;
mod supervisor;
pub mod tiny;
mod tokens;
