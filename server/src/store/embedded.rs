//! The embedded durable backend: a redb database (`DATA_DIR/learning.redb`).
//!
//! Why redb: pure Rust (no C toolchain, quick to build), ACID with copy-on-write B-trees and a
//! checksummed commit, recovers by itself from a crash mid-write, and one writer at a time is
//! exactly this server's shape. Every commit is fsynced (`Durability::Immediate`, redb's default)
//! before the call that made it is answered.
//!
//! Tables: `groups` (sequence number to the group's chains, [`super::codec`]) and `feedback`
//! (group id to its JSON [`FeedbackRecord`]: votes, comparisons, picks, idempotency answers and
//! the trained-pair ledger). A record that cannot be read back is moved to `DATA_DIR/quarantine/`
//! and counted; a database file redb cannot open is moved aside and a fresh one started, so one
//! bad file never keeps the server from starting.

use std::path::{Path, PathBuf};

use candle_core::Device;
use redb::{ReadableTable, TableDefinition};

use super::buffer::{FeedbackRecord, TrajectoryBuffer};
use super::codec::decode_group;
use super::{Changes, Durability, StoreError, StoreMetrics};

const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
const FEEDBACK: TableDefinition<&str, &[u8]> = TableDefinition::new("feedback");
/// redb's page cache: the index lives in memory already, the cache only speeds up writes.
const CACHE_BYTES: usize = 32 << 20;

/// The database, as the store's [`Durability`].
pub(crate) struct Database {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Opens (or creates) the database in `dir` and reads it back into an index.
pub(crate) fn open(
    dir: &Path,
    max_bytes: usize,
    device: &Device,
    metrics: &StoreMetrics,
) -> Result<(Database, TrajectoryBuffer), StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join("learning.redb");
    let builder = || {
        let mut b = redb::Database::builder();
        b.set_cache_size(CACHE_BYTES);
        b
    };
    let db = match builder().create(&path) {
        Ok(db) => db,
        Err(e) => {
            // A file redb cannot open (not ours, or damaged beyond its own recovery) is set
            // aside for an operator; the server starts on a fresh one rather than crash-looping.
            let aside = path.with_extension(format!(
                "redb.damaged-{}",
                crate::clock::now_seconds() as u64
            ));
            tracing::error!(error = %e, aside = %aside.display(), "the learning store's database cannot be opened: moved aside, starting empty");
            std::fs::rename(&path, &aside)
                .map_err(|e| unavailable(format!("moving {} aside: {e}", path.display())))?;
            metrics.quarantined.inc();
            builder().create(&path).map_err(unavailable)?
        }
    };
    let database = Database { db, path };
    let index = database.load(dir, max_bytes, device, metrics)?;
    Ok((database, index))
}

impl Database {
    /// Reads every group and its feedback back; quarantines what cannot be read; applies the
    /// budget (it may have shrunk since the last run).
    fn load(
        &self,
        dir: &Path,
        max_bytes: usize,
        device: &Device,
        metrics: &StoreMetrics,
    ) -> Result<TrajectoryBuffer, StoreError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        txn.open_table(GROUPS).map_err(unavailable)?;
        txn.open_table(FEEDBACK).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;

        let mut index = TrajectoryBuffer::new(max_bytes);
        let mut damaged: Vec<u64> = Vec::new();
        let mut orphans: Vec<String> = Vec::new();
        {
            let read = self.db.begin_read().map_err(unavailable)?;
            let groups = read.open_table(GROUPS).map_err(unavailable)?;
            let feedback = read.open_table(FEEDBACK).map_err(unavailable)?;
            for row in groups.iter().map_err(unavailable)? {
                let (seq, bytes) = row.map_err(unavailable)?;
                let (seq, bytes) = (seq.value(), bytes.value());
                let group = match decode_group(bytes, device) {
                    Ok(g) => g,
                    Err(e) => {
                        quarantine(dir, &format!("group-{seq}.safetensors"), bytes, &e, metrics);
                        damaged.push(seq);
                        continue;
                    }
                };
                let record = match feedback.get(group.group_id.as_str()).map_err(unavailable)? {
                    None => FeedbackRecord::default(),
                    Some(raw) => serde_json::from_slice(raw.value()).unwrap_or_else(|e| {
                        let name = format!("feedback-{}.json", group.group_id);
                        quarantine(dir, &name, raw.value(), &e.to_string(), metrics);
                        FeedbackRecord::default()
                    }),
                };
                index.restore_group(seq, &group.group_id, group.created_at, group.images, record);
            }
            for row in feedback.iter().map_err(unavailable)? {
                let (group_id, _) = row.map_err(unavailable)?;
                if index.feedback(group_id.value()).is_none() {
                    orphans.push(group_id.value().to_string());
                }
            }
        }
        let evicted = index.evict_to_budget();
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut feedback = txn.open_table(FEEDBACK).map_err(unavailable)?;
            for seq in damaged {
                groups.remove(seq).map_err(unavailable)?;
            }
            for e in &evicted {
                groups.remove(e.seq).map_err(unavailable)?;
                feedback.remove(e.group_id.as_str()).map_err(unavailable)?;
            }
            for group_id in orphans {
                feedback.remove(group_id.as_str()).map_err(unavailable)?;
            }
        }
        txn.commit().map_err(unavailable)?;
        let stats = index.stats();
        tracing::info!(path = %self.path.display(), groups = stats.groups, images = stats.entries, bytes = stats.bytes, "learning store loaded");
        Ok(index)
    }
}

/// Keeps a copy of an unreadable record for an operator, logs and counts it.
fn quarantine(dir: &Path, name: &str, bytes: &[u8], why: &str, metrics: &StoreMetrics) {
    let aside = dir.join("quarantine");
    let written =
        std::fs::create_dir_all(&aside).and_then(|()| std::fs::write(aside.join(name), bytes));
    tracing::error!(
        record = name,
        error = why,
        kept = written.is_ok(),
        "unreadable learning-store record moved to quarantine/"
    );
    metrics.quarantined.inc();
}

impl Durability for Database {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn persists(&self) -> bool {
        true
    }

    fn commit(&self, changes: Changes) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut groups = txn.open_table(GROUPS).map_err(unavailable)?;
            let mut feedback = txn.open_table(FEEDBACK).map_err(unavailable)?;
            for (seq, bytes) in &changes.groups {
                groups.insert(*seq, bytes.as_slice()).map_err(unavailable)?;
            }
            for (group_id, record) in &changes.feedback {
                let json = serde_json::to_vec(record).map_err(unavailable)?;
                feedback
                    .insert(group_id.as_str(), json.as_slice())
                    .map_err(unavailable)?;
            }
            for e in &changes.removed {
                groups.remove(e.seq).map_err(unavailable)?;
                feedback.remove(e.group_id.as_str()).map_err(unavailable)?;
            }
        }
        txn.commit().map_err(unavailable)
    }
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
