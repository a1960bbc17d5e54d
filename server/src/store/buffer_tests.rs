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

/// 2 x 4 x 16 x 16 f32 latents, one usize timestep, one f32 log-prob, two 2-float embeddings.
const CHAIN_BYTES: usize = 2 * 4 * 16 * 16 * 4 + 8 + 4 + 2 * 2 * 4;

fn group(buffer: &mut TrajectoryBuffer, g: usize, images: usize) -> Vec<Evicted> {
    let images = (0..images)
        .map(|i| (format!("g{g}i{i}"), chain()))
        .collect();
    buffer
        .insert_group(&format!("g{g}"), SystemTime::now(), images)
        .1
}

fn feedback(image: &str, kind: FeedbackKind, rater: Rater) -> NewFeedback {
    NewFeedback {
        image_id: image.into(),
        kind,
        rater,
        idempotency: None,
        idempotency_key: String::new(),
        feedback_id: format!("fb-{image}"),
    }
}

fn vote_up(image: &str, rater: &str) -> NewFeedback {
    feedback(
        image,
        FeedbackKind::Vote(Vote::Up),
        Rater::Named(rater.into()),
    )
}

#[test]
fn a_chain_costs_its_latents_timesteps_log_probs_and_embeddings() {
    assert_eq!(chain().size_bytes(), CHAIN_BYTES);
    assert_eq!(CHAIN_BYTES, 8220);
}

/// Whole groups go, oldest first: half a group is no training data.
#[test]
fn eviction_removes_whole_groups_oldest_first() {
    let mut buffer = TrajectoryBuffer::new(5 * CHAIN_BYTES);
    assert!(group(&mut buffer, 0, 2).is_empty());
    assert!(group(&mut buffer, 1, 2).is_empty());
    let evicted = group(&mut buffer, 2, 2);
    assert_eq!(evicted.len(), 1);
    assert_eq!((evicted[0].seq, evicted[0].group_id.as_str()), (1, "g0"));
    assert_eq!(evicted[0].images, 2);
    assert_eq!(buffer.stats().entries, 4);
    assert_eq!(buffer.stats().bytes, 4 * CHAIN_BYTES);
    assert!(buffer.image("g0i1").is_err());
    assert_eq!(buffer.image("g1i1").unwrap().0, "g1");
}

/// Untrained feedback is spared while older consumed or unlabelled groups can go; once the
/// trainer has consumed it, the group is ordinary again.
#[test]
fn groups_with_untrained_feedback_outlive_younger_unlabelled_ones() {
    let mut buffer = TrajectoryBuffer::new(4 * CHAIN_BYTES + 1000);
    group(&mut buffer, 0, 2);
    buffer.apply(&vote_up("g0i0", "alice")).unwrap();
    group(&mut buffer, 1, 2);
    let evicted = group(&mut buffer, 2, 2);
    assert_eq!(evicted[0].group_id, "g1", "the unlabelled group went first");
    assert!(!evicted[0].untrained);
    let version = buffer.snapshot(false)[0].version;
    assert_eq!(version, 1);
    buffer.mark_trained(&[], &[("g0".into(), version)]);
    let evicted = group(&mut buffer, 3, 2);
    assert_eq!(evicted[0].group_id, "g0", "consumed: the oldest goes");
}

/// Untrained groups are spared up to half the budget; beyond it the oldest go (and say so),
/// so a fresh generation always finds room.
#[test]
fn untrained_groups_beyond_half_the_budget_are_evicted() {
    let mut buffer = TrajectoryBuffer::new(2 * CHAIN_BYTES + 1000);
    group(&mut buffer, 0, 2);
    buffer.apply(&vote_up("g0i0", "alice")).unwrap();
    let evicted = group(&mut buffer, 1, 1);
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].group_id, "g0");
    assert!(evicted[0].untrained);
}

/// Feedback memory counts against the budget: a flood of votes (made-up raters) evicts groups
/// instead of growing without bound; replacing a vote costs nothing new.
#[test]
fn feedback_counts_against_the_byte_budget() {
    let mut buffer = TrajectoryBuffer::new(4 * CHAIN_BYTES + 4000);
    for g in 0..4 {
        group(&mut buffer, g, 1);
    }
    assert_eq!(buffer.stats().bytes, 4 * CHAIN_BYTES);
    buffer.apply(&vote_up("g3i0", "alice")).unwrap();
    let with_vote = buffer.stats().bytes;
    assert!(with_vote > 4 * CHAIN_BYTES);
    buffer.apply(&vote_up("g3i0", "alice")).unwrap();
    assert_eq!(
        buffer.stats().bytes,
        with_vote,
        "a repeated vote costs nothing"
    );
    for r in 0..300 {
        buffer
            .apply(&vote_up("g3i0", &format!("rater-{r}")))
            .unwrap();
        buffer.evict_to_budget();
    }
    let stats = buffer.stats();
    assert!(stats.bytes <= 4 * CHAIN_BYTES + 4000, "{stats:?}");
    assert!(stats.entries < 4, "{stats:?}");
    assert!(buffer.image("g0i0").is_err(), "the oldest group went first");
}

/// A token holder is one rater per group; a repeat replaces the earlier statement.
#[test]
fn a_token_holder_counts_as_one_rater_of_the_group() {
    let mut buffer = TrajectoryBuffer::new(1 << 20);
    group(&mut buffer, 0, 3);
    let token = |image: &str, loser: &str| {
        feedback(
            image,
            FeedbackKind::PreferredOver(loser.into()),
            Rater::TokenHolder,
        )
    };
    buffer.apply(&token("g0i0", "g0i1")).unwrap();
    buffer.apply(&token("g0i1", "g0i0")).unwrap();
    buffer.apply(&token("g0i2", "g0i0")).unwrap();
    let group = &buffer.snapshot(false)[0].group;
    let said: Vec<_> = group
        .comparisons
        .iter()
        .map(|c| (c.winner.as_str(), c.loser.as_str(), c.rater.as_str()))
        .collect();
    assert_eq!(
        said,
        [("g0i1", "g0i0", "token:g0"), ("g0i2", "g0i0", "token:g0")]
    );
}

#[test]
fn comparisons_must_stay_within_one_group() {
    let mut buffer = TrajectoryBuffer::new(1 << 20);
    group(&mut buffer, 0, 2);
    group(&mut buffer, 1, 2);
    let cross = feedback(
        "g0i0",
        FeedbackKind::PreferredOver("g1i0".into()),
        Rater::TokenHolder,
    );
    assert!(matches!(
        buffer.apply(&cross),
        Err(BufferError::DifferentGroups(..))
    ));
    let same = feedback(
        "g0i0",
        FeedbackKind::PreferredOver("g0i0".into()),
        Rater::TokenHolder,
    );
    assert_eq!(buffer.apply(&same), Err(BufferError::SameImage));
    assert_eq!(buffer.snapshot(false).len(), 0, "nothing was recorded");
}

/// A retry with the same key and body answers the first id; another body is refused.
#[test]
fn idempotency_keys_answer_retries_and_refuse_other_bodies() {
    let mut buffer = TrajectoryBuffer::new(1 << 20);
    group(&mut buffer, 0, 2);
    let keyed = |fingerprint: &str, id: &str| NewFeedback {
        idempotency: Some(("caller\0g0i0\0k1".into(), fingerprint.into())),
        idempotency_key: "k1".into(),
        feedback_id: id.into(),
        ..vote_up("g0i0", "alice")
    };
    let (first, before) = buffer.apply(&keyed("aa", "fb-1")).unwrap();
    assert!(!first.duplicate && before.is_some());
    let (retry, before) = buffer.apply(&keyed("aa", "fb-2")).unwrap();
    assert!(retry.duplicate && before.is_none());
    assert_eq!(retry.feedback_id, "fb-1");
    assert_eq!(
        buffer.apply(&keyed("bb", "fb-3")),
        Err(BufferError::KeyReused("k1".into()))
    );
    assert_eq!(buffer.feedback("g0").unwrap().1.version, 1);
}

/// The ledger keeps trained pairs per group; restoring a group brings them back.
#[test]
fn the_ledger_survives_a_restore_of_the_group() {
    let mut buffer = TrajectoryBuffer::new(1 << 20);
    group(&mut buffer, 0, 2);
    buffer.apply(&vote_up("g0i0", "alice")).unwrap();
    let changed = buffer.mark_trained(&[("g0".into(), "g0i0".into(), "g0i1".into())], &[]);
    assert_eq!(changed, ["g0"]);
    let again = buffer.mark_trained(
        &[("g0".into(), "g0i0".into(), "g0i1".into())],
        &[("g0".into(), 0)],
    );
    assert!(again.is_empty(), "nothing new: nothing to rewrite");
    let (seq, record) = buffer.feedback("g0").map(|(s, r)| (s, r.clone())).unwrap();
    let images: Vec<_> = (0..2).map(|i| (format!("g0i{i}"), chain())).collect();
    let mut restored = TrajectoryBuffer::new(1 << 20);
    restored.restore_group(seq, "g0", SystemTime::now(), images, record);
    let pairs = restored.trained_pairs();
    assert!(pairs.contains(&("g0i0".to_string(), "g0i1".to_string())));
    assert_eq!(restored.untrained_groups(), 1, "version 1 not yet consumed");
    assert_eq!(restored.stats(), buffer.stats());
    let (next, _) = restored.insert_group("g1", SystemTime::now(), vec![]);
    assert_eq!(next, seq + 1, "sequence numbers continue after a restore");
}
