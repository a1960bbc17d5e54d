//! The scale-out backend: NATS JetStream shared by serving replicas and one trainer.
//!
//! ```text
//! stream IMAGEGEN_LEARNING  imagegen.learning.group.<g>     a group's chains, in chunks
//!                           imagegen.learning.feedback.<g>  one feedback (Nats-Msg-Id: its key)
//!                           imagegen.learning.ledger.<g>    pairs trained / feedback consumed
//! kv imagegen_images        <image id> -> its group, siblings and adapter generation
//! kv imagegen_idempotency   sha256(scope) -> the first answer's body fingerprint and id
//! kv imagegen_live          `live` -> the alias and its history (revision-checked updates)
//! kv imagegen_trainer_lease `trainer` -> who trains (the bucket's max age is the lease's TTL)
//! kv imagegen_secrets       `feedback-secret` -> the generated token secret
//! object imagegen_adapters  <generation>/{meta.json, adapter_model.safetensors, adapter_config.json}
//! ```
//! One stream keeps causal order: a group is acknowledged before the Generate that made it
//! answers, so every feedback on it comes later in the stream. A process that trains replays the
//! stream from the start into the same in-memory index the other backends use, so pairs, the
//! ledger and retention work unchanged; serving-only replicas hold no chains at all.

mod adapters;
mod lease;
mod metrics;
mod replay;
#[cfg(test)]
mod tests;
mod wire;

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{HeaderMap, header};
use candle_core::Device;
use sha2::{Digest, Sha256};

pub(crate) use adapters::{JetStreamAdapters, watch_live};
pub(crate) use lease::TrainerLease;
pub(crate) use metrics::NatsMetrics;

use super::buffer::{
    BufferError, BufferStats, FeedbackKind, GroupSnapshot, NewFeedback, Receipt, TrajectoryBuffer,
};
use super::{LearningStore, StoreError, StoreMetrics, codec};
use crate::sampler::Trajectory;
use wire::{FeedbackMessage, ImageEntry, KeyAnswer, LedgerMessage};

const STREAM: &str = "IMAGEGEN_LEARNING";
const SUBJECTS: &str = "imagegen.learning.>";
const GROUP_SUBJECT: &str = "imagegen.learning.group";
const FEEDBACK_SUBJECT: &str = "imagegen.learning.feedback";
const LEDGER_SUBJECT: &str = "imagegen.learning.ledger";
const IMAGES_BUCKET: &str = "imagegen_images";
const KEYS_BUCKET: &str = "imagegen_idempotency";
const SECRETS_BUCKET: &str = "imagegen_secrets";
/// Headers of a group's chunks.
const CHUNK_HEADER: &str = "Imagegen-Chunk";
const CHUNKS_HEADER: &str = "Imagegen-Chunks";
/// How long one store operation may wait for JetStream before the RPC gives up on it.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);

/// Where NATS is and how big the learning stream may grow (from `--nats-*`).
#[derive(Clone)]
pub(crate) struct NatsOptions {
    /// `nats://host:4222` (may carry `user:password@`).
    pub url: String,
    /// A `.creds` file.
    pub creds: Option<std::path::PathBuf>,
    /// Byte limit of the learning stream.
    pub stream_bytes: i64,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &"<redacted>")
            .field("creds", &self.creds)
            .field("stream_bytes", &self.stream_bytes)
            .finish()
    }
}

/// A connection to NATS and what every part of the backend shares.
#[derive(Debug, Clone)]
pub(crate) struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The server's runtime: the store's methods are synchronous (called from blocking threads
    /// and the trainer's thread) and wait on it.
    runtime: tokio::runtime::Handle,
    metrics: NatsMetrics,
}

impl Nats {
    /// Connects (failing fast with a clear error when NATS is unreachable at start; later
    /// outages are ridden out by the client's reconnects) and creates the streams and buckets.
    pub(crate) async fn connect(
        options: &NatsOptions,
        metrics: NatsMetrics,
    ) -> Result<Self, StoreError> {
        let url = options.url.as_str();
        let connect = match &options.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!("--nats-creds {}: {e}", path.display()))
                })?,
            None => async_nats::ConnectOptions::new(),
        }
        .name("imagegen-server")
        .connection_timeout(Duration::from_secs(5));
        let client = connect.connect(url).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to NATS at --nats-url ({e}): is nats-server running with JetStream (-js)?"
            ))
        })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(OPERATION_TIMEOUT);
        let nats = Self {
            client,
            js,
            runtime: tokio::runtime::Handle::current(),
            metrics,
        };
        nats.create_stream(options.stream_bytes).await?;
        tokio::spawn(metrics::watch_connection(
            nats.client.clone(),
            nats.metrics.clone(),
        ));
        Ok(nats)
    }

    async fn create_stream(&self, max_bytes: i64) -> Result<(), StoreError> {
        let max_payload = self.client.server_info().max_payload.max(64 << 10);
        self.js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECTS.into()],
                max_bytes,
                max_message_size: max_payload as i32,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("creating the JetStream learning stream", e))?;
        Ok(())
    }

    /// A KV bucket, created if missing (a bucket made by another replica with other limits is
    /// used as it is). Its stream is created here, as the KV layout prescribes, rather than by
    /// `create_key_value`: that asks for account details nats-server 2.9 (Debian's) does not
    /// send, and fails.
    pub(crate) async fn bucket(&self, config: kv::Config) -> Result<kv::Store, StoreError> {
        let name = config.bucket.clone();
        self.js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{name}"),
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: config.history.max(1),
                max_age: config.max_age,
                storage: config.storage,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&format!("creating KV bucket {name}"), e))?;
        self.js
            .get_key_value(&name)
            .await
            .map_err(|e| unavailable(&format!("opening KV bucket {name}"), e))
    }

    /// Runs `work` on the runtime from a synchronous caller, within the operation timeout.
    fn wait<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.runtime
            .block_on(async { tokio::time::timeout(OPERATION_TIMEOUT, work).await })
            .map_err(|_| StoreError::Unavailable(format!("{what}: NATS did not answer in time")))?
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The feedback secret all replicas share: generated once by the first process to start.
    pub(crate) async fn shared_secret(&self) -> Result<Vec<u8>, StoreError> {
        let bucket = self
            .bucket(kv::Config {
                bucket: SECRETS_BUCKET.into(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let candidate = crate::tokens::random_secret();
        match bucket
            .create("feedback-secret", candidate.clone().into())
            .await
        {
            Ok(_) => Ok(candidate),
            Err(_) => bucket
                .get("feedback-secret")
                .await
                .map_err(|e| unavailable("reading the shared feedback secret", e))?
                .map(|v| v.to_vec())
                .ok_or_else(|| {
                    StoreError::Unavailable("the shared feedback secret vanished".into())
                }),
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// The JetStream learning store.
#[derive(Debug)]
pub(crate) struct JetStreamStore {
    nats: Nats,
    images: kv::Store,
    keys: kv::Store,
    /// The stream replayed into memory (processes that train); empty on serving replicas.
    index: Arc<Mutex<TrajectoryBuffer>>,
    /// Whether the replay has reached the end of the stream as it was at start.
    caught_up: Arc<AtomicBool>,
    /// The last stream sequence applied to the index.
    replayed: std::sync::atomic::AtomicU64,
    metrics: StoreMetrics,
    chunk_bytes: usize,
}

impl JetStreamStore {
    /// Opens the store; a process that trains (`replay`) follows the stream into memory.
    pub(crate) async fn open(
        nats: Nats,
        max_bytes: usize,
        retention: Duration,
        replay: bool,
        device: &Device,
        metrics: StoreMetrics,
    ) -> Result<Arc<Self>, StoreError> {
        let bucket = |name: &str, max_age: Duration| kv::Config {
            bucket: name.into(),
            history: 1,
            max_age,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let images = nats.bucket(bucket(IMAGES_BUCKET, retention)).await?;
        let keys = nats.bucket(bucket(KEYS_BUCKET, retention)).await?;
        // Half the largest message, headers and all well inside it.
        let chunk_bytes = (nats.client.server_info().max_payload / 2).max(32 << 10);
        metrics.backend.with_label_values(&["jetstream"]).set(1);
        let store = Arc::new(Self {
            nats,
            images,
            keys,
            index: Arc::new(Mutex::new(TrajectoryBuffer::new(max_bytes))),
            caught_up: Arc::new(AtomicBool::new(!replay)),
            replayed: Default::default(),
            metrics,
            chunk_bytes,
        });
        if replay {
            tokio::spawn(replay::run(store.clone(), device.clone()));
        }
        Ok(store)
    }

    /// Whether the replay has caught up with the stream (a trainer must not train before: it
    /// would retrain pairs whose ledger entries it has not read yet).
    pub(crate) fn caught_up(&self) -> Arc<AtomicBool> {
        self.caught_up.clone()
    }

    fn lock(&self) -> Result<MutexGuard<'_, TrajectoryBuffer>, StoreError> {
        self.index
            .lock()
            .map_err(|_| StoreError::Broken("the index lock was poisoned by a panic".into()))
    }

    fn publish_gauges(&self, index: &TrajectoryBuffer) {
        let stats = index.stats();
        self.metrics.bytes.set(stats.bytes as i64);
        self.metrics.entries.set(stats.entries as i64);
        self.metrics
            .trainer_lag
            .set(index.untrained_groups() as i64);
    }

    /// Publishes one message and waits for JetStream's acknowledgement.
    async fn publish(
        &self,
        subject: String,
        msg_id: &str,
        extra: &[(&str, String)],
        payload: Vec<u8>,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_MESSAGE_ID, msg_id);
        for (name, value) in extra {
            headers.insert(*name, value.as_str());
        }
        let ack = self
            .nats
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| unavailable("publishing to JetStream", e))?;
        ack.await
            .map_err(|e| unavailable("waiting for JetStream's acknowledgement", e))
    }

    async fn record_async(
        &self,
        group_id: &str,
        bytes: Vec<u8>,
        entry: ImageEntry,
    ) -> Result<(), StoreError> {
        let chunks: Vec<&[u8]> = bytes.chunks(self.chunk_bytes).collect();
        let count = chunks.len().to_string();
        for (i, chunk) in chunks.iter().enumerate() {
            let headers = [
                (CHUNK_HEADER, i.to_string()),
                (CHUNKS_HEADER, count.clone()),
            ];
            self.publish(
                format!("{GROUP_SUBJECT}.{group_id}"),
                &format!("{group_id}.{i}"),
                &headers,
                chunk.to_vec(),
            )
            .await?;
        }
        let value = serde_json::to_vec(&entry).map_err(|e| StoreError::Broken(e.to_string()))?;
        let mut puts = tokio::task::JoinSet::new();
        for image in &entry.images {
            let (images, image, value) = (self.images.clone(), image.clone(), value.clone());
            puts.spawn(async move { images.put(image, value.into()).await });
        }
        while let Some(done) = puts.join_next().await {
            done.map_err(|e| StoreError::Broken(e.to_string()))?
                .map_err(|e| unavailable("indexing the images", e))?;
        }
        Ok(())
    }

    async fn image(&self, image_id: &str) -> Result<ImageEntry, StoreError> {
        let value = self
            .images
            .get(image_id)
            .await
            .map_err(|e| unavailable("reading the image index", e))?
            .ok_or_else(|| BufferError::UnknownImage(image_id.to_string()))?;
        serde_json::from_slice(&value)
            .map_err(|e| StoreError::Broken(format!("image index entry of {image_id}: {e}")))
    }

    /// The first answer to this key, or `None` after claiming it for `feedback`.
    async fn claim_key(
        &self,
        key: &str,
        fingerprint: &str,
        feedback: &NewFeedback,
    ) -> Result<Option<KeyAnswer>, StoreError> {
        let mine = KeyAnswer {
            fingerprint: fingerprint.to_string(),
            feedback_id: feedback.feedback_id.clone(),
        };
        let value = serde_json::to_vec(&mine).map_err(|e| StoreError::Broken(e.to_string()))?;
        // Check-and-insert is the bucket's create: of two racing retries exactly one wins.
        if self.keys.create(key, value.into()).await.is_ok() {
            return Ok(None);
        }
        let first = self
            .keys
            .get(key)
            .await
            .map_err(|e| unavailable("reading the idempotency keys", e))?
            .ok_or_else(|| StoreError::Unavailable("claiming the idempotency key".into()))?;
        let first: KeyAnswer = serde_json::from_slice(&first)
            .map_err(|e| StoreError::Broken(format!("idempotency entry: {e}")))?;
        if first.fingerprint != fingerprint {
            return Err(BufferError::KeyReused(feedback.idempotency_key.clone()).into());
        }
        Ok(Some(first))
    }

    async fn feedback_async(&self, feedback: &NewFeedback) -> Result<Receipt, StoreError> {
        let entry = self.image(&feedback.image_id).await?;
        if let FeedbackKind::PreferredOver(loser) = &feedback.kind {
            if loser == &feedback.image_id {
                return Err(BufferError::SameImage.into());
            }
            if !entry.images.contains(loser) {
                self.image(loser).await?;
                return Err(
                    BufferError::DifferentGroups(feedback.image_id.clone(), loser.clone()).into(),
                );
            }
        }
        let (msg_id, first) = match &feedback.idempotency {
            Some((scope, fingerprint)) => {
                let key = hex::encode(Sha256::digest(scope.as_bytes()));
                let first = self.claim_key(&key, fingerprint, feedback).await?;
                (key, first)
            }
            None => (feedback.feedback_id.clone(), None),
        };
        let message = FeedbackMessage::new(feedback, &entry.group_id);
        let message = FeedbackMessage {
            feedback_id: first
                .as_ref()
                .map_or(message.feedback_id.clone(), |f| f.feedback_id.clone()),
            ..message
        };
        let payload =
            serde_json::to_vec(&message).map_err(|e| StoreError::Broken(e.to_string()))?;
        // A retry publishes again under the same id: JetStream drops it if the first landed, and
        // stores it if the first answer was an error (applying a feedback twice changes nothing).
        self.publish(
            format!("{FEEDBACK_SUBJECT}.{}", entry.group_id),
            &msg_id,
            &[],
            payload,
        )
        .await?;
        Ok(Receipt {
            group_id: entry.group_id,
            feedback_id: message.feedback_id,
            duplicate: first.is_some(),
            adapter_generation: entry.adapter_generation,
        })
    }
}

impl LearningStore for JetStreamStore {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    /// With NATS down a generation is served unrecorded (counted and logged): serving matters
    /// more than one request's training data. Feedback on it then answers NOT_FOUND.
    fn record(
        &self,
        group_id: &str,
        images: Vec<(String, Arc<Trajectory>)>,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let entry = ImageEntry {
            group_id: group_id.to_string(),
            adapter_generation: images
                .first()
                .and_then(|(_, t)| t.adapter_generation.clone())
                .unwrap_or_else(|| "base".into()),
            images: images.iter().map(|(id, _)| id.clone()).collect(),
        };
        let result = if self.nats.connected() {
            codec::encode_group(group_id, SystemTime::now(), &images).and_then(|bytes| {
                self.nats.wait(
                    "recording trajectories",
                    self.record_async(group_id, bytes, entry),
                )
            })
        } else {
            Err(StoreError::Unavailable("not connected to NATS".into()))
        };
        self.metrics
            .commit_seconds
            .with_label_values(&["trajectories"])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            self.metrics
                .commit_failures
                .with_label_values(&["trajectories"])
                .inc();
            self.nats.metrics.unrecorded.inc();
            tracing::warn!(group = group_id, error = %e, "generation served but not recorded for training: NATS is unavailable");
        }
        Ok(())
    }

    fn feedback(&self, feedback: &NewFeedback) -> Result<Receipt, StoreError> {
        if !self.nats.connected() {
            self.metrics
                .commit_failures
                .with_label_values(&["feedback"])
                .inc();
            return Err(StoreError::Unavailable(
                "not connected to NATS: nothing was stored, retry later".into(),
            ));
        }
        let started = std::time::Instant::now();
        let result = self
            .nats
            .wait("storing feedback", self.feedback_async(feedback));
        self.metrics
            .commit_seconds
            .with_label_values(&["feedback"])
            .observe(started.elapsed().as_secs_f64());
        if let Err(StoreError::Unavailable(e)) = &result {
            self.metrics
                .commit_failures
                .with_label_values(&["feedback"])
                .inc();
            tracing::warn!(error = %e, "feedback refused: JetStream did not acknowledge it");
        }
        result
    }

    fn groups(&self, include_unlabelled: bool) -> Result<Vec<GroupSnapshot>, StoreError> {
        Ok(self.lock()?.snapshot(include_unlabelled))
    }

    fn trained_pairs(&self) -> Result<HashSet<(String, String)>, StoreError> {
        Ok(self.lock()?.trained_pairs())
    }

    fn mark_trained(
        &self,
        pairs: &[(String, String, String)],
        settled: &[(String, u64)],
    ) -> Result<(), StoreError> {
        // Applied here at once (the next round must see it); the replay applies it again when
        // it comes back from the stream, which changes nothing.
        let changed = {
            let mut index = self.lock()?;
            let changed = index.mark_trained(pairs, settled);
            self.publish_gauges(&index);
            changed
        };
        let started = std::time::Instant::now();
        let result = self.nats.wait("recording the ledger", async {
            for group in &changed {
                let entry = LedgerMessage {
                    pairs: pairs
                        .iter()
                        .filter(|(g, _, _)| g == group)
                        .map(|(_, w, l)| (w.clone(), l.clone()))
                        .collect(),
                    settled: settled.iter().find(|(g, _)| g == group).map(|(_, v)| *v),
                };
                let payload =
                    serde_json::to_vec(&entry).map_err(|e| StoreError::Broken(e.to_string()))?;
                let id = hex::encode(Sha256::digest(&payload));
                self.publish(format!("{LEDGER_SUBJECT}.{group}"), &id, &[], payload)
                    .await?;
            }
            Ok(())
        });
        self.metrics
            .commit_seconds
            .with_label_values(&["ledger"])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics
                .commit_failures
                .with_label_values(&["ledger"])
                .inc();
        }
        result
    }

    fn stats(&self) -> Result<BufferStats, StoreError> {
        Ok(self.lock()?.stats())
    }
}
