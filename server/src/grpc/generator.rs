//! `imagegen.v1.ImageGenerator`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use imagegen_proto::v1 as pb;
use pb::image_generator_server::ImageGenerator;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{AppState, Defaults, Limits, new_id, observe};
use crate::adapters::{AdapterError, AdapterRegistry};
use crate::auth::Role;
use crate::engine::{JobOutput, JobSpec};
use crate::grpc::status::ServerError;
use crate::pipeline::{MAX_GUIDANCE_SCALE, MIN_ETA, RgbImage, SampleRequest};
use crate::sampler::Trajectory;
use crate::store::buffer::Vote;
use crate::store::{FeedbackKind, NewFeedback, Rater};

/// The service, sharing [`AppState`] with the others.
#[derive(Debug, Clone)]
pub(crate) struct GeneratorService {
    state: Arc<AppState>,
}

impl GeneratorService {
    /// A service over `state`.
    pub(crate) fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

/// A validated request: the job, and what the answer needs.
#[derive(Debug)]
struct Prepared {
    spec: JobSpec,
    format: pb::ImageFormat,
    request_id: String,
}

/// Validates every field and fills defaults; errors name the field and the allowed range.
fn prepare(
    req: &pb::GenerateRequest,
    defaults: &Defaults,
    limits: &Limits,
    adapters: &AdapterRegistry,
) -> Result<Prepared, ServerError> {
    let prompt_chars = req.prompt.chars().count();
    if req.prompt.trim().is_empty() {
        return Err(ServerError::invalid("prompt", "must not be empty"));
    }
    if prompt_chars > limits.max_prompt_chars {
        return Err(ServerError::invalid(
            "prompt",
            format!(
                "has {prompt_chars} characters; at most {} allowed",
                limits.max_prompt_chars
            ),
        ));
    }
    if req.negative_prompt.chars().count() > limits.max_prompt_chars {
        return Err(ServerError::invalid(
            "negative_prompt",
            format!("at most {} characters allowed", limits.max_prompt_chars),
        ));
    }
    let size = |value: Option<u32>| value.unwrap_or(defaults.size) as usize;
    let sample = SampleRequest {
        num_images: req.num_images.unwrap_or(defaults.num_images) as usize,
        seed: req.seed.unwrap_or_else(rand::random),
        steps: req.steps.unwrap_or(defaults.steps) as usize,
        guidance_scale: f64::from(req.guidance_scale.unwrap_or(defaults.guidance_scale)),
        eta: f64::from(req.eta.unwrap_or(defaults.eta)),
        width: size(req.width),
        height: size(req.height),
        shared_noise: req.shared_initial_noise,
    };
    sample.check(&limits.sample)?;
    // The generation is pinned here: the request finishes on it whatever swaps happen meanwhile.
    let adapter = adapters.resolve(&req.adapter).map_err(|e| match e {
        AdapterError::Unknown(_) => ServerError::invalid("adapter", e.to_string()),
        other => ServerError::from(other),
    })?;
    let format = pb::ImageFormat::try_from(req.format).map_err(|_| {
        ServerError::invalid(
            "format",
            format!("unknown format {}; use PNG or JPEG", req.format),
        )
    })?;
    let request_id = if req.request_id.is_empty() {
        new_id()
    } else if req.request_id.len() > 128 {
        return Err(ServerError::invalid("request_id", "at most 128 bytes"));
    } else {
        req.request_id.clone()
    };
    Ok(Prepared {
        spec: JobSpec {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            sample,
            adapter,
        },
        format,
        request_id,
    })
}

/// Encodes an RGB image; JPEG at quality 90.
fn encode(
    image: &RgbImage,
    format: pb::ImageFormat,
) -> Result<(Vec<u8>, &'static str), ServerError> {
    let mut out = std::io::Cursor::new(Vec::new());
    let (w, h) = (image.width as u32, image.height as u32);
    let result = match format {
        pb::ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(&image.data, w, h, image::ExtendedColorType::Rgb8)
            .map(|_| "image/jpeg"),
        _ => image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            &image.data,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        )
        .map(|_| "image/png"),
    };
    let mime = result.map_err(|e| ServerError::Internal(format!("encoding the image: {e}")))?;
    Ok((out.into_inner(), mime))
}

impl GeneratorService {
    /// Admits, queues and awaits one generation; stores its trajectories; builds the answer.
    async fn run(
        &self,
        request: &pb::GenerateRequest,
        progress: Option<mpsc::Sender<(u32, u32)>>,
    ) -> Result<pb::GenerateResponse, ServerError> {
        let state = &self.state;
        state.accepting()?;
        let prepared = prepare(request, &state.defaults, &state.limits, &state.adapters)?;
        let admission = state.engine.admit()?;
        let seed = prepared.spec.sample.seed;
        let reply = state.engine.submit(prepared.spec, admission, progress)?;
        let output = reply
            .await
            .map_err(|_| ServerError::Unavailable("the model thread stopped".into()))??;
        self.finish(output, prepared.format, prepared.request_id, seed)
            .await
    }

    async fn finish(
        &self,
        output: JobOutput,
        format: pb::ImageFormat,
        request_id: String,
        seed: u64,
    ) -> Result<pb::GenerateResponse, ServerError> {
        let state = self.state.clone();
        let JobOutput {
            generation,
            queued,
            timings,
            batch_images,
        } = output;
        let group_id = new_id();
        let image_ids: Vec<String> = generation.images.iter().map(|_| new_id()).collect();
        let adapter_generation = generation
            .trajectories
            .first()
            .and_then(|t| t.adapter_generation.clone())
            .unwrap_or_default();
        let now = SystemTime::now();
        // A chain that is not finite is no training data: one preference on it would poison a
        // round. The images still go out; feedback on them answers NOT_FOUND.
        let finite = generation.trajectories.iter().all(Trajectory::is_finite);
        if !finite {
            state.metrics.untrainable.inc();
            tracing::warn!(%group_id, "generated chain is not finite: not stored for training");
        } else {
            let entries = image_ids
                .iter()
                .cloned()
                .zip(generation.trajectories.into_iter().map(Arc::new))
                .collect();
            // The answer goes out only once the chains are durable (the tokens it carries must
            // find them after a crash). A store that cannot commit fails the request.
            let store = state.store.clone();
            let group = group_id.clone();
            tokio::task::spawn_blocking(move || store.record(&group, entries))
                .await
                .map_err(|e| ServerError::Internal(format!("store task: {e}")))??;
        }
        let sizes: Vec<(u32, u32)> = generation
            .images
            .iter()
            .map(|i| (i.width as u32, i.height as u32))
            .collect();
        // PNG/JPEG encoding is CPU work: keep it off the async runtime's threads.
        let images = generation.images;
        let encoded = tokio::task::spawn_blocking(move || {
            images
                .iter()
                .map(|i| encode(i, format))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ServerError::Internal(format!("image encoding task: {e}")))??;
        let images = encoded
            .into_iter()
            .zip(image_ids.iter().zip(sizes))
            .enumerate()
            .map(
                |(index, ((data, mime), (image_id, (width, height))))| pb::GeneratedImage {
                    image_id: image_id.clone(),
                    data,
                    mime_type: mime.to_string(),
                    seed: seed.wrapping_add(index as u64),
                    width,
                    height,
                    feedback_token: state.signer.sign(image_id, now),
                    index: index as u32,
                },
            )
            .collect::<Vec<_>>();
        Ok(pb::GenerateResponse {
            images,
            group_id,
            model_id: state.model_id.clone(),
            adapter_generation,
            timings: Some(pb::Timings {
                queue_seconds: queued.as_secs_f64(),
                denoise_seconds: timings.denoise.as_secs_f64(),
                decode_seconds: timings.decode.as_secs_f64(),
                total_seconds: (queued + timings.denoise + timings.decode).as_secs_f64(),
            }),
            request_id,
            seed,
            batch_size: batch_images as u32,
        })
    }

    /// Applies one feedback. `caller` is who sent it: `Some(key fingerprint)` for a caller
    /// authorized by an API key with the `feedback` role, `None` for a feedback-token holder.
    /// Answers OK only once the store has made it durable.
    async fn feedback(
        &self,
        req: &pb::FeedbackRequest,
        caller: Option<&str>,
    ) -> Result<pb::FeedbackResponse, ServerError> {
        let state = &self.state;
        if req.image_id.is_empty() {
            return Err(ServerError::invalid("image_id", "must not be empty"));
        }
        if caller.is_none() {
            state
                .signer
                .verify(&req.image_id, &req.feedback_token, SystemTime::now())
                .map_err(|e| {
                    ServerError::PermissionDenied(format!(
                        "{e}: send the feedback_token returned with image `{}`",
                        req.image_id
                    ))
                })?;
        }
        if req.idempotency_key.len() > 256 || req.rater_id.len() > 256 {
            return Err(ServerError::invalid(
                "idempotency_key",
                "idempotency_key and rater_id are at most 256 bytes",
            ));
        }
        let kind = match req.feedback.as_ref() {
            None => {
                return Err(ServerError::invalid(
                    "feedback",
                    "set one of vote, preferred_over or best_of",
                ));
            }
            Some(pb::feedback_request::Feedback::Vote(v)) => match pb::Vote::try_from(*v) {
                Ok(pb::Vote::Up) => FeedbackKind::Vote(Vote::Up),
                Ok(pb::Vote::Down) => FeedbackKind::Vote(Vote::Down),
                _ => return Err(ServerError::invalid("vote", "must be VOTE_UP or VOTE_DOWN")),
            },
            Some(pb::feedback_request::Feedback::PreferredOver(loser)) => {
                if loser.is_empty() {
                    return Err(ServerError::invalid(
                        "preferred_over",
                        "name the other image of the same request",
                    ));
                }
                FeedbackKind::PreferredOver(loser.clone())
            }
            Some(pb::feedback_request::Feedback::BestOf(_)) => FeedbackKind::BestOf,
        };
        // Free-form rater ids are trusted only from callers with the feedback role. A token
        // is a capability for one request's images: whoever holds it counts as one rater of
        // that group, and a repeat replaces their earlier vote.
        let rater = match caller {
            Some(_) if !req.rater_id.is_empty() => Rater::Named(req.rater_id.clone()),
            Some(_) => Rater::Named("anonymous".into()),
            None => Rater::TokenHolder,
        };
        // A key is scoped to its caller and image, and bound to its body; the store checks and
        // inserts it atomically with the feedback.
        let idempotency = (!req.idempotency_key.is_empty()).then(|| {
            (
                idempotency_scope(caller, req),
                hex::encode(body_fingerprint(req)),
            )
        });
        let feedback = NewFeedback {
            image_id: req.image_id.clone(),
            kind,
            rater,
            idempotency,
            idempotency_key: req.idempotency_key.clone(),
            feedback_id: new_id(),
        };
        let store = state.store.clone();
        let label = feedback.kind.label();
        let receipt = tokio::task::spawn_blocking(move || store.feedback(&feedback))
            .await
            .map_err(|e| ServerError::Internal(format!("store task: {e}")))??;
        if !receipt.duplicate {
            state.metrics.feedback.with_label_values(&[label]).inc();
            state
                .metrics
                .feedback_by_adapter
                .with_label_values(&[receipt.adapter_generation.as_str(), label])
                .inc();
        }
        Ok(pb::FeedbackResponse {
            feedback_id: receipt.feedback_id,
            group_id: receipt.group_id,
            duplicate: receipt.duplicate,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ImageGenerator for GeneratorService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let started = Instant::now();
        let result = async {
            self.state.authorize(&request, Role::Generate)?;
            Ok::<_, ServerError>(Response::new(self.run(request.get_ref(), None).await?))
        }
        .await
        .map_err(Status::from);
        observe(&self.state.metrics, "Generate", started, &result);
        result
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let started = Instant::now();
        // Validate before streaming, so bad input fails the call itself.
        let checked = self
            .state
            .authorize(&request, Role::Generate)
            .and_then(|_| self.state.accepting())
            .and_then(|_| {
                prepare(
                    request.get_ref(),
                    &self.state.defaults,
                    &self.state.limits,
                    &self.state.adapters,
                )
                .map(|_| ())
            });
        if let Err(e) = checked {
            let status = Status::from(e);
            observe(
                &self.state.metrics,
                "GenerateStream",
                started,
                &Err::<(), _>(status.clone()),
            );
            return Err(status);
        }
        let (events, rx) = mpsc::channel(64);
        let (progress_tx, mut progress_rx) = mpsc::channel::<(u32, u32)>(64);
        let service = self.clone();
        let req = request.into_inner();
        tokio::spawn(async move {
            let forward = {
                let events = events.clone();
                async move {
                    while let Some((step, total)) = progress_rx.recv().await {
                        let event = pb::GenerateEvent {
                            event: Some(pb::generate_event::Event::Progress(pb::Progress {
                                step,
                                total_steps: total,
                            })),
                        };
                        if events.send(Ok(event)).await.is_err() {
                            return; // client gone: dropping progress_rx cancels the job
                        }
                    }
                }
            };
            let forwarder = tokio::spawn(forward);
            let result = service.run(&req, Some(progress_tx)).await;
            // The progress sender is dropped with the job: let the last events through first.
            let _ = forwarder.await;
            let outcome = match result {
                Ok(response) => Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Result(response)),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let observed = outcome.as_ref().map(|_| ()).map_err(Clone::clone);
            observe(&service.state.metrics, "GenerateStream", started, &observed);
            let _ = events.send(outcome).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_feedback(
        &self,
        request: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        let started = Instant::now();
        // A feedback token is a capability for its image: with one, no API key is needed. A
        // presented key must be valid and carry the `feedback` role.
        let by_key = self.state.keys.enabled() && self.state.presents_key(&request);
        let result = async {
            let caller = if by_key {
                self.state.authorize(&request, Role::Feedback)?;
                Some(self.state.caller_fingerprint(&request))
            } else {
                None
            };
            self.feedback(request.get_ref(), caller.as_deref()).await
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe(&self.state.metrics, "SubmitFeedback", started, &result);
        result
    }

    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::ServerInfo>, Status> {
        let started = Instant::now();
        let state = &self.state;
        let result = state
            .authorize(&request, Role::Generate)
            .and_then(|_| {
                let stats = state.store.stats()?;
                let (d, l) = (&state.defaults, &state.limits);
                Ok(pb::ServerInfo {
                    model_id: state.model_id.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    defaults: Some(pb::Defaults {
                        num_images: d.num_images,
                        steps: d.steps,
                        guidance_scale: d.guidance_scale,
                        width: d.size,
                        height: d.size,
                        eta: d.eta,
                    }),
                    limits: Some(pb::Limits {
                        max_num_images: wire_u32(l.sample.max_images),
                        max_steps: wire_u32(l.sample.max_steps),
                        max_width: wire_u32(l.sample.max_size),
                        max_height: wire_u32(l.sample.max_size),
                        size_multiple: wire_u32(l.sample.size_multiple),
                        max_prompt_chars: wire_u32(l.max_prompt_chars),
                        max_batch: wire_u32(l.max_batch),
                        max_queue: wire_u32(l.max_queue),
                        max_guidance_scale: MAX_GUIDANCE_SCALE as f32,
                        min_eta: MIN_ETA as f32,
                    }),
                    live_adapter: state
                        .adapters
                        .live()?
                        .map(|g| g.meta.id.clone())
                        .unwrap_or_default(),
                    trajectory_buffer_bytes: stats.bytes as u64,
                    trajectory_buffer_entries: stats.entries as u64,
                })
            })
            .map(Response::new)
            .map_err(Status::from);
        observe(&state.metrics, "GetInfo", started, &result);
        result
    }
}

/// A count as the API's `uint32` (saturating: a limit beyond it is "no limit" to a client).
fn wire_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The idempotency cache key: the caller (an API key's fingerprint, or the token holder), the
/// image and the client's key. A key reused on another image or by another caller is new.
fn idempotency_scope(caller: Option<&str>, req: &pb::FeedbackRequest) -> String {
    format!(
        "{}\u{0}{}\u{0}{}",
        caller.unwrap_or("token"),
        req.image_id,
        req.idempotency_key
    )
}

/// What a retry must repeat exactly: the feedback and the rater (not the token, which a client
/// may refresh, nor the key itself).
fn body_fingerprint(req: &pb::FeedbackRequest) -> [u8; 32] {
    use prost::Message;
    use sha2::Digest;
    let body = pb::FeedbackRequest {
        feedback_token: String::new(),
        idempotency_key: String::new(),
        ..req.clone()
    };
    sha2::Sha256::digest(body.encode_to_vec()).into()
}
