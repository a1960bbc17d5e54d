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
    /// Bytes of trajectories.
    bytes: usize,
    /// Bytes of the feedback attached to them (it counts against the same budget).
    feedback_bytes: usize,
    evictions: u64,
    order: VecDeque<String>,
    images: HashMap<String, StoredImage>,
    groups: HashMap<String, Group>,
}

impl TrajectoryBuffer {
    /// An empty buffer holding at most `max_bytes` of trajectories and feedback.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: 0,
            feedback_bytes: 0,
            evictions: 0,
            order: VecDeque::new(),
            images: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    /// Current counters.
    pub(crate) fn stats(&self) -> BufferStats {
        BufferStats {
            bytes: self.bytes + self.feedback_bytes,
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
        self.evict_to_budget()
    }

    /// Evicts the oldest images (and the feedback on them) while trajectories and feedback
    /// together exceed the budget; returns how many images went.
    fn evict_to_budget(&mut self) -> usize {
        let mut evicted = 0;
        while self.bytes + self.feedback_bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            let Some(image) = self.images.get(&oldest) else {
                continue;
            };
            let group_id = image.group_id.clone();
            let before = self.feedback_size(&group_id);
            if let Some(image) = self.images.remove(&oldest) {
                self.bytes -= image.trajectory.size_bytes();
                self.evictions += 1;
                evicted += 1;
                if let Some(group) = self.groups.get_mut(&group_id) {
                    group.image_ids.retain(|id| id != &oldest);
                    group
                        .comparisons
                        .retain(|c| c.winner != oldest && c.loser != oldest);
                    group.best_of.retain(|_, id| id != &oldest);
                    if group.image_ids.is_empty() {
                        self.groups.remove(&group_id);
                    }
                }
            }
            self.feedback_bytes = self.feedback_bytes - before + self.feedback_size(&group_id);
        }
        evicted
    }

    /// What the feedback on one group holds in memory (strings plus a fixed cost per entry).
    fn feedback_size(&self, group_id: &str) -> usize {
        const ENTRY: usize = 64;
        let Some(group) = self.groups.get(group_id) else {
            return 0;
        };
        let votes: usize = group
            .image_ids
            .iter()
            .filter_map(|id| self.images.get(id))
            .flat_map(|i| i.votes.keys())
            .map(|rater| ENTRY + rater.len())
            .sum();
        let comparisons: usize = group
            .comparisons
            .iter()
            .map(|c| ENTRY + c.rater.len() + c.winner.len() + c.loser.len())
            .sum();
        let best_of: usize = group
            .best_of
            .iter()
            .map(|(rater, image)| ENTRY + rater.len() + image.len())
            .sum();
        votes + comparisons + best_of
    }

    /// Runs a feedback change on `group_id`, then accounts for its memory and keeps the budget.
    fn with_feedback_accounted<T>(
        &mut self,
        group_id: &str,
        change: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let before = self.feedback_size(group_id);
        let out = change(self);
        self.feedback_bytes = self.feedback_bytes - before + self.feedback_size(group_id);
        self.evict_to_budget();
        out
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
        let group_id = self.image(image_id)?.group_id.clone();
        self.with_feedback_accounted(&group_id, |buffer| {
            if let Some(image) = buffer.images.get_mut(image_id) {
                image.votes.insert(rater.to_string(), vote);
            }
        });
        Ok(group_id)
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
        self.with_feedback_accounted(&group_id.clone(), |buffer| {
            if let Some(group) = buffer.groups.get_mut(&group_id) {
                // A rater's later statement about the same two images replaces the earlier one.
                group.comparisons.retain(|c| {
                    c.rater != comparison.rater
                        || !((c.winner == winner && c.loser == loser)
                            || (c.winner == loser && c.loser == winner))
                });
                group.comparisons.push(comparison);
            }
        });
        Ok(group_id)
    }

    /// Records `image_id` as `rater`'s pick of its group.
    pub(crate) fn best_of(&mut self, image_id: &str, rater: &str) -> Result<String, BufferError> {
        let group_id = self.image(image_id)?.group_id.clone();
        self.with_feedback_accounted(&group_id.clone(), |buffer| {
            if let Some(group) = buffer.groups.get_mut(&group_id) {
                group
                    .best_of
                    .insert(rater.to_string(), image_id.to_string());
            }
        });
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::sampler::Conditioning;

    fn chain() -> Arc<Trajectory> {
        let embeddings = Arc::new(Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap());
        Arc::new(Trajectory {
            latents: Tensor::zeros((2, 4, 16, 16), DType::F32, &Device::Cpu).unwrap(),
            timesteps: vec![1],
            log_probs: vec![0.0],
            conditioning: Conditioning {
                prompt: String::new(),
                negative_prompt: String::new(),
                prompt_embeddings: embeddings.clone(),
                negative_embeddings: embeddings,
            },
            guidance_scale: 1.0,
            eta: 1.0,
            seed: 0,
            image_index: 0,
            model_id: "m".into(),
            adapter_generation: None,
        })
    }

    /// Feedback memory counts against the budget: a flood of votes (made-up raters) on an old
    /// image evicts the oldest images instead of growing without bound; replacing a vote
    /// costs nothing new.
    #[test]
    fn feedback_counts_against_the_byte_budget() {
        let one = chain().size_bytes();
        let mut buffer = TrajectoryBuffer::new(4 * one + 2000);
        for g in 0..4 {
            buffer.insert_group(&format!("g{g}"), vec![(format!("i{g}"), chain())]);
        }
        assert_eq!(buffer.stats().entries, 4);
        assert_eq!(buffer.stats().bytes, 4 * one);
        buffer.vote("i3", "alice", Vote::Up).unwrap();
        let with_vote = buffer.stats().bytes;
        assert_eq!(with_vote, 4 * one + 64 + 5);
        buffer.vote("i3", "alice", Vote::Down).unwrap();
        assert_eq!(
            buffer.stats().bytes,
            with_vote,
            "a replaced vote costs nothing"
        );
        for r in 0..100 {
            buffer.vote("i3", &format!("rater-{r}"), Vote::Up).unwrap();
        }
        let stats = buffer.stats();
        assert!(stats.bytes <= 4 * one + 2000, "{stats:?}");
        assert!(stats.entries < 4 && stats.evictions > 0, "{stats:?}");
        assert!(buffer.image("i0").is_err(), "the oldest image went first");
    }
}
