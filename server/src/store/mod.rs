//! The learning store: the one boundary between serving and learning. Trajectories, feedback,
//! idempotency keys and the ledger of trained pairs all go through [`LearningStore`]; the
//! engine, the gRPC services and the plugins hold an `Arc<dyn LearningStore>` and do not know
//! which backend runs.
//!
//! Backends, chosen by configuration:
//! - **memory** (`--ephemeral`): today's ring buffer; everything dies with the process.
//! - **embedded** (the default): the same in-memory index, written through to a redb database in
//!   the data directory before a call returns, so *acknowledged means durable*.
//! - **jetstream** (`--nats-url`): many serving replicas and one trainer share one JetStream
//!   stream; a call returns once JetStream acknowledged it (see [`jetstream`]).
//!
//! Adapter generations and the live alias: on one machine the adapter registry's files under
//! `DATA_DIR/adapters` (atomic renames, quarantine of damaged files); on NATS a JetStream object
//! store and KV bucket behind the registry's [`crate::adapters::SharedAdapters`].

pub(crate) mod buffer;
mod codec;
mod embedded;
pub(crate) mod jetstream;
mod metrics;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use candle_core::Device;

use buffer::{BufferError, BufferStats, Evicted, FeedbackRecord, GroupSnapshot, TrajectoryBuffer};
pub(crate) use buffer::{FeedbackKind, NewFeedback, Rater, Receipt};
pub(crate) use metrics::StoreMetrics;

use crate::sampler::Trajectory;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The request does not fit what is stored (unknown image, reused key, ...).
    #[error(transparent)]
    Rejected(#[from] BufferError),
    /// The change could not be made durable: nothing was acknowledged.
    #[error("the learning store could not commit: {0}")]
    Unavailable(String),
    /// A bug: a lock poisoned by a panic.
    #[error("the learning store is in a broken state: {0}")]
    Broken(String),
}

/// The boundary between serving and learning.
pub(crate) trait LearningStore: Send + Sync + std::fmt::Debug {
    /// `memory`, `embedded` or `jetstream`.
    fn backend(&self) -> &'static str;

    /// Stores the images of one request as a group; returns once it is durable.
    fn record(
        &self,
        group_id: &str,
        images: Vec<(String, Arc<Trajectory>)>,
    ) -> Result<(), StoreError>;

    /// Applies one feedback (idempotently, atomically); returns once it is durable.
    fn feedback(&self, feedback: &NewFeedback) -> Result<Receipt, StoreError>;

    /// A consistent copy of the groups, oldest first (only labelled ones unless asked).
    fn groups(&self, include_unlabelled: bool) -> Result<Vec<GroupSnapshot>, StoreError>;

    /// The ledger: `(winner, loser)` image-id pairs already trained on.
    fn trained_pairs(&self) -> Result<HashSet<(String, String)>, StoreError>;

    /// Records trained pairs `(group, winner, loser)` and groups consumed in full at a version.
    fn mark_trained(
        &self,
        pairs: &[(String, String, String)],
        settled: &[(String, u64)],
    ) -> Result<(), StoreError>;

    /// Bytes, images and groups held.
    fn stats(&self) -> Result<BufferStats, StoreError>;
}

/// What one change writes to durable storage.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// New groups: sequence number to encoded chains.
    pub groups: Vec<(u64, Vec<u8>)>,
    /// Feedback records to write: group id to record.
    pub feedback: Vec<(String, FeedbackRecord)>,
    /// Groups to delete.
    pub removed: Vec<Evicted>,
}

/// Where an [`IndexedStore`] makes its changes durable.
pub(crate) trait Durability: Send + Sync + std::fmt::Debug {
    /// `memory` or `embedded`.
    fn name(&self) -> &'static str;
    /// Whether [`Durability::commit`] writes anything (the memory backend skips encoding).
    fn persists(&self) -> bool;
    /// Commits one change atomically.
    fn commit(&self, changes: Changes) -> Result<(), StoreError>;
}

/// Nothing is written: the memory-only store of `--ephemeral`.
#[derive(Debug)]
pub(crate) struct Ephemeral;

impl Durability for Ephemeral {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn persists(&self) -> bool {
        false
    }
    fn commit(&self, _: Changes) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The in-memory index, with every change committed to `D` under the index's lock (so the
/// index and the disk agree, and check-and-insert is atomic).
#[derive(Debug)]
pub(crate) struct IndexedStore<D: Durability> {
    index: Mutex<TrajectoryBuffer>,
    durability: D,
    metrics: StoreMetrics,
}

/// The memory-only store.
pub(crate) fn ephemeral(max_bytes: usize, metrics: StoreMetrics) -> Arc<dyn LearningStore> {
    metrics.backend.with_label_values(&["memory"]).set(1);
    Arc::new(IndexedStore {
        index: Mutex::new(TrajectoryBuffer::new(max_bytes)),
        durability: Ephemeral,
        metrics,
    })
}

/// The durable store in `dir` (created if missing), loaded back into memory.
pub(crate) fn embedded(
    dir: &Path,
    max_bytes: usize,
    device: &Device,
    metrics: StoreMetrics,
) -> Result<Arc<dyn LearningStore>, StoreError> {
    let (database, index) = embedded::open(dir, max_bytes, device, &metrics)?;
    metrics.backend.with_label_values(&["embedded"]).set(1);
    let store = IndexedStore {
        index: Mutex::new(index),
        durability: database,
        metrics,
    };
    store.publish(&*store.lock()?);
    Ok(Arc::new(store))
}

impl<D: Durability> IndexedStore<D> {
    fn lock(&self) -> Result<MutexGuard<'_, TrajectoryBuffer>, StoreError> {
        self.index
            .lock()
            .map_err(|_| StoreError::Broken("the index lock was poisoned by a panic".into()))
    }

    /// Commits and times one change.
    fn commit(&self, what: &str, changes: Changes) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.durability.commit(changes);
        self.metrics
            .commit_seconds
            .with_label_values(&[what])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .commit_failures
                .with_label_values(&[what])
                .inc();
            tracing::error!(error = %e, what, "learning store commit failed");
        }
        result
    }

    fn publish(&self, index: &TrajectoryBuffer) {
        let stats = index.stats();
        self.metrics.bytes.set(stats.bytes as i64);
        self.metrics.entries.set(stats.entries as i64);
        self.metrics
            .trainer_lag
            .set(index.untrained_groups() as i64);
    }

    fn count_evictions(&self, evicted: &[Evicted]) {
        for e in evicted {
            self.metrics.evictions.inc_by(e.images as u64);
            if e.untrained {
                self.metrics.evicted_untrained.inc();
                tracing::warn!(group = %e.group_id, "evicted a group with untrained feedback: the buffer budget is too small for the trainer's pace");
            }
        }
    }

    fn records(index: &TrajectoryBuffer, groups: &[String]) -> Vec<(String, FeedbackRecord)> {
        groups
            .iter()
            .filter_map(|g| index.feedback(g).map(|(_, r)| (g.clone(), r.clone())))
            .collect()
    }
}

impl<D: Durability> LearningStore for IndexedStore<D> {
    fn backend(&self) -> &'static str {
        self.durability.name()
    }

    fn record(
        &self,
        group_id: &str,
        images: Vec<(String, Arc<Trajectory>)>,
    ) -> Result<(), StoreError> {
        let created_at = SystemTime::now();
        // Encoding copies the chains: do it before taking the lock.
        let encoded = if self.durability.persists() {
            Some(codec::encode_group(group_id, created_at, &images)?)
        } else {
            None
        };
        let mut index = self.lock()?;
        let (seq, evicted) = index.insert_group(group_id, created_at, images);
        let changes = Changes {
            groups: encoded.map(|bytes| vec![(seq, bytes)]).unwrap_or_default(),
            feedback: Vec::new(),
            removed: evicted.clone(),
        };
        let result = self.commit("trajectories", changes);
        if result.is_err() {
            // Not durable: not stored. (Groups evicted for it stay on disk until next start.)
            index.remove_group(group_id);
        }
        self.count_evictions(&evicted);
        self.publish(&index);
        result
    }

    fn feedback(&self, feedback: &NewFeedback) -> Result<Receipt, StoreError> {
        let mut index = self.lock()?;
        let (receipt, before) = index.apply(feedback)?;
        let Some(before) = before else {
            return Ok(receipt); // a retry: nothing new to store
        };
        let evicted = index.evict_to_budget();
        let changes = Changes {
            groups: Vec::new(),
            feedback: Self::records(&index, std::slice::from_ref(&receipt.group_id)),
            removed: evicted.clone(),
        };
        let result = self.commit("feedback", changes);
        if result.is_err() {
            index.set_feedback(&receipt.group_id, before);
        }
        self.count_evictions(&evicted);
        self.publish(&index);
        result.map(|()| receipt)
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
        let mut index = self.lock()?;
        let changed = index.mark_trained(pairs, settled);
        if changed.is_empty() {
            return Ok(());
        }
        let changes = Changes {
            feedback: Self::records(&index, &changed),
            ..Changes::default()
        };
        let result = self.commit("ledger", changes);
        self.publish(&index);
        result
    }

    fn stats(&self) -> Result<BufferStats, StoreError> {
        Ok(self.lock()?.stats())
    }
}
