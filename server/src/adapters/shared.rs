//! Generations and the live alias shared between processes (scale-out on NATS).
//!
//! With a [`SharedAdapters`] attached, the shared side is the truth: a published generation is
//! put there before it can go live, `live` changes only by a revision-checked swap there, and
//! every process follows what the shared alias says ([`AdapterRegistry::follow`]), fetching a
//! generation it has not seen. The local files under `DATA_DIR/adapters` are then a cache.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{
    AdapterError, AdapterGeneration, AdapterMeta, AdapterRegistry, LiveChange, LiveState,
    content_id, from_peft, to_peft,
};
use crate::clock::now_seconds;

/// A generation's files as they travel between processes.
#[derive(Debug, Clone)]
pub(crate) struct GenerationFiles {
    /// Its description (`meta.json`).
    pub meta: AdapterMeta,
    /// PEFT `adapter_model.safetensors` (diffusers' `unet.` keys).
    pub safetensors: Vec<u8>,
    /// PEFT `adapter_config.json`.
    pub config: Vec<u8>,
}

/// Where generations and the live alias are shared (the JetStream object store and KV bucket).
pub(crate) trait SharedAdapters: Send + Sync + std::fmt::Debug {
    /// Makes a generation available to every process (idempotent: ids are content hashes).
    fn put(&self, files: &GenerationFiles) -> Result<(), AdapterError>;
    /// A generation's files (`None`: nobody published it).
    fn fetch(&self, id: &str) -> Result<Option<GenerationFiles>, AdapterError>;
    /// The shared alias and its revision (0: never set).
    fn live(&self) -> Result<(LiveState, u64), AdapterError>;
    /// Replaces the alias if it is still at `revision`: the new revision, or `None` when someone
    /// changed it first.
    fn swap(&self, state: &LiveState, revision: u64) -> Result<Option<u64>, AdapterError>;
}

impl AdapterRegistry {
    /// Shares generations and the live alias through `shared` from now on, after following what
    /// it says is live.
    pub(crate) fn with_shared(
        mut self,
        shared: Arc<dyn SharedAdapters>,
    ) -> Result<Self, AdapterError> {
        self.shared = Some(shared.clone());
        let (state, revision) = shared.live()?;
        self.follow(state, revision)?;
        Ok(self)
    }

    /// Puts a freshly published generation where other processes find it.
    pub(super) fn share(&self, generation: &AdapterGeneration) -> Result<(), AdapterError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let (safetensors, config) = to_peft(&generation.weights, &self.targets, &self.model_id)?;
        shared.put(&GenerationFiles {
            meta: generation.meta.clone(),
            safetensors,
            config,
        })
    }

    /// The alias as the authority has it: shared when attached, else local.
    pub(super) fn live_state(&self) -> Result<(LiveState, u64), AdapterError> {
        match &self.shared {
            Some(shared) => shared.live(),
            None => {
                let state = self.read()?;
                Ok((
                    LiveState {
                        live: state.live.as_ref().map(|g| g.meta.id.clone()),
                        history: state.history.clone(),
                    },
                    0,
                ))
            }
        }
    }

    /// The shared compare-and-swap of `activate`: `expected` is checked against the shared alias,
    /// and a swap lost to a concurrent writer is retried against what it wrote.
    pub(super) fn activate_shared(
        &self,
        shared: &dyn SharedAdapters,
        id: Option<&str>,
        expected: Option<&str>,
        reason: &str,
    ) -> Result<(), AdapterError> {
        let target = id.map(|id| self.load_or_fetch(id)).transpose()?;
        loop {
            let (mut state, revision) = shared.live()?;
            if state.live.as_deref() != expected {
                return Err(AdapterError::Conflict {
                    expected: expected.unwrap_or("base").to_string(),
                    actual: state.live.unwrap_or_else(|| "base".into()),
                });
            }
            state.history.push(LiveChange {
                from: state.live.clone(),
                to: id.map(String::from),
                at: now_seconds(),
                reason: reason.to_string(),
            });
            state.live = id.map(String::from);
            if let Some(revision) = shared.swap(&state, revision)? {
                return self.apply_live(target, reason, |local| {
                    local.shared_revision.store(revision, Ordering::Release);
                    Ok(state)
                });
            }
        }
    }

    /// Makes the local alias what the shared one at `revision` says (a replica's hot swap):
    /// fetches the generation if it is new here. Idempotent; an older revision than the one
    /// applied (a watcher lagging behind this process's own swap) changes nothing.
    pub(crate) fn follow(&self, state: LiveState, revision: u64) -> Result<(), AdapterError> {
        {
            let local = self.read()?;
            let live = local.live.as_ref().map(|g| g.meta.id.as_str());
            let applied = local.shared_revision.load(Ordering::Acquire);
            if revision < applied
                || (live == state.live.as_deref() && local.history.len() == state.history.len())
            {
                return Ok(());
            }
        }
        let target = state
            .live
            .as_deref()
            .map(|id| self.load_or_fetch(id))
            .transpose()?;
        let reason = state
            .history
            .last()
            .map(|c| c.reason.clone())
            .unwrap_or_else(|| "followed".into());
        self.apply_live(target, &reason, |local| {
            local.shared_revision.fetch_max(revision, Ordering::AcqRel);
            Ok(state)
        })
    }

    /// A generation known here, else fetched from the shared side and kept.
    fn load_or_fetch(&self, id: &str) -> Result<Arc<AdapterGeneration>, AdapterError> {
        let known = self.read()?.metas.contains_key(id);
        if known || self.shared.is_none() {
            return self.load(id);
        }
        let shared = self
            .shared
            .as_ref()
            .ok_or_else(|| AdapterError::Unknown(id.into()))?;
        let files = shared
            .fetch(id)?
            .ok_or_else(|| AdapterError::Unknown(id.to_string()))?;
        let weights = from_peft(
            &files.safetensors,
            &files.config,
            &self.targets,
            &self.device,
        )?;
        // The id is a content hash: a file that does not hash to it is damaged or forged.
        let actual = content_id(&weights, &self.targets)?;
        if actual != id {
            return Err(AdapterError::Format(format!(
                "shared generation `{id}` hashes to `{actual}`: damaged in transit or storage"
            )));
        }
        if let Some(store) = &self.store {
            store.save(&files.meta, &weights, &self.targets, &self.model_id)?;
        }
        let generation = Arc::new(AdapterGeneration {
            meta: files.meta.clone(),
            weights,
        });
        let mut state = self.write()?;
        state.metas.insert(id.to_string(), files.meta);
        if self.store.is_none() {
            state.in_memory.insert(id.to_string(), generation.clone());
        } else {
            state
                .loaded
                .insert(id.to_string(), Arc::downgrade(&generation));
        }
        tracing::info!(generation = %id, "fetched a shared adapter generation");
        Ok(generation)
    }
}
