use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::sampler::{Conditioning, Trajectory};
use crate::store::buffer::Vote;
use crate::store::{FeedbackKind, LearningStore, NewFeedback, Rater, StoreMetrics};

fn metrics() -> StoreMetrics {
    let metrics = crate::metrics::Metrics::new().unwrap();
    StoreMetrics::register(&metrics).unwrap()
}

fn images(group: &str, n: usize) -> Vec<(String, Arc<Trajectory>)> {
    let emb = Arc::new(Tensor::ones((1, 2, 3), DType::F32, &Device::Cpu).unwrap());
    let conditioning = Conditioning {
        prompt: format!("prompt of {group}"),
        negative_prompt: String::new(),
        prompt_embeddings: emb.clone(),
        negative_embeddings: emb,
    };
    (0..n)
        .map(|i| {
            let latents = Tensor::full(i as f32, (2, 4, 2, 2), &Device::Cpu).unwrap();
            let chain = Trajectory {
                latents,
                timesteps: vec![500],
                log_probs: vec![-0.5],
                conditioning: conditioning.clone(),
                guidance_scale: 2.0,
                eta: 1.0,
                seed: 7,
                image_index: i,
                model_id: "tiny".into(),
                adapter_generation: None,
            };
            (format!("{group}-{i}"), Arc::new(chain))
        })
        .collect()
}

fn prefer(winner: &str, loser: &str, key: &str) -> NewFeedback {
    NewFeedback {
        image_id: winner.into(),
        kind: FeedbackKind::PreferredOver(loser.into()),
        rater: Rater::Named("alice".into()),
        idempotency: Some((format!("k\0{winner}\0{key}"), "body".into())),
        idempotency_key: key.into(),
        feedback_id: format!("fb-{key}"),
    }
}

fn open(dir: &std::path::Path) -> Arc<dyn LearningStore> {
    crate::store::embedded(dir, 1 << 20, &Device::Cpu, metrics()).unwrap()
}

/// Closing and reopening gives back every group, vote, idempotency answer and trained pair.
#[test]
fn everything_committed_is_there_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.record("g1", images("g1", 2)).unwrap();
        store.record("g2", images("g2", 3)).unwrap();
        store.feedback(&prefer("g1-0", "g1-1", "a")).unwrap();
        let vote = NewFeedback {
            kind: FeedbackKind::Vote(Vote::Down),
            idempotency: None,
            ..prefer("g2-2", "", "")
        };
        store.feedback(&vote).unwrap();
        store
            .mark_trained(&[("g1".into(), "g1-0".into(), "g1-1".into())], &[])
            .unwrap();
    }
    let store = open(dir.path());
    let stats = store.stats().unwrap();
    assert_eq!((stats.groups, stats.entries), (2, 5));
    let groups = store.groups(false).unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].group_id, "g1", "oldest first, as inserted");
    assert_eq!(groups[0].group.comparisons[0].winner, "g1-0");
    assert_eq!(groups[1].images[2].votes.get("alice"), Some(&Vote::Down));
    assert_eq!(groups[1].images[2].trajectory.latents.dims(), [2, 4, 2, 2]);
    assert!(
        store
            .trained_pairs()
            .unwrap()
            .contains(&("g1-0".into(), "g1-1".into()))
    );
    let retry = store.feedback(&prefer("g1-0", "g1-1", "a")).unwrap();
    assert!(retry.duplicate, "the idempotency answer survived");
    assert_eq!(retry.feedback_id, "fb-a");
    // Sequence numbers continue: a new group is the newest.
    store.record("g3", images("g3", 1)).unwrap();
    drop(store);
    let store = open(dir.path());
    let order: Vec<String> = store
        .groups(true)
        .unwrap()
        .into_iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(order, ["g1", "g2", "g3"]);
}

/// Evicted groups leave the disk too, and the budget applies at start.
#[test]
fn evicted_groups_are_deleted_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let one = images("x", 1)[0].1.size_bytes();
    {
        let store = crate::store::embedded(dir.path(), 2 * one, &Device::Cpu, metrics()).unwrap();
        for g in 0..5 {
            store
                .record(&format!("g{g}"), images(&format!("g{g}"), 1))
                .unwrap();
        }
        assert_eq!(store.stats().unwrap().groups, 2);
    }
    let store = crate::store::embedded(dir.path(), 1 << 20, &Device::Cpu, metrics()).unwrap();
    let left: Vec<String> = store
        .groups(true)
        .unwrap()
        .into_iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(left, ["g3", "g4"]);
}

/// A file that is not a database is moved aside and the store starts empty.
#[test]
fn an_unreadable_database_file_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("learning.redb"), b"not a database at all").unwrap();
    let metrics = metrics();
    let store = crate::store::embedded(dir.path(), 1 << 20, &Device::Cpu, metrics.clone()).unwrap();
    assert_eq!(store.stats().unwrap().groups, 0);
    assert_eq!(metrics.quarantined.get(), 1);
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains("damaged"));
    assert!(aside, "the damaged file is kept for an operator");
    store.record("g", images("g", 1)).unwrap();
}

/// Refused feedback changes nothing, on disk or in memory.
#[test]
fn refused_feedback_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.record("g1", images("g1", 2)).unwrap();
        store.record("g2", images("g2", 2)).unwrap();
        assert!(store.feedback(&prefer("g1-0", "g2-0", "x")).is_err());
        assert!(store.feedback(&prefer("nope", "g1-0", "y")).is_err());
    }
    assert!(open(dir.path()).groups(false).unwrap().is_empty());
}
