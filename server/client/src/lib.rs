//! The client side of imagegen: the scripted-user demo and the training-round helper that the
//! `imagegen` CLI and the end-to-end tests share. It speaks only gRPC (no model code).

pub mod demo;
mod figures;
mod tastes;

use tonic::Request;
use tonic::metadata::MetadataValue;

/// `message` as a request carrying `key` as its bearer token (none: no header).
pub fn with_key<T>(message: T, key: &Option<String>) -> Result<Request<T>, tonic::Status> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        let value: MetadataValue<_> = format!("Bearer {key}").parse().map_err(|_| {
            tonic::Status::invalid_argument("the API key is not a valid header value")
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}
