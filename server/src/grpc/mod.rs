//! The gRPC front end: request validation, the `ImageGenerator` and `Admin` services.

mod adapters;
mod admin;
mod generator;
pub(crate) mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use imagegen_proto::v1 as pb;
use tonic::{Request, Status};

pub(crate) use adapters::AdaptersService;
pub(crate) use admin::AdminService;
pub(crate) use generator::GeneratorService;

use crate::adapters::AdapterRegistry;
use crate::auth::{ApiKeys, Role};
use crate::engine::Engine;
use crate::grpc::status::ServerError;
use crate::metrics::Metrics;
use crate::pipeline::SampleLimits;
use crate::plugins::TrainingControl;
use crate::store::LearningStore;
use crate::tokens::TokenSigner;

/// Defaults applied to unset request fields (reported by `GetInfo`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Defaults {
    /// Images per request.
    pub num_images: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Width and height in pixels.
    pub size: u32,
    /// DDIM eta.
    pub eta: f32,
}

/// What requests may ask for (reported by `GetInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Images, steps and sizes of one request.
    pub sample: SampleLimits,
    /// Prompt length in characters.
    pub max_prompt_chars: usize,
    /// Images per model batch.
    pub max_batch: usize,
    /// Requests admitted at once.
    pub max_queue: usize,
}

/// Everything the services share (built once by `server::start`).
#[derive(Debug)]
pub(crate) struct AppState {
    /// The generation engine.
    pub(crate) engine: Engine,
    /// Adapter generations and the live alias.
    pub(crate) adapters: Arc<AdapterRegistry>,
    /// Trajectories, feedback, idempotency keys and the ledger (shared with the plugins).
    pub(crate) store: Arc<dyn LearningStore>,
    /// The training plugin's status and trigger (idle and disabled when none runs).
    pub(crate) training: Arc<TrainingControl>,
    /// Signs feedback tokens.
    pub(crate) signer: TokenSigner,
    /// API keys (empty: no authentication).
    pub(crate) keys: ApiKeys,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// The served model's id.
    pub(crate) model_id: String,
    /// Request defaults.
    pub(crate) defaults: Defaults,
    /// Request limits.
    pub(crate) limits: Limits,
    /// Whether Generate is answered (`--role all|serve`; a `train` process refuses it).
    pub(crate) serves: bool,
    /// Set on SIGTERM: new generation requests are refused while in-flight ones finish.
    pub(crate) draining: AtomicBool,
}

impl AppState {
    /// Checks the caller's API key for `role` (always passes when no keys are configured).
    pub(crate) fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<(), ServerError> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        Ok(self.keys.check(header, role)?)
    }

    /// A stable, non-secret name of the caller's API key (a prefix of its SHA-256).
    pub(crate) fn caller_fingerprint<T>(&self, request: &Request<T>) -> String {
        use sha2::Digest;
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        hex::encode(&sha2::Sha256::digest(header)[..8])
    }

    /// Whether the caller presented an `authorization` header at all.
    pub(crate) fn presents_key<T>(&self, request: &Request<T>) -> bool {
        request.metadata().get("authorization").is_some()
    }

    /// Refuses new work while draining.
    pub(crate) fn accepting(&self) -> Result<(), ServerError> {
        if !self.serves {
            return Err(ServerError::FailedPrecondition(
                "this process runs `--role train` and does not generate: send Generate to a serving replica".into(),
            ));
        }
        if self.draining.load(Ordering::Acquire) {
            return Err(ServerError::Unavailable(
                "the server is shutting down; retry on another replica".into(),
            ));
        }
        Ok(())
    }
}

/// Records `imagegen_requests_total` and `imagegen_request_duration_seconds` for one call.
pub(crate) fn observe<T>(
    metrics: &Metrics,
    rpc: &str,
    started: Instant,
    result: &Result<T, Status>,
) {
    let code = match result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    metrics
        .requests
        .with_label_values(&[rpc, code_name(code)])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[rpc])
        .observe(started.elapsed().as_secs_f64());
}

/// The canonical upper-snake name of a gRPC code, as dashboards spell it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A server stream of export chunks.
pub(crate) type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

/// Streams whole files as 1 MiB chunks, each naming its file, in order.
pub(crate) fn stream_files(files: Vec<(&'static str, Vec<u8>)>) -> ChunkStream {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for (file, bytes) in files {
            for chunk in bytes.chunks(1 << 20) {
                let chunk = pb::ExportChunk {
                    file: file.into(),
                    data: chunk.to_vec(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the client left
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A random 128-bit id, hex.
pub(crate) fn new_id() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}
