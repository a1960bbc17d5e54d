//! The learning store's in-memory index: every buffered request (group) with its images' chains
//! and the feedback on them, bounded by bytes. Both store backends keep one; the durable one
//! writes each change through before it is acknowledged.
//!
//! Retention: whole groups go, oldest first (pairs are built within a group, so half a group is
//! no training data). A group whose feedback the trainer has not consumed yet is kept while
//! consumed or unlabelled groups can go, as long as such groups hold at most half the budget;
//! beyond that the oldest of them go first (counted), so fresh images always find room to be
//! rated. The budget is a hard limit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::sampler::Trajectory;

/// A thumbs-up or thumbs-down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// The rater liked the image.
    Up,
    /// The rater disliked the image.
    Down,
}

/// "`winner` is better than `loser`", from one rater.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// The preferred image.
    pub winner: String,
    /// The other image.
    pub loser: String,
    /// Who said so.
    pub rater: String,
}

/// One buffered image as a consumer sees it.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// Its id.
    pub image_id: String,
    /// The request it belongs to.
    pub group_id: String,
    /// Its recorded chain.
    pub trajectory: Arc<Trajectory>,
    /// When it was generated.
    pub created_at: SystemTime,
    /// Votes by rater (a rater's later vote replaces the earlier one).
    pub votes: BTreeMap<String, Vote>,
}

/// The feedback on one group's images.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Its images, in generation order.
    pub image_ids: Vec<String>,
    /// Pairwise preferences.
    pub comparisons: Vec<Comparison>,
    /// Best-of picks: rater to image id.
    pub best_of: BTreeMap<String, String>,
}

/// One group as a consumer sees it: a copy of its feedback and of its images.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    /// The request's group id.
    pub group_id: String,
    /// Its feedback.
    pub group: Group,
    /// Its images, in generation order.
    pub images: Vec<StoredImage>,
    /// The feedback version this copy shows (see [`TrajectoryBuffer::mark_trained`]).
    pub version: u64,
}

/// The first answer to an idempotency key: a retry with the same body gets it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Answer {
    /// SHA-256 of the feedback body, hex.
    pub fingerprint: String,
    /// The feedback id first returned.
    pub feedback_id: String,
}

/// Everything about one group that is not its chains: what the durable store writes per
/// feedback, and what a restart reads back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct FeedbackRecord {
    /// Image id to rater to vote.
    pub votes: BTreeMap<String, BTreeMap<String, Vote>>,
    /// Pairwise preferences.
    pub comparisons: Vec<Comparison>,
    /// Rater to picked image.
    pub best_of: BTreeMap<String, String>,
    /// Idempotency scope to first answer.
    pub answers: BTreeMap<String, Answer>,
    /// The ledger: `(winner, loser)` pairs of this group already trained on.
    pub trained_pairs: BTreeSet<(String, String)>,
    /// Bumped by every feedback change.
    pub version: u64,
    /// The version the trainer last consumed in full.
    pub trained_version: u64,
}

impl FeedbackRecord {
    fn is_labelled(&self) -> bool {
        !self.comparisons.is_empty()
            || !self.best_of.is_empty()
            || self.votes.values().any(|v| !v.is_empty())
    }

    /// Feedback the trainer has not consumed yet.
    fn is_untrained(&self) -> bool {
        self.is_labelled() && self.version > self.trained_version
    }

    /// What the record holds in memory, about its JSON size (nothing for a group nobody
    /// rated: its chains are its cost).
    fn size_bytes(&self) -> usize {
        if !self.is_labelled() && self.answers.is_empty() && self.trained_pairs.is_empty() {
            return 0;
        }
        serde_json::to_vec(self).map(|v| v.len()).unwrap_or(0)
    }
}

/// Why feedback could not be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// The image was never generated here, or has been evicted.
    #[error("image `{0}` is unknown or has been evicted from the trajectory buffer")]
    UnknownImage(String),
    /// A comparison between images of different requests.
    #[error("images `{0}` and `{1}` belong to different groups; compare images of one request")]
    DifferentGroups(String, String),
    /// An image compared with itself.
    #[error("an image cannot be preferred over itself")]
    SameImage,
    /// An idempotency key reused with a different body.
    #[error(
        "idempotency_key `{0}` was already used for different feedback on this image; use a new \
         key for new feedback"
    )]
    KeyReused(String),
}

/// Who gives feedback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rater {
    /// A rater id vouched for by an API key with the `feedback` role.
    Named(String),
    /// A feedback-token holder: one rater per group, whoever holds its tokens.
    TokenHolder,
}

/// What the feedback says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FeedbackKind {
    /// A thumbs-up or -down on the image.
    Vote(Vote),
    /// The image is better than this other image of its group.
    PreferredOver(String),
    /// The image is the best of its group.
    BestOf,
}

impl FeedbackKind {
    /// The metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Vote(Vote::Up) => "vote_up",
            Self::Vote(Vote::Down) => "vote_down",
            Self::PreferredOver(_) => "preference",
            Self::BestOf => "best_of",
        }
    }
}

/// One feedback to apply.
#[derive(Debug, Clone)]
pub(crate) struct NewFeedback {
    /// The rated image.
    pub image_id: String,
    /// What is said about it.
    pub kind: FeedbackKind,
    /// Who says it.
    pub rater: Rater,
    /// `(scope, body fingerprint)` when the client sent an idempotency key.
    pub idempotency: Option<(String, String)>,
    /// The client's key, for messages.
    pub idempotency_key: String,
    /// The id this feedback gets if it is new.
    pub feedback_id: String,
}

/// What applying feedback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// The image's group.
    pub group_id: String,
    /// The feedback's id (the first one's, for a duplicate).
    pub feedback_id: String,
    /// A retry of feedback already applied.
    pub duplicate: bool,
    /// The adapter generation that drew the image (`base` for none).
    pub adapter_generation: String,
}

/// A group that left the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// Its insertion sequence number (the durable store's key).
    pub seq: u64,
    /// Its id.
    pub group_id: String,
    /// Its images.
    pub images: usize,
    /// It carried feedback not yet trained on.
    pub untrained: bool,
}

/// Counters the buffer reports after each change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BufferStats {
    /// Bytes held (chains and feedback).
    pub bytes: usize,
    /// Images held.
    pub entries: usize,
    /// Groups held.
    pub groups: usize,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    created_at: SystemTime,
    images: Vec<(String, Arc<Trajectory>)>,
    feedback: FeedbackRecord,
    chain_bytes: usize,
    feedback_bytes: usize,
}

/// The index.
#[derive(Debug)]
pub(crate) struct TrajectoryBuffer {
    max_bytes: usize,
    bytes: usize,
    next_seq: u64,
    /// Insertion order: sequence number to group id.
    order: BTreeMap<u64, String>,
    groups: HashMap<String, Entry>,
    /// Image id to group id.
    image_group: HashMap<String, String>,
}

impl TrajectoryBuffer {
    /// An empty buffer holding at most `max_bytes` of chains and feedback.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: 0,
            next_seq: 1,
            order: BTreeMap::new(),
            groups: HashMap::new(),
            image_group: HashMap::new(),
        }
    }

    /// Current counters.
    pub(crate) fn stats(&self) -> BufferStats {
        BufferStats {
            bytes: self.bytes,
            entries: self.image_group.len(),
            groups: self.groups.len(),
        }
    }

    /// Adds the images of one request as a new group; returns its sequence number and the
    /// groups evicted to stay within budget.
    pub(crate) fn insert_group(
        &mut self,
        group_id: &str,
        created_at: SystemTime,
        images: Vec<(String, Arc<Trajectory>)>,
    ) -> (u64, Vec<Evicted>) {
        let seq = self.next_seq;
        self.restore_group(seq, group_id, created_at, images, FeedbackRecord::default());
        (seq, self.evict_to_budget())
    }

    /// Puts back a group read from durable storage (no eviction: call
    /// [`TrajectoryBuffer::evict_to_budget`] after the last one).
    pub(crate) fn restore_group(
        &mut self,
        seq: u64,
        group_id: &str,
        created_at: SystemTime,
        images: Vec<(String, Arc<Trajectory>)>,
        feedback: FeedbackRecord,
    ) {
        let chain_bytes = images.iter().map(|(_, t)| t.size_bytes()).sum();
        let feedback_bytes = feedback.size_bytes();
        for (image_id, _) in &images {
            self.image_group
                .insert(image_id.clone(), group_id.to_string());
        }
        self.bytes += chain_bytes + feedback_bytes;
        self.next_seq = self.next_seq.max(seq + 1);
        self.order.insert(seq, group_id.to_string());
        self.groups.insert(
            group_id.to_string(),
            Entry {
                seq,
                created_at,
                images,
                feedback,
                chain_bytes,
                feedback_bytes,
            },
        );
    }

    /// Removes a group (undoing an insert whose commit failed); returns it as evicted.
    pub(crate) fn remove_group(&mut self, group_id: &str) -> Option<Evicted> {
        let entry = self.groups.remove(group_id)?;
        self.order.remove(&entry.seq);
        for (image_id, _) in &entry.images {
            self.image_group.remove(image_id);
        }
        self.bytes -= entry.chain_bytes + entry.feedback_bytes;
        Some(Evicted {
            seq: entry.seq,
            group_id: group_id.to_string(),
            images: entry.images.len(),
            untrained: entry.feedback.is_untrained(),
        })
    }

    /// Evicts whole groups, oldest first, sparing groups with untrained feedback while they
    /// hold at most half the budget, until chains and feedback fit the budget.
    pub(crate) fn evict_to_budget(&mut self) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        while self.bytes > self.max_bytes && !self.order.is_empty() {
            let untrained_bytes: usize = self
                .groups
                .values()
                .filter(|e| e.feedback.is_untrained())
                .map(|e| e.chain_bytes + e.feedback_bytes)
                .sum();
            let spare_untrained = untrained_bytes <= self.max_bytes / 2;
            let spare = self
                .order
                .values()
                .find(|id| {
                    !spare_untrained
                        || self
                            .groups
                            .get(*id)
                            .is_some_and(|e| !e.feedback.is_untrained())
                })
                .or_else(|| self.order.values().next())
                .cloned();
            match spare.and_then(|id| self.remove_group(&id)) {
                Some(e) => evicted.push(e),
                None => break,
            }
        }
        evicted
    }

    /// The group and chain of a buffered image.
    pub(crate) fn image(&self, image_id: &str) -> Result<(&str, &Arc<Trajectory>), BufferError> {
        let unknown = || BufferError::UnknownImage(image_id.to_string());
        let group_id = self.image_group.get(image_id).ok_or_else(unknown)?;
        let entry = self.groups.get(group_id).ok_or_else(unknown)?;
        let (_, chain) = entry
            .images
            .iter()
            .find(|(id, _)| id == image_id)
            .ok_or_else(unknown)?;
        Ok((group_id, chain))
    }

    /// The sequence number and feedback of a group.
    pub(crate) fn feedback(&self, group_id: &str) -> Option<(u64, &FeedbackRecord)> {
        self.groups.get(group_id).map(|e| (e.seq, &e.feedback))
    }

    /// Replaces a group's feedback (restoring it after a failed commit).
    pub(crate) fn set_feedback(&mut self, group_id: &str, feedback: FeedbackRecord) {
        if let Some(entry) = self.groups.get_mut(group_id) {
            let size = feedback.size_bytes();
            self.bytes = self.bytes - entry.feedback_bytes + size;
            entry.feedback_bytes = size;
            entry.feedback = feedback;
        }
    }

    /// Applies one feedback atomically: the idempotency check, the change and the key's
    /// answer. Returns the receipt and the group's feedback before the change (`None` for a
    /// duplicate, which changes nothing).
    pub(crate) fn apply(
        &mut self,
        feedback: &NewFeedback,
    ) -> Result<(Receipt, Option<FeedbackRecord>), BufferError> {
        let (group_id, chain) = self.image(&feedback.image_id)?;
        let group_id = group_id.to_string();
        let adapter_generation = chain
            .adapter_generation
            .clone()
            .unwrap_or_else(|| "base".into());
        let Some(entry) = self.groups.get(&group_id) else {
            return Err(BufferError::UnknownImage(feedback.image_id.clone()));
        };
        if let Some((scope, fingerprint)) = &feedback.idempotency
            && let Some(first) = entry.feedback.answers.get(scope)
        {
            if &first.fingerprint != fingerprint {
                return Err(BufferError::KeyReused(feedback.idempotency_key.clone()));
            }
            let receipt = Receipt {
                group_id,
                feedback_id: first.feedback_id.clone(),
                duplicate: true,
                adapter_generation,
            };
            return Ok((receipt, None));
        }
        if let FeedbackKind::PreferredOver(loser) = &feedback.kind {
            if loser == &feedback.image_id {
                return Err(BufferError::SameImage);
            }
            if self.image(loser)?.0 != group_id {
                return Err(BufferError::DifferentGroups(
                    feedback.image_id.clone(),
                    loser.clone(),
                ));
            }
        }
        let before = entry.feedback.clone();
        let mut record = before.clone();
        let rater = match &feedback.rater {
            Rater::Named(id) => id.clone(),
            Rater::TokenHolder => format!("token:{group_id}"),
        };
        let image = feedback.image_id.clone();
        match &feedback.kind {
            FeedbackKind::Vote(vote) => {
                record.votes.entry(image).or_default().insert(rater, *vote);
            }
            FeedbackKind::PreferredOver(loser) => {
                // A rater's later statement about the same two images replaces the earlier one.
                record.comparisons.retain(|c| {
                    c.rater != rater
                        || !((c.winner == image && &c.loser == loser)
                            || (&c.winner == loser && c.loser == image))
                });
                record.comparisons.push(Comparison {
                    winner: image,
                    loser: loser.clone(),
                    rater,
                });
            }
            FeedbackKind::BestOf => {
                record.best_of.insert(rater, image);
            }
        }
        if let Some((scope, fingerprint)) = &feedback.idempotency {
            record.answers.insert(
                scope.clone(),
                Answer {
                    fingerprint: fingerprint.clone(),
                    feedback_id: feedback.feedback_id.clone(),
                },
            );
        }
        record.version += 1;
        self.set_feedback(&group_id, record);
        let receipt = Receipt {
            group_id,
            feedback_id: feedback.feedback_id.clone(),
            duplicate: false,
            adapter_generation,
        };
        Ok((receipt, Some(before)))
    }

    /// Records trained pairs `(group, winner, loser)` in the ledger, and marks groups whose
    /// feedback (at the version the trainer saw) is consumed in full; returns the groups changed.
    pub(crate) fn mark_trained(
        &mut self,
        pairs: &[(String, String, String)],
        settled: &[(String, u64)],
    ) -> Vec<String> {
        let mut changed = BTreeSet::new();
        // Only real changes count: the trainer settles idle groups every interval, and an
        // unchanged record must not be rewritten.
        for (group_id, winner, loser) in pairs {
            if let Some(e) = self.groups.get_mut(group_id)
                && e.feedback
                    .trained_pairs
                    .insert((winner.clone(), loser.clone()))
            {
                changed.insert(group_id.clone());
            }
        }
        for (group_id, version) in settled {
            if let Some(e) = self.groups.get_mut(group_id)
                && *version > e.feedback.trained_version
            {
                e.feedback.trained_version = *version;
                changed.insert(group_id.clone());
            }
        }
        for group_id in &changed {
            if let Some(record) = self.groups.get(group_id).map(|e| e.feedback.clone()) {
                self.set_feedback(group_id, record);
            }
        }
        changed.into_iter().collect()
    }

    /// The ledger: every `(winner, loser)` pair trained on, of the groups still held.
    pub(crate) fn trained_pairs(&self) -> HashSet<(String, String)> {
        self.groups
            .values()
            .flat_map(|e| e.feedback.trained_pairs.iter().cloned())
            .collect()
    }

    /// Labelled groups whose feedback the trainer has not consumed (trainer lag).
    pub(crate) fn untrained_groups(&self) -> usize {
        self.groups
            .values()
            .filter(|e| e.feedback.is_untrained())
            .count()
    }

    /// A consistent copy of the groups (and their images) for export or training, oldest first.
    pub(crate) fn snapshot(&self, include_unlabelled: bool) -> Vec<GroupSnapshot> {
        self.order
            .values()
            .filter_map(|group_id| {
                let e = self.groups.get(group_id)?;
                if !include_unlabelled && !e.feedback.is_labelled() {
                    return None;
                }
                let images = e
                    .images
                    .iter()
                    .map(|(image_id, trajectory)| StoredImage {
                        image_id: image_id.clone(),
                        group_id: group_id.clone(),
                        trajectory: trajectory.clone(),
                        created_at: e.created_at,
                        votes: e.feedback.votes.get(image_id).cloned().unwrap_or_default(),
                    })
                    .collect();
                Some(GroupSnapshot {
                    group_id: group_id.clone(),
                    group: Group {
                        image_ids: e.images.iter().map(|(id, _)| id.clone()).collect(),
                        comparisons: e.feedback.comparisons.clone(),
                        best_of: e.feedback.best_of.clone(),
                    },
                    images,
                    version: e.feedback.version,
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "buffer_tests.rs"]
mod tests;
