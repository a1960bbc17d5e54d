/// Everything that can go wrong in the D3PO crate.
#[derive(Debug, thiserror::Error)]
pub enum D3poError {
    /// A scheduler setting is outside what the DDIM sampler supports.
    #[error("invalid scheduler configuration: {0}")]
    InvalidSchedule(String),
    /// A sampling or training argument is out of range (eta, steps, beta, clamp).
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

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, D3poError>;
