//! Errors of the model layer (loading, the sampler, the pipeline); the gRPC edge maps them to
//! statuses in one place (`grpc/status.rs`).

use std::path::PathBuf;

/// What can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the diffusers layout requires is absent.
    #[error("missing file {path}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A config file is malformed or describes something unsupported.
    #[error("{path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weight file lacks a tensor, or a tensor has the wrong shape.
    #[error("{path}: {reason}")]
    Weights {
        /// The safetensors file.
        path: PathBuf,
        /// The key and what is wrong with it.
        reason: String,
    },
    /// The tokenizer files are unusable.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A sampling request is outside what the model supports.
    #[error("invalid {field}: {reason}")]
    InvalidRequest {
        /// The request field.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// The caller asked the sampler to stop (client gone, deadline passed).
    #[error("generation cancelled")]
    Cancelled,
    /// The scheduler configuration is outside what the DDIM sampler supports.
    #[error("invalid scheduler configuration: {0}")]
    Schedule(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
