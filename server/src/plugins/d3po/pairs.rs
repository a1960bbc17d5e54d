//! The buffer's feedback translated into `plugin-d3po`'s preference pairs, with their chains.

use std::sync::Arc;

use plugin_d3po::{GroupFeedback, PreferencePair, build_pairs};

use crate::sampler::Trajectory;
use crate::store::buffer::{GroupSnapshot, Vote};

/// A preference pair with its chains.
pub(super) struct TrainingPair {
    pub(super) group_id: String,
    /// `(winner, loser)` image ids: what the ledger of trained pairs records.
    pub(super) key: (String, String),
    pub(super) winner: Arc<Trajectory>,
    pub(super) loser: Arc<Trajectory>,
}

/// Pairs from every labelled group, newest groups first.
pub(super) fn collect_pairs(groups: &[GroupSnapshot]) -> Vec<TrainingPair> {
    let mut out = Vec::new();
    for GroupSnapshot {
        group_id,
        group,
        images,
        ..
    } in groups.iter().rev()
    {
        let feedback = GroupFeedback {
            images: images.iter().map(|i| i.image_id.clone()).collect(),
            votes: images
                .iter()
                .flat_map(|i| {
                    i.votes.iter().map(move |(rater, v)| {
                        (
                            i.image_id.clone(),
                            rater.clone(),
                            if *v == Vote::Up { 1 } else { -1 },
                        )
                    })
                })
                .collect(),
            comparisons: group
                .comparisons
                .iter()
                .map(|c| (c.winner.clone(), c.loser.clone(), c.rater.clone()))
                .collect(),
            best_of: group
                .best_of
                .iter()
                .map(|(r, i)| (r.clone(), i.clone()))
                .collect(),
        };
        for PreferencePair { winner, loser } in build_pairs(&feedback) {
            let find = |id: &str| {
                images
                    .iter()
                    .find(|i| i.image_id == id)
                    .map(|i| i.trajectory.clone())
            };
            if let (Some(w), Some(l)) = (find(&winner), find(&loser)) {
                out.push(TrainingPair {
                    group_id: group_id.clone(),
                    key: (winner, loser),
                    winner: w,
                    loser: l,
                });
            }
        }
    }
    out
}
