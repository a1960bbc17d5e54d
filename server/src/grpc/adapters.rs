//! `imagegen.v1.Adapters`: adapter generations, the live alias, training.

use std::sync::Arc;
use std::time::Instant;

use imagegen_proto::v1 as pb;
use pb::adapters_server::Adapters;
use tonic::{Request, Response, Status};

use super::{AppState, ChunkStream, observe, stream_files};
use crate::adapters::AdapterMeta;
use crate::auth::Role;
use crate::grpc::status::ServerError;

/// The service, sharing [`AppState`] with the others.
#[derive(Debug, Clone)]
pub(crate) struct AdaptersService {
    state: Arc<AppState>,
}

impl AdaptersService {
    /// A service over `state`.
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn live_id(&self) -> Result<String, ServerError> {
        Ok(self
            .state
            .adapters
            .live()?
            .map(|g| g.meta.id.clone())
            .unwrap_or_default())
    }

    fn info(&self, meta: AdapterMeta, live: &str) -> pb::AdapterInfo {
        pb::AdapterInfo {
            live: meta.id == live,
            generation: meta.id,
            parent: meta.parent.unwrap_or_default(),
            created_at: meta.created_at,
            rank: meta.rank as u32,
            alpha: meta.alpha,
            origin: meta.origin,
            stats: meta.stats.map(|s| pb::TrainingStats {
                pairs: s.pairs as u32,
                mean_loss: s.mean_loss,
                heldout_accuracy: s.heldout_accuracy,
                parent_heldout_accuracy: s.parent_heldout_accuracy,
                seconds: s.seconds,
                drift: s.drift,
            }),
            learned_from: meta.learned_from,
        }
    }

    fn status(&self) -> pb::TrainingStatus {
        let s = self.state.training.status();
        pb::TrainingStatus {
            enabled: s.enabled,
            state: s.state,
            rounds_published: s.published,
            rounds_rejected: s.rejected,
            last_reason: s.last_reason,
            pending_pairs: s.pending_pairs as u32,
            last_generation: s.last_generation,
            last_round_seconds: s.last_round_seconds,
        }
    }

    /// Runs `f` after the admin check, recording the call's metrics.
    fn call<Q, R>(
        &self,
        rpc: &str,
        request: &Request<Q>,
        f: impl FnOnce() -> Result<R, ServerError>,
    ) -> Result<Response<R>, Status> {
        let started = Instant::now();
        let result = self
            .state
            .authorize(request, Role::Admin)
            .and_then(|_| f())
            .map(Response::new)
            .map_err(Status::from);
        observe(&self.state.metrics, rpc, started, &result);
        result
    }

    /// [`AdaptersService::call`] for work that may block (file and NATS I/O, decoding): run on
    /// a blocking thread, with the request's body handed over.
    async fn call_blocking<Q: Send + 'static, R: Send + 'static>(
        &self,
        rpc: &str,
        request: Request<Q>,
        f: impl FnOnce(&Self, Q) -> Result<R, ServerError> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        let started = Instant::now();
        let result = match self.state.authorize(&request, Role::Admin) {
            Err(e) => Err(e),
            Ok(_) => {
                let this = self.clone();
                let body = request.into_inner();
                tokio::task::spawn_blocking(move || f(&this, body))
                    .await
                    .unwrap_or_else(|e| Err(ServerError::Internal(format!("adapter task: {e}"))))
            }
        }
        .map(Response::new)
        .map_err(Status::from);
        observe(&self.state.metrics, rpc, started, &result);
        result
    }
}

/// An empty string means "the base model".
fn optional(id: &str) -> Option<&str> {
    if id.is_empty() || id == "base" {
        None
    } else {
        Some(id)
    }
}

#[tonic::async_trait]
impl Adapters for AdaptersService {
    async fn list_adapters(
        &self,
        request: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        self.call("ListAdapters", &request, || {
            let live = self.live_id()?;
            let adapters = self
                .state
                .adapters
                .list()?
                .into_iter()
                .map(|m| self.info(m, &live))
                .collect();
            Ok(pb::ListAdaptersResponse { adapters, live })
        })
    }

    async fn get_adapter(
        &self,
        request: Request<pb::GetAdapterRequest>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        self.call("GetAdapter", &request, || {
            let live = self.live_id()?;
            Ok(self.info(
                self.state.adapters.meta(&request.get_ref().generation)?,
                &live,
            ))
        })
    }

    async fn activate_adapter(
        &self,
        request: Request<pb::ActivateAdapterRequest>,
    ) -> Result<Response<pb::ActivateAdapterResponse>, Status> {
        self.call_blocking("ActivateAdapter", request, |this, r| {
            let previous = this.live_id()?;
            this.state.adapters.activate(
                optional(&r.generation),
                optional(&r.expected_live),
                "activated",
            )?;
            Ok(pb::ActivateAdapterResponse {
                previous,
                live: this.live_id()?,
            })
        })
        .await
    }

    async fn rollback_adapter(
        &self,
        request: Request<pb::RollbackAdapterRequest>,
    ) -> Result<Response<pb::ActivateAdapterResponse>, Status> {
        self.call_blocking("RollbackAdapter", request, |this, _| {
            let previous = this.live_id()?;
            this.state.adapters.rollback()?;
            Ok(pb::ActivateAdapterResponse {
                previous,
                live: this.live_id()?,
            })
        })
        .await
    }

    async fn trigger_training(
        &self,
        request: Request<pb::TriggerTrainingRequest>,
    ) -> Result<Response<pb::TrainingStatus>, Status> {
        self.call("TriggerTraining", &request, || {
            if !self.state.training.status().enabled {
                return Err(ServerError::FailedPrecondition(
                    "training is disabled: no learning plugin runs on this server (enable one, e.g. --d3po-enabled=true)".into(),
                ));
            }
            self.state.training.trigger();
            Ok(self.status())
        })
    }

    async fn get_training_status(
        &self,
        request: Request<pb::GetTrainingStatusRequest>,
    ) -> Result<Response<pb::TrainingStatus>, Status> {
        self.call("GetTrainingStatus", &request, || Ok(self.status()))
    }

    type ExportAdapterStream = ChunkStream;

    async fn export_adapter(
        &self,
        request: Request<pb::ExportAdapterRequest>,
    ) -> Result<Response<Self::ExportAdapterStream>, Status> {
        let state = self.state.clone();
        let files = self.call("ExportAdapter", &request, || {
            let id = &request.get_ref().generation;
            if id.is_empty() {
                return Err(ServerError::invalid(
                    "generation",
                    "name the generation to export",
                ));
            }
            Ok(state.adapters.export_files(id)?)
        })?;
        Ok(Response::new(stream_files(files.into_inner())))
    }

    async fn import_adapter(
        &self,
        request: Request<pb::ImportAdapterRequest>,
    ) -> Result<Response<pb::AdapterInfo>, Status> {
        self.call_blocking("ImportAdapter", request, |this, r| {
            let generation = this
                .state
                .adapters
                .import(&r.adapter_model_safetensors, &r.adapter_config_json)?;
            let live = this.live_id()?;
            Ok(this.info(generation.meta.clone(), &live))
        })
        .await
    }
}
