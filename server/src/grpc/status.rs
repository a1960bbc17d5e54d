//! The transport's error and the one place that decides gRPC status codes: every lower layer's
//! error converts into [`ServerError`] here, and [`ServerError`] into [`tonic::Status`].

use crate::adapters::AdapterError;
use crate::auth::AuthError;
use crate::engine::EngineError;
use crate::model::error::ModelError;
use crate::store::StoreError;
use crate::store::buffer::BufferError;

/// Everything a gRPC call can fail with; [`From<ServerError> for tonic::Status`] is the one
/// place that decides status codes.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request field is out of range; the message names the field and what is allowed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: String,
        /// What is allowed.
        reason: String,
    },
    /// The thing named does not exist (or no longer).
    #[error("{0}")]
    NotFound(String),
    /// Valid credentials without the right, or a wrong feedback token.
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// At capacity.
    #[error("{0}")]
    Overloaded(String),
    /// Shutting down or not ready.
    #[error("{0}")]
    Unavailable(String),
    /// A compare-and-swap lost a race.
    #[error("{0}")]
    Aborted(String),
    /// The operation cannot run in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bug or a backend failure.
    #[error("{0}")]
    Internal(String),
}

impl ServerError {
    /// Shorthand for [`ServerError::InvalidArgument`].
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<ModelError> for ServerError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidRequest { field, reason } => Self::invalid(field, reason),
            ModelError::Cancelled => Self::Unavailable("the request was cancelled".into()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<EngineError> for ServerError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(_) => Self::Overloaded(e.to_string()),
            EngineError::ShuttingDown => Self::Unavailable(e.to_string()),
            EngineError::Model(m) => m.into(),
            EngineError::Failed(m) => Self::Internal(m),
        }
    }
}

impl From<BufferError> for ServerError {
    fn from(e: BufferError) -> Self {
        match e {
            BufferError::UnknownImage(_) => Self::NotFound(e.to_string()),
            BufferError::DifferentGroups(..) => Self::invalid("preferred_over", e.to_string()),
            BufferError::SameImage => Self::invalid("preferred_over", e.to_string()),
            BufferError::KeyReused(_) => Self::FailedPrecondition(e.to_string()),
        }
    }
}

impl From<StoreError> for ServerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rejected(e) => e.into(),
            // Nothing was acknowledged: the client may retry (with its idempotency key).
            StoreError::Unavailable(_) => {
                Self::Unavailable(format!("{e}; nothing was stored, retry later"))
            }
            StoreError::Broken(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<AuthError> for ServerError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => Self::Unauthenticated(e.to_string()),
            AuthError::Forbidden(_) => Self::PermissionDenied(e.to_string()),
        }
    }
}

impl From<AdapterError> for ServerError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::Unknown(_) => Self::NotFound(e.to_string()),
            AdapterError::Conflict { .. } => Self::Aborted(e.to_string()),
            AdapterError::NoHistory => Self::FailedPrecondition(e.to_string()),
            AdapterError::Format(reason) => Self::invalid("adapter", reason),
            AdapterError::Io(_) | AdapterError::Tensor(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<ServerError> for tonic::Status {
    fn from(e: ServerError) -> Self {
        let message = e.to_string();
        match e {
            ServerError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            ServerError::NotFound(_) => tonic::Status::not_found(message),
            ServerError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ServerError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ServerError::Overloaded(_) => tonic::Status::resource_exhausted(message),
            ServerError::Unavailable(_) => tonic::Status::unavailable(message),
            ServerError::Aborted(_) => tonic::Status::aborted(message),
            ServerError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            ServerError::Internal(detail) => {
                // The detail (file paths, backtraces, tensor shapes) is for operators, not
                // clients; it can also outgrow gRPC's metadata limit. Clients get an id to quote.
                let id = format!("{:016x}", rand::random::<u64>());
                tracing::error!(error_id = %id, %detail, "internal error");
                tonic::Status::internal(format!(
                    "internal error {id}; the server log has the details under error_id={id}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Internal details stay in the log: the client sees a short message with an id.
    #[test]
    fn internal_errors_reach_clients_short_and_generic() {
        let detail = format!(
            "/build/path/src/lib.rs: {}",
            "backtrace frame\n".repeat(2000)
        );
        let status = tonic::Status::from(ServerError::Internal(detail));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().len() < 120, "{}", status.message());
        assert!(
            !status.message().contains("/build/path"),
            "{}",
            status.message()
        );
        let id = status.message().split_whitespace().nth(2).unwrap_or("");
        assert_eq!(id.trim_end_matches(';').len(), 16, "{}", status.message());
    }

    #[test]
    fn client_errors_keep_their_message() {
        let status = tonic::Status::from(ServerError::invalid("eta", "must be in (0, 1]"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "invalid eta: must be in (0, 1]");
    }
}
