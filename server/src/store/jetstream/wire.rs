//! What travels through NATS: the image index, idempotency answers, and the stream's feedback
//! and ledger messages (JSON, so an operator can read them with the `nats` CLI).

use serde::{Deserialize, Serialize};

use crate::store::buffer::{FeedbackKind, NewFeedback, Rater, Vote};

/// What the image index says about an image (all a serving replica needs to accept feedback).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ImageEntry {
    pub group_id: String,
    pub adapter_generation: String,
    /// Every image of the group.
    pub images: Vec<String>,
}

/// The first answer to an idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct KeyAnswer {
    pub fingerprint: String,
    pub feedback_id: String,
}

/// One feedback as it travels on the stream (the rater already resolved).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct FeedbackMessage {
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<Vote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_over: Option<String>,
    #[serde(default)]
    pub best_of: bool,
    pub rater: String,
    pub feedback_id: String,
}

impl FeedbackMessage {
    pub(super) fn new(feedback: &NewFeedback, group_id: &str) -> Self {
        let (vote, preferred_over, best_of) = match &feedback.kind {
            FeedbackKind::Vote(v) => (Some(*v), None, false),
            FeedbackKind::PreferredOver(loser) => (None, Some(loser.clone()), false),
            FeedbackKind::BestOf => (None, None, true),
        };
        let rater = match &feedback.rater {
            Rater::Named(id) => id.clone(),
            Rater::TokenHolder => format!("token:{group_id}"),
        };
        Self {
            image_id: feedback.image_id.clone(),
            vote,
            preferred_over,
            best_of,
            rater,
            feedback_id: feedback.feedback_id.clone(),
        }
    }

    /// The feedback to apply to the index (deduplicated already by JetStream and the key bucket).
    pub(super) fn to_feedback(&self) -> Option<NewFeedback> {
        let kind = match (&self.vote, &self.preferred_over, self.best_of) {
            (Some(v), None, false) => FeedbackKind::Vote(*v),
            (None, Some(loser), false) => FeedbackKind::PreferredOver(loser.clone()),
            (None, None, true) => FeedbackKind::BestOf,
            _ => return None,
        };
        Some(NewFeedback {
            image_id: self.image_id.clone(),
            kind,
            rater: Rater::Named(self.rater.clone()),
            idempotency: None,
            idempotency_key: String::new(),
            feedback_id: self.feedback_id.clone(),
        })
    }
}

/// A ledger entry: pairs of one group trained, and the feedback version consumed in full.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct LedgerMessage {
    pub pairs: Vec<(String, String)>,
    #[serde(default)]
    pub settled: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holders_best_of_travels_as_the_groups_rater_and_comes_back_whole() {
        let feedback = NewFeedback {
            image_id: "i1".into(),
            kind: FeedbackKind::BestOf,
            rater: Rater::TokenHolder,
            idempotency: Some(("scope".into(), "ab".into())),
            idempotency_key: "k".into(),
            feedback_id: "f1".into(),
        };
        let message = FeedbackMessage::new(&feedback, "g7");
        let json = serde_json::to_string(&message).unwrap();
        assert_eq!(
            json,
            r#"{"image_id":"i1","best_of":true,"rater":"token:g7","feedback_id":"f1"}"#
        );
        let back: FeedbackMessage = serde_json::from_str(&json).unwrap();
        let applied = back.to_feedback().unwrap();
        assert_eq!(applied.kind, FeedbackKind::BestOf);
        assert_eq!(applied.rater, Rater::Named("token:g7".into()));
        // Deduplicated before it reached the stream: the index applies it without a key.
        assert_eq!(applied.idempotency, None);
    }

    #[test]
    fn votes_and_preferences_round_trip_and_ambiguous_messages_are_refused() {
        for kind in [
            FeedbackKind::Vote(Vote::Down),
            FeedbackKind::PreferredOver("i2".into()),
        ] {
            let feedback = NewFeedback {
                image_id: "i1".into(),
                kind: kind.clone(),
                rater: Rater::Named("alice".into()),
                idempotency: None,
                idempotency_key: String::new(),
                feedback_id: "f".into(),
            };
            let json = serde_json::to_vec(&FeedbackMessage::new(&feedback, "g")).unwrap();
            let back: FeedbackMessage = serde_json::from_slice(&json).unwrap();
            assert_eq!(back.to_feedback().unwrap().kind, kind);
        }
        let both: FeedbackMessage = serde_json::from_str(
            r#"{"image_id":"i","vote":"Up","best_of":true,"rater":"r","feedback_id":"f"}"#,
        )
        .unwrap();
        assert!(both.to_feedback().is_none(), "a vote and a best-of at once");
    }
}
