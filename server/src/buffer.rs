//! The trajectory ring buffer: every generated image's chain, bounded by bytes, oldest evicted
//! first, with the feedback users attach to it. It is the training data of the D3PO plugin and
//! what `ExportTrajectories` writes out.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use crate::sampler::Trajectory;

/// A thumbs-up or thumbs-down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// The rater liked the image.
    Up,
    /// The rater disliked the image.
    Down,
}

/// "`winner` is better than `loser`", from one rater.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The preferred image.
    pub winner: String,
    /// The other image.
    pub loser: String,
    /// Who said so.
    pub rater: String,
}

/// One buffered image.
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

/// The images of one request and the feedback that compares them.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Images still in the buffer, in generation order.
    pub image_ids: Vec<String>,
    /// Pairwise preferences.
    pub comparisons: Vec<Comparison>,
    /// Best-of picks: rater to image id.
    pub best_of: BTreeMap<String, String>,
}

/// One group as a consumer sees it: a copy of its feedback and of its images still buffered.
#[derive(Debug, Clone)]
pub struct GroupSnapshot {
    /// The request's group id.
    pub group_id: String,
    /// Its feedback.
    pub group: Group,
    /// Its images still in the buffer, in generation order.
    pub images: Vec<StoredImage>,
}

impl Group {
    /// Whether any feedback touches this group.
    pub fn is_labelled(&self, images: &HashMap<String, StoredImage>) -> bool {
        !self.comparisons.is_empty()
            || !self.best_of.is_empty()
            || self
                .image_ids
                .iter()
                .any(|id| images.get(id).is_some_and(|i| !i.votes.is_empty()))
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
}

/// Counters the buffer reports after each change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BufferStats {
    /// Bytes held.
    pub bytes: usize,
    /// Images held.
    pub entries: usize,
    /// Images evicted since start.
    pub evictions: u64,
}

/// The ring buffer.
#[derive(Debug)]
pub(crate) struct TrajectoryBuffer {
    max_bytes: usize,
    bytes: usize,
    evictions: u64,
    order: VecDeque<String>,
    images: HashMap<String, StoredImage>,
    groups: HashMap<String, Group>,
}

impl TrajectoryBuffer {
    /// An empty buffer holding at most `max_bytes` of trajectories.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: 0,
            evictions: 0,
            order: VecDeque::new(),
            images: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    /// Current counters.
    pub(crate) fn stats(&self) -> BufferStats {
        BufferStats {
            bytes: self.bytes,
            entries: self.images.len(),
            evictions: self.evictions,
        }
    }

    /// Adds the images of one request; evicts the oldest images while over budget. Returns how
    /// many images were evicted.
    pub(crate) fn insert_group(
        &mut self,
        group_id: &str,
        images: Vec<(String, Arc<Trajectory>)>,
    ) -> usize {
        let group = self.groups.entry(group_id.to_string()).or_default();
        for (image_id, trajectory) in images {
            self.bytes += trajectory.size_bytes();
            group.image_ids.push(image_id.clone());
            self.order.push_back(image_id.clone());
            self.images.insert(
                image_id.clone(),
                StoredImage {
                    image_id,
                    group_id: group_id.to_string(),
                    trajectory,
                    created_at: SystemTime::now(),
                    votes: BTreeMap::new(),
                },
            );
        }
        let mut evicted = 0;
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(image) = self.images.remove(&oldest) {
                self.bytes -= image.trajectory.size_bytes();
                self.evictions += 1;
                evicted += 1;
                if let Some(group) = self.groups.get_mut(&image.group_id) {
                    group.image_ids.retain(|id| id != &oldest);
                    group
                        .comparisons
                        .retain(|c| c.winner != oldest && c.loser != oldest);
                    group.best_of.retain(|_, id| id != &oldest);
                    if group.image_ids.is_empty() {
                        self.groups.remove(&image.group_id);
                    }
                }
            }
        }
        evicted
    }

    /// The buffered image `image_id`.
    pub(crate) fn image(&self, image_id: &str) -> Result<&StoredImage, BufferError> {
        self.images
            .get(image_id)
            .ok_or_else(|| BufferError::UnknownImage(image_id.to_string()))
    }

    /// Records `rater`'s vote on an image; returns its group id.
    pub(crate) fn vote(
        &mut self,
        image_id: &str,
        rater: &str,
        vote: Vote,
    ) -> Result<String, BufferError> {
        let image = self
            .images
            .get_mut(image_id)
            .ok_or_else(|| BufferError::UnknownImage(image_id.to_string()))?;
        image.votes.insert(rater.to_string(), vote);
        Ok(image.group_id.clone())
    }

    /// Records "`winner` is better than `loser`"; both must be images of one group.
    pub(crate) fn prefer(
        &mut self,
        winner: &str,
        loser: &str,
        rater: &str,
    ) -> Result<String, BufferError> {
        if winner == loser {
            return Err(BufferError::SameImage);
        }
        let group_id = self.image(winner)?.group_id.clone();
        if self.image(loser)?.group_id != group_id {
            return Err(BufferError::DifferentGroups(
                winner.to_string(),
                loser.to_string(),
            ));
        }
        let comparison = Comparison {
            winner: winner.to_string(),
            loser: loser.to_string(),
            rater: rater.to_string(),
        };
        if let Some(group) = self.groups.get_mut(&group_id) {
            // A rater's later statement about the same two images replaces the earlier one.
            group.comparisons.retain(|c| {
                c.rater != comparison.rater
                    || !((c.winner == winner && c.loser == loser)
                        || (c.winner == loser && c.loser == winner))
            });
            group.comparisons.push(comparison);
        }
        Ok(group_id)
    }

    /// Records `image_id` as `rater`'s pick of its group.
    pub(crate) fn best_of(&mut self, image_id: &str, rater: &str) -> Result<String, BufferError> {
        let group_id = self.image(image_id)?.group_id.clone();
        if let Some(group) = self.groups.get_mut(&group_id) {
            group
                .best_of
                .insert(rater.to_string(), image_id.to_string());
        }
        Ok(group_id)
    }

    /// A consistent copy of the groups (and their images) for export or training, oldest first.
    pub(crate) fn snapshot(&self, include_unlabelled: bool) -> Vec<GroupSnapshot> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for image_id in &self.order {
            let Some(image) = self.images.get(image_id) else {
                continue;
            };
            if !seen.insert(image.group_id.clone()) {
                continue;
            }
            let Some(group) = self.groups.get(&image.group_id) else {
                continue;
            };
            if !include_unlabelled && !group.is_labelled(&self.images) {
                continue;
            }
            let images = group
                .image_ids
                .iter()
                .filter_map(|id| self.images.get(id).cloned())
                .collect();
            out.push(GroupSnapshot {
                group_id: image.group_id.clone(),
                group: group.clone(),
                images,
            });
        }
        out
    }
}
