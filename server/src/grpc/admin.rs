//! `imagegen.v1.Admin`: dataset export.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::clock::unix_seconds;

use candle_core::{DType, Device, Tensor};
use imagegen_proto::v1 as pb;
use pb::admin_server::Admin;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::{AppState, ChunkStream, observe, stream_files};
use crate::auth::Role;
use crate::grpc::status::ServerError;
use crate::store::buffer::{GroupSnapshot, Vote};

/// The service, sharing [`AppState`] with the others.
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    state: Arc<AppState>,
}

impl AdminService {
    /// A service over `state`.
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

/// Builds `trajectories.safetensors` and `metadata.json` (layout in the README, "Dataset export").
pub(super) fn build_export(
    model_id: &str,
    groups: Vec<GroupSnapshot>,
) -> Result<(Vec<u8>, Vec<u8>), ServerError> {
    let tensor_err =
        |e: candle_core::Error| ServerError::Internal(format!("building the export: {e}"));
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut group_docs = Vec::with_capacity(groups.len());
    for GroupSnapshot {
        group_id,
        group,
        images,
        ..
    } in groups
    {
        let Some(first) = images.first() else {
            continue;
        };
        let cond = &first.trajectory.conditioning;
        let f32_cpu = |t: &Tensor| -> Result<Tensor, ServerError> {
            t.to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.squeeze(0))
                .map_err(tensor_err)
        };
        let prompt_key = format!("groups/{group_id}/prompt_embeddings");
        let negative_key = format!("groups/{group_id}/negative_embeddings");
        tensors.insert(prompt_key.clone(), f32_cpu(&cond.prompt_embeddings)?);
        tensors.insert(negative_key.clone(), f32_cpu(&cond.negative_embeddings)?);
        let mut image_docs = Vec::with_capacity(images.len());
        for image in &images {
            let t = &image.trajectory;
            let base = format!("images/{}", image.image_id);
            let timesteps: Vec<i64> = t.timesteps.iter().map(|&v| v as i64).collect();
            tensors.insert(
                format!("{base}/latents"),
                t.latents.to_dtype(DType::F32).map_err(tensor_err)?,
            );
            tensors.insert(
                format!("{base}/timesteps"),
                Tensor::new(timesteps, &Device::Cpu).map_err(tensor_err)?,
            );
            tensors.insert(
                format!("{base}/log_probs"),
                Tensor::new(t.log_probs.clone(), &Device::Cpu).map_err(tensor_err)?,
            );
            let votes: BTreeMap<&str, &str> = image
                .votes
                .iter()
                .map(|(rater, v)| (rater.as_str(), if *v == Vote::Up { "up" } else { "down" }))
                .collect();
            image_docs.push(json!({
                "image_id": image.image_id,
                "index": t.image_index,
                "created_at": unix_seconds(image.created_at),
                "seed": t.seed,
                "guidance_scale": t.guidance_scale,
                "eta": t.eta,
                "steps": t.steps(),
                "timesteps": t.timesteps,
                "model_id": t.model_id,
                "adapter_generation": t.adapter_generation,
                "prompt_embeddings": prompt_key,
                "negative_embeddings": negative_key,
                "latents": format!("{base}/latents"),
                "timesteps_tensor": format!("{base}/timesteps"),
                "log_probs": format!("{base}/log_probs"),
                "feedback": {
                    "votes": votes,
                    "preferred_over": group.comparisons.iter().filter(|c| c.winner == image.image_id).map(|c| json!({"image_id": c.loser, "rater": c.rater})).collect::<Vec<_>>(),
                    "best_of_raters": group.best_of.iter().filter(|(_, id)| **id == image.image_id).map(|(r, _)| r.clone()).collect::<Vec<_>>(),
                },
            }));
        }
        group_docs.push(json!({
            "group_id": group_id,
            "prompt": cond.prompt,
            "negative_prompt": cond.negative_prompt,
            "comparisons": group.comparisons.iter().map(|c| json!({"winner": c.winner, "loser": c.loser, "rater": c.rater})).collect::<Vec<_>>(),
            "best_of": group.best_of,
            "images": image_docs,
        }));
    }
    let metadata = json!({
        "format": "imagegen.trajectories.v1",
        "model_id": model_id,
        "exported_at": crate::clock::now_seconds(),
        "groups": group_docs,
    });
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| ServerError::Internal(format!("serialising the export: {e}")))?;
    let metadata =
        serde_json::to_vec_pretty(&metadata).map_err(|e| ServerError::Internal(e.to_string()))?;
    Ok((bytes, metadata))
}

#[tonic::async_trait]
impl Admin for AdminService {
    type ExportTrajectoriesStream = ChunkStream;

    async fn export_trajectories(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportTrajectoriesStream>, Status> {
        let started = Instant::now();
        let state = self.state.clone();
        let prepared = async {
            state.authorize(&request, Role::Admin)?;
            let store = state.store.clone();
            let include_unlabelled = request.get_ref().include_unlabelled;
            let snapshot = tokio::task::spawn_blocking(move || store.groups(include_unlabelled))
                .await
                .map_err(|e| ServerError::Internal(format!("store task: {e}")))??;
            let model_id = state.model_id.clone();
            tokio::task::spawn_blocking(move || build_export(&model_id, snapshot))
                .await
                .map_err(|e| ServerError::Internal(format!("export task: {e}")))?
        }
        .await
        .map_err(Status::from);
        observe(&state.metrics, "ExportTrajectories", started, &prepared);
        let (tensors, metadata) = prepared?;
        Ok(Response::new(stream_files(vec![
            ("trajectories.safetensors", tensors),
            ("metadata.json", metadata),
        ])))
    }
}
