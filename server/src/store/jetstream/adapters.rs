//! Adapter generations in a JetStream object store and the live alias in a KV bucket, for the
//! adapter registry ([`SharedAdapters`]); and the watch that hot-swaps a replica when the alias
//! changes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, object_store, stream};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;

use super::Nats;
use crate::adapters::{
    AdapterError, AdapterMeta, AdapterRegistry, GenerationFiles, LiveState, SharedAdapters,
};
use crate::store::StoreError;

const OBJECTS_BUCKET: &str = "imagegen_adapters";
const LIVE_BUCKET: &str = "imagegen_live";
const LIVE_KEY: &str = "live";
const META: &str = "meta.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

/// The shared generations and alias.
#[derive(Clone)]
pub(crate) struct JetStreamAdapters {
    nats: Nats,
    objects: object_store::ObjectStore,
    live: kv::Store,
}

impl std::fmt::Debug for JetStreamAdapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamAdapters")
            .field("objects", &OBJECTS_BUCKET)
            .field("live", &LIVE_BUCKET)
            .finish()
    }
}

impl JetStreamAdapters {
    /// Opens (creating if missing) the object store and the alias bucket.
    pub(crate) async fn open(nats: &Nats) -> Result<Self, StoreError> {
        let objects = match nats
            .js
            .create_object_store(object_store::Config {
                bucket: OBJECTS_BUCKET.into(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
        {
            Ok(store) => store,
            Err(create) => nats
                .js
                .get_object_store(OBJECTS_BUCKET)
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "opening the adapter object store ({create}): {e}"
                    ))
                })?,
        };
        let live = nats
            .bucket(kv::Config {
                bucket: LIVE_BUCKET.into(),
                history: 64,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        Ok(Self {
            nats: nats.clone(),
            objects,
            live,
        })
    }

    fn wait<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T, AdapterError>>,
    ) -> Result<T, AdapterError> {
        self.nats
            .wait(what, async { Ok(work.await) })
            .map_err(|e| AdapterError::Io(e.to_string()))?
    }

    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, AdapterError> {
        let mut object = match self.objects.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading the adapter object store", e)),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| io("reading a shared adapter", e))?;
        Ok(Some(bytes))
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> AdapterError {
    AdapterError::Io(format!("{what}: {e}"))
}

fn parse_state(value: &[u8]) -> Result<LiveState, AdapterError> {
    serde_json::from_slice(value)
        .map_err(|e| AdapterError::Format(format!("shared live alias: {e}")))
}

impl SharedAdapters for JetStreamAdapters {
    fn put(&self, files: &GenerationFiles) -> Result<(), AdapterError> {
        let id = &files.meta.id;
        let meta =
            serde_json::to_vec(&files.meta).map_err(|e| AdapterError::Format(e.to_string()))?;
        self.wait("sharing an adapter generation", async {
            // meta.json last: a generation whose meta is there is whole.
            for (name, bytes) in [
                (WEIGHTS, &files.safetensors),
                (CONFIG, &files.config),
                (META, &meta),
            ] {
                self.objects
                    .put(format!("{id}/{name}").as_str(), &mut bytes.as_slice())
                    .await
                    .map_err(|e| io("writing the adapter object store", e))?;
            }
            Ok(())
        })
    }

    fn fetch(&self, id: &str) -> Result<Option<GenerationFiles>, AdapterError> {
        self.wait("fetching a shared adapter generation", async {
            let Some(meta) = self.read(&format!("{id}/{META}")).await? else {
                return Ok(None);
            };
            let meta: AdapterMeta = serde_json::from_slice(&meta)
                .map_err(|e| AdapterError::Format(format!("shared meta.json of {id}: {e}")))?;
            let missing =
                |name: &str| AdapterError::Format(format!("shared generation {id} has no {name}"));
            let safetensors = self
                .read(&format!("{id}/{WEIGHTS}"))
                .await?
                .ok_or_else(|| missing(WEIGHTS))?;
            let config = self
                .read(&format!("{id}/{CONFIG}"))
                .await?
                .ok_or_else(|| missing(CONFIG))?;
            Ok(Some(GenerationFiles {
                meta,
                safetensors,
                config,
            }))
        })
    }

    fn live(&self) -> Result<(LiveState, u64), AdapterError> {
        self.wait("reading the shared live alias", async {
            let entry = self
                .live
                .entry(LIVE_KEY)
                .await
                .map_err(|e| io("reading the shared live alias", e))?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    Ok((parse_state(&e.value)?, e.revision))
                }
                Some(e) => Ok((LiveState::default(), e.revision)),
                None => Ok((LiveState::default(), 0)),
            }
        })
    }

    fn swap(&self, state: &LiveState, revision: u64) -> Result<Option<u64>, AdapterError> {
        let value = serde_json::to_vec(state).map_err(|e| AdapterError::Format(e.to_string()))?;
        self.wait("changing the shared live alias", async {
            let result = if revision == 0 {
                self.live.create(LIVE_KEY, value.into()).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                })
            } else {
                self.live
                    .update(LIVE_KEY, value.into(), revision)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            };
            match result {
                Ok(revision) => Ok(Some(revision)),
                Err((true, _)) => Ok(None),
                Err((false, e)) => Err(io("changing the shared live alias", e)),
            }
        })
    }
}

/// Applies one state of the alias, retrying for a few seconds when it cannot (NATS briefly
/// away): a replica must not stay on an old adapter until the next swap. Changes are applied in
/// order, so a newer one waits for these retries.
async fn follow(registry: &Arc<AdapterRegistry>, state: LiveState, revision: u64) {
    for attempt in 1..=10 {
        let (registry, state) = (registry.clone(), state.clone());
        match tokio::task::spawn_blocking(move || registry.follow(state, revision)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => tracing::warn!(error = %e, attempt, "following the shared live alias"),
            Err(e) => tracing::error!(error = %e, "following the shared live alias"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(
        revision,
        "gave up following the shared live alias until it changes again"
    );
}

/// Follows the shared alias: every change is applied to `registry` as it arrives (a replica's
/// hot swap, well within a second of the write), and the watch is re-established after errors.
pub(crate) async fn watch_live(shared: JetStreamAdapters, registry: Arc<AdapterRegistry>) {
    loop {
        match shared.live.watch(LIVE_KEY).await {
            Ok(mut changes) => {
                while let Some(change) = changes.next().await {
                    let entry = match change {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the shared live alias");
                            break;
                        }
                    };
                    let state = match entry.operation {
                        kv::Operation::Put => match parse_state(&entry.value) {
                            Ok(state) => state,
                            Err(e) => {
                                tracing::error!(error = %e, "ignoring an unreadable live alias");
                                continue;
                            }
                        },
                        _ => LiveState::default(),
                    };
                    follow(&registry, state, entry.revision).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching the shared live alias"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
