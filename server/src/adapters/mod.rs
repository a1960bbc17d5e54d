//! Adapter generations and the `live` alias.
//!
//! A generation is immutable and named by a hash of its content; the alias `live` points at one
//! (or at none: the base model). A request resolves its adapter once, when admitted, and holds an
//! `Arc` to it: in-flight work finishes on the generation it started with, a swap never fails a
//! request, and a retired generation is freed when its last request lets go. Replacing `live` is
//! a compare-and-swap on the expected current generation.

mod kohya;
mod shared;
mod store;

use crate::clock::now_seconds;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(crate) use shared::{GenerationFiles, SharedAdapters};
pub use store::{AdapterStore, PeftConfig, from_peft, to_peft, write_atomic};

use crate::model::{LoraTarget, LoraWeights};

/// Errors of the adapter registry.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// No generation with this id.
    #[error(
        "unknown adapter `{0}`: use empty (live), `base`, or a generation id from ListAdapters"
    )]
    Unknown(String),
    /// The compare-and-swap lost: `live` is not what the caller expected.
    #[error(
        "the live adapter is `{actual}`, not the expected `{expected}`; read it again and retry"
    )]
    Conflict {
        /// What the caller expected.
        expected: String,
        /// What is live.
        actual: String,
    },
    /// Nothing to roll back to.
    #[error("no earlier live adapter to roll back to")]
    NoHistory,
    /// A malformed adapter file.
    #[error("invalid adapter: {0}")]
    Format(String),
    /// A file could not be read or written.
    #[error("adapter store: {0}")]
    Io(String),
    /// A tensor operation failed.
    #[error("adapter tensors: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// What training produced a generation from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingStats {
    /// Preference pairs trained on.
    pub pairs: usize,
    /// Mean D3PO loss over the round.
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_loss: f64,
    /// Held-out ranking accuracy of this generation's implicit reward.
    #[serde(deserialize_with = "nan_if_null")]
    pub heldout_accuracy: f64,
    /// The same for the generation it was trained from.
    #[serde(deserialize_with = "nan_if_null")]
    pub parent_heldout_accuracy: f64,
    /// Wall time of the round in seconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Mean KL divergence per step and latent element from the base model on the round's probe
    /// chains (`None`: not measured, the drift guard is off or the generation predates it).
    #[serde(default)]
    pub drift: Option<f64>,
    /// The `(winner, loser)` image-id pairs trained on: with the store's ledger, what makes a
    /// round killed between publishing and recording its pairs train them exactly once.
    #[serde(default)]
    pub trained_pairs: Vec<(String, String)>,
}

/// JSON has no NaN: serde_json writes one as `null`, which must read back (as NaN).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Everything about a generation but its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// Content hash (hex).
    pub id: String,
    /// The generation it was trained from (`None`: the base model).
    pub parent: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: f64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// `trained` or `imported`.
    pub origin: String,
    /// Training statistics (trained generations).
    pub stats: Option<TrainingStats>,
    /// Feedback groups it learned from.
    pub learned_from: Vec<String>,
}

/// An immutable adapter generation.
#[derive(Debug)]
pub struct AdapterGeneration {
    /// Its description.
    pub meta: AdapterMeta,
    /// Its factors.
    pub weights: LoraWeights,
}

/// A change of the live alias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveChange {
    /// The previous live generation (`None`: base).
    pub from: Option<String>,
    /// The new one.
    pub to: Option<String>,
    /// When, seconds since the epoch.
    pub at: f64,
    /// Why (`trained`, `activated`, `rollback`).
    pub reason: String,
}

/// The persisted alias: the live generation and how it got there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// The live generation (`None`: base).
    pub live: Option<String>,
    /// Every change, oldest first.
    pub history: Vec<LiveChange>,
}

/// The content hash of weights: SHA-256 over rank, alpha, and every factor's name and f32 bytes.
pub fn content_id(weights: &LoraWeights, targets: &[LoraTarget]) -> Result<String, AdapterError> {
    let mut hash = Sha256::new();
    hash.update(weights.rank().to_le_bytes());
    hash.update(weights.alpha().to_le_bytes());
    for (path, pair) in weights.named_layers(targets) {
        hash.update(path.as_bytes());
        for t in [&pair.down, &pair.up] {
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for v in values {
                hash.update(v.to_le_bytes());
            }
        }
    }
    Ok(hex::encode(&hash.finalize()[..8]))
}

struct RegistryState {
    live: Option<Arc<AdapterGeneration>>,
    metas: BTreeMap<String, AdapterMeta>,
    history: Vec<LiveChange>,
    /// Generations some request or the trainer still holds: shared instead of reloaded.
    loaded: HashMap<String, Weak<AdapterGeneration>>,
    /// Without a store, the registry itself keeps every generation (nothing to reload from).
    in_memory: HashMap<String, Arc<AdapterGeneration>>,
    /// Damaged files moved aside at start (reported once metrics are attached).
    quarantined: usize,
    /// Revision of the shared alias last applied (scale-out; 0 otherwise).
    shared_revision: std::sync::atomic::AtomicU64,
}

/// Generations, the live alias, and their persistence.
pub struct AdapterRegistry {
    metrics: Option<crate::metrics::Metrics>,
    targets: Vec<LoraTarget>,
    model_id: String,
    device: Device,
    store: Option<AdapterStore>,
    /// Where generations and the alias are shared between processes (scale-out).
    shared: Option<Arc<dyn SharedAdapters>>,
    state: RwLock<RegistryState>,
}

impl std::fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterRegistry")
            .field("model_id", &self.model_id)
            .field("store", &self.store)
            .field("shared", &self.shared)
            .finish()
    }
}

impl AdapterRegistry {
    /// A registry for a UNet with `targets`; with a store directory, generations and the live
    /// alias persist there and are restored now.
    pub fn open(
        targets: Vec<LoraTarget>,
        model_id: &str,
        device: &Device,
        store_dir: Option<&Path>,
    ) -> Result<Self, AdapterError> {
        let store = store_dir.map(AdapterStore::open).transpose()?;
        let mut metas = BTreeMap::new();
        let mut saved = LiveState::default();
        let mut quarantined = 0;
        if let Some(store) = &store {
            for meta in store.list() {
                metas.insert(meta.id.clone(), meta);
            }
            // A torn or unreadable state.json must not keep the server from starting (a crash
            // loop under Kubernetes): it is moved aside and the base model serves.
            saved = match store.load_state() {
                Ok(state) => state.unwrap_or_default(),
                Err(error) => {
                    quarantined += 1;
                    let aside = store.quarantine("state.json");
                    tracing::error!(%error, ?aside, "live alias unreadable: quarantined; serving the base model");
                    LiveState::default()
                }
            };
        }
        let registry = Self {
            metrics: None,
            targets,
            model_id: model_id.to_string(),
            device: device.clone(),
            store,
            shared: None,
            state: RwLock::new(RegistryState {
                live: None,
                metas,
                history: saved.history,
                loaded: HashMap::new(),
                in_memory: HashMap::new(),
                quarantined,
                shared_revision: Default::default(),
            }),
        };
        registry.restore_live(saved.live)?;
        Ok(registry)
    }

    /// Makes `saved` live again; a damaged generation is quarantined and the one live before it
    /// (by the history), or else the base model, takes its place.
    fn restore_live(&self, saved: Option<String>) -> Result<(), AdapterError> {
        if saved.is_none() {
            return Ok(());
        }
        let mut candidate = saved;
        let mut tried = std::collections::HashSet::new();
        while let Some(id) = candidate.take() {
            if !tried.insert(id.clone()) {
                break;
            }
            match self.load(&id) {
                Ok(generation) => {
                    self.write()?.live = Some(generation);
                    tracing::info!(generation = %id, "restored the live adapter");
                    return Ok(());
                }
                Err(error) => {
                    let mut state = self.write()?;
                    state.quarantined += 1;
                    state.metas.remove(&id);
                    let aside = self.store.as_ref().map(|s| s.quarantine(&id));
                    tracing::error!(generation = %id, %error, ?aside, "live adapter damaged: quarantined");
                    // The generation that was live before this one became live.
                    candidate = state
                        .history
                        .iter()
                        .rev()
                        .find(|c| c.to.as_deref() == Some(id.as_str()))
                        .and_then(|c| c.from.clone());
                }
            }
        }
        tracing::warn!("no live adapter could be restored: serving the base model");
        Ok(())
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, RegistryState>, AdapterError> {
        self.state
            .read()
            .map_err(|_| AdapterError::Io("adapter registry lock poisoned".into()))
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, RegistryState>, AdapterError> {
        self.state
            .write()
            .map_err(|_| AdapterError::Io("adapter registry lock poisoned".into()))
    }

    /// Reports swaps to `metrics` from now on (and the current live generation now).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        let live = self
            .state
            .read()
            .ok()
            .and_then(|s| s.live.as_ref().map(|g| g.meta.id.clone()));
        let quarantined = self.state.read().map(|s| s.quarantined).unwrap_or(0);
        metrics.adapters_quarantined.inc_by(quarantined as u64);
        metrics.adapter_live.reset();
        metrics
            .adapter_live
            .with_label_values(&[live.as_deref().unwrap_or("base")])
            .set(1);
        self.metrics = Some(metrics);
        self
    }

    /// The UNet projections adapters apply to.
    pub fn targets(&self) -> &[LoraTarget] {
        &self.targets
    }

    /// The live generation (`None`: base).
    pub fn live(&self) -> Result<Option<Arc<AdapterGeneration>>, AdapterError> {
        Ok(self.read()?.live.clone())
    }

    /// The generation a request names: empty or `live` = the live one, `base` = none, else an id.
    pub fn resolve(&self, selector: &str) -> Result<Option<Arc<AdapterGeneration>>, AdapterError> {
        match selector {
            "" | "live" => self.live(),
            "base" => Ok(None),
            id => self.load(id).map(Some),
        }
    }

    /// A generation by id, shared with whoever holds it already, else loaded from the store.
    fn load(&self, id: &str) -> Result<Arc<AdapterGeneration>, AdapterError> {
        {
            let state = self.read()?;
            if let Some(live) = state.live.as_ref().filter(|g| g.meta.id == id) {
                return Ok(live.clone());
            }
            if let Some(g) = state.loaded.get(id).and_then(Weak::upgrade) {
                return Ok(g);
            }
            if let Some(g) = state.in_memory.get(id) {
                return Ok(g.clone());
            }
        }
        let meta = self
            .read()?
            .metas
            .get(id)
            .cloned()
            .ok_or_else(|| AdapterError::Unknown(id.to_string()))?;
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| AdapterError::Unknown(id.to_string()))?;
        let weights = store.load_weights(id, &self.targets, &self.device)?;
        let generation = Arc::new(AdapterGeneration { meta, weights });
        self.write()?
            .loaded
            .insert(id.to_string(), Arc::downgrade(&generation));
        Ok(generation)
    }

    /// Adds a generation (persisting it); returns it. Identical content gives the same id and
    /// the existing generation.
    pub fn publish(
        &self,
        weights: LoraWeights,
        parent: Option<String>,
        origin: &str,
        stats: Option<TrainingStats>,
        learned_from: Vec<String>,
    ) -> Result<Arc<AdapterGeneration>, AdapterError> {
        let id = content_id(&weights, &self.targets)?;
        if self.read()?.metas.contains_key(&id) {
            return self.load(&id);
        }
        let meta = AdapterMeta {
            id: id.clone(),
            parent,
            created_at: now_seconds(),
            rank: weights.rank(),
            alpha: weights.alpha(),
            origin: origin.to_string(),
            stats,
            learned_from,
        };
        if let Some(store) = &self.store {
            store.save(&meta, &weights, &self.targets, &self.model_id)?;
        }
        let generation = Arc::new(AdapterGeneration {
            meta: meta.clone(),
            weights,
        });
        // Shared before it is known here, so nothing can make live what others cannot fetch.
        self.share(&generation)?;
        let mut state = self.write()?;
        state.metas.insert(id.clone(), meta);
        if self.store.is_none() {
            state.in_memory.insert(id, generation.clone());
        }
        Ok(generation)
    }

    /// Points `live` at `id` (`None`: base) if it currently is `expected` (compare-and-swap;
    /// against the shared alias when one is attached).
    pub fn activate(
        &self,
        id: Option<&str>,
        expected: Option<&str>,
        reason: &str,
    ) -> Result<(), AdapterError> {
        if let Some(shared) = self.shared.clone() {
            return self.activate_shared(&*shared, id, expected, reason);
        }
        let target = id.map(|id| self.load(id)).transpose()?;
        // Check and swap under one write lock: two racing activations cannot both pass.
        self.apply_live(target, reason, |state| {
            let actual = state.live.as_ref().map(|g| g.meta.id.clone());
            if actual.as_deref() != expected {
                return Err(AdapterError::Conflict {
                    expected: expected.unwrap_or("base").to_string(),
                    actual: actual.unwrap_or_else(|| "base".into()),
                });
            }
            let mut history = state.history.clone();
            history.push(LiveChange {
                from: actual,
                to: id.map(String::from),
                at: now_seconds(),
                reason: reason.to_string(),
            });
            Ok(LiveState {
                live: id.map(String::from),
                history,
            })
        })
    }

    /// Swaps the alias to `target` (its generation) and persists the state `next` computes from
    /// the current one (or refuses with its error), all under the write lock.
    fn apply_live(
        &self,
        target: Option<Arc<AdapterGeneration>>,
        reason: &str,
        next: impl FnOnce(&RegistryState) -> Result<LiveState, AdapterError>,
    ) -> Result<(), AdapterError> {
        let started = std::time::Instant::now();
        let mut state = self.write()?;
        let saved = next(&state)?;
        if let Some(store) = &self.store {
            store.save_state(&saved)?;
        }
        // Keep the outgoing generation shareable while requests still hold it.
        if let Some(old) = state.live.take() {
            let old_id = old.meta.id.clone();
            state.loaded.insert(old_id, Arc::downgrade(&old));
        }
        state.live = target;
        state.history = saved.history;
        drop(state);
        let id = saved.live.as_deref();
        if let Some(m) = &self.metrics {
            m.observe_swap(id, started.elapsed());
        }
        tracing::info!(live = id.unwrap_or("base"), reason, "live adapter changed");
        Ok(())
    }

    /// Points `live` back at the generation that was live before the current one was put live
    /// (rollbacks themselves are skipped, so repeated rollbacks walk back through the lineage).
    pub fn rollback(&self) -> Result<Option<String>, AdapterError> {
        let (state, _) = self.live_state()?;
        let current = state.live.clone();
        let previous = state
            .history
            .iter()
            .rev()
            .find(|c| c.to == current && c.reason != "rollback")
            .ok_or(AdapterError::NoHistory)?
            .from
            .clone();
        self.activate(previous.as_deref(), current.as_deref(), "rollback")?;
        Ok(previous)
    }

    /// Every generation's metadata, oldest first.
    pub fn list(&self) -> Result<Vec<AdapterMeta>, AdapterError> {
        let mut metas: Vec<AdapterMeta> = self.read()?.metas.values().cloned().collect();
        metas.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        Ok(metas)
    }

    /// One generation's metadata.
    pub fn meta(&self, id: &str) -> Result<AdapterMeta, AdapterError> {
        self.read()?
            .metas
            .get(id)
            .cloned()
            .ok_or_else(|| AdapterError::Unknown(id.to_string()))
    }

    /// The history of the live alias.
    pub fn history(&self) -> Result<Vec<LiveChange>, AdapterError> {
        Ok(self.read()?.history.clone())
    }

    /// A generation's PEFT files (`adapter_model.safetensors`, `adapter_config.json`).
    pub fn export(&self, id: &str) -> Result<(Vec<u8>, Vec<u8>), AdapterError> {
        let generation = self.load(id)?;
        to_peft(&generation.weights, &self.targets, &self.model_id)
    }

    /// The files an export hands to diffusers and PEFT (see [`store::export_files`]).
    pub(crate) fn export_files(
        &self,
        id: &str,
    ) -> Result<Vec<(&'static str, Vec<u8>)>, AdapterError> {
        let generation = self.load(id)?;
        store::export_files(&generation.weights, &self.targets, &self.model_id)
    }

    /// Imports PEFT files as a new generation (not made live).
    pub fn import(
        &self,
        safetensors: &[u8],
        config: &[u8],
    ) -> Result<Arc<AdapterGeneration>, AdapterError> {
        let weights = from_peft(safetensors, config, &self.targets, &self.device)?;
        self.publish(weights, None, "imported", None, Vec::new())
    }
}

#[cfg(test)]
mod tests;
