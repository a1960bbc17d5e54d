//! Errors of the diffusion-step math (schedule, step mean, log-probabilities).

/// A scheduler setting or a step argument outside what the DDIM sampler supports.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A scheduler setting is outside what the DDIM sampler supports.
    #[error("invalid scheduler configuration: {0}")]
    InvalidSchedule(String),
    /// A sampling argument is out of range (eta, steps, per-item constants).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name, as the caller spells it.
        name: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A tensor operation failed (shape or dtype mismatch, device error).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Shorthand for results of the step math.
pub(super) type Result<T> = std::result::Result<T, SamplerError>;

/// The model layer's view: a bad argument is a bad request, a bad schedule a bad model.
impl From<SamplerError> for crate::model::ModelError {
    fn from(e: SamplerError) -> Self {
        match e {
            SamplerError::InvalidSchedule(reason) => Self::Schedule(reason),
            SamplerError::InvalidArgument { name, reason } => Self::InvalidRequest {
                field: name,
                reason,
            },
            SamplerError::Tensor(t) => Self::Tensor(t),
        }
    }
}
