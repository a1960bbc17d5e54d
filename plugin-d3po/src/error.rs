/// Everything that can go wrong in the D3PO crate.
#[derive(Debug, thiserror::Error)]
pub enum D3poError {
    /// A training argument is out of range (beta, clamp, learning rate, pairs).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument's name, as the caller spells it.
        name: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The host's policy could not evaluate a stored transition.
    #[error("policy: {0}")]
    Policy(String),
    /// A tensor operation failed (shape or dtype mismatch, device error).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, D3poError>;
