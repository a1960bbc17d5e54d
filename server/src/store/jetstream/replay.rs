//! A trainer's replay of the learning stream into its in-memory index: from the first message
//! kept, then following new ones. An ordered consumer: JetStream redelivers from the last
//! sequence seen after a reconnect, so nothing is skipped or applied out of order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use candle_core::Device;
use tokio_stream::StreamExt;

use super::{
    CHUNK_HEADER, CHUNKS_HEADER, FEEDBACK_SUBJECT, FeedbackMessage, GROUP_SUBJECT, JetStreamStore,
    LEDGER_SUBJECT, LedgerMessage, STREAM,
};
use crate::store::codec;

/// A group whose chunks are still arriving.
#[derive(Debug)]
struct Partial {
    chunks: Vec<Option<Vec<u8>>>,
}

/// Follows the stream until the process ends (restarting the consumer after errors).
pub(super) async fn run(store: Arc<JetStreamStore>, device: Device) {
    loop {
        if let Err(e) = follow(&store, &device).await {
            tracing::warn!(error = %e, "replay of the learning stream interrupted; resuming");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(store: &JetStreamStore, device: &Device) -> Result<(), String> {
    let mut stream = store
        .nats
        .js
        .get_stream(STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let last = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    if last == 0 {
        store.caught_up.store(true, Ordering::Release);
    }
    // Resume after what this index has applied (a restarted consumer does not replay twice).
    let applied = store.replayed.load(Ordering::Acquire);
    let deliver_policy = if applied == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: applied + 1,
        }
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut partial: HashMap<String, Partial> = HashMap::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| e.to_string())?;
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let subject = message.subject.to_string();
        if let Some(group) = subject.strip_prefix(&format!("{GROUP_SUBJECT}.")) {
            let header = |name: &str| -> Option<usize> {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.as_str().parse().ok())
            };
            let (Some(index), Some(count)) = (header(CHUNK_HEADER), header(CHUNKS_HEADER)) else {
                tracing::warn!(%group, "group chunk without its headers: skipped");
                continue;
            };
            if let Some(bytes) = add_chunk(&mut partial, group, index, count, &message.payload) {
                apply_group(store, bytes, device).await;
            }
        } else if let Some(group) = subject.strip_prefix(&format!("{FEEDBACK_SUBJECT}.")) {
            apply_feedback(store, group, &message.payload);
        } else if let Some(group) = subject.strip_prefix(&format!("{LEDGER_SUBJECT}.")) {
            apply_ledger(store, group, &message.payload);
        }
        store.replayed.store(sequence, Ordering::Release);
        store.nats.metrics.replayed_sequence.set(sequence as i64);
        if sequence >= last && !store.caught_up.swap(true, Ordering::AcqRel) {
            tracing::info!(sequence, "learning stream replayed: training may start");
        }
    }
    Err("the consumer ended".into())
}

/// Adds one chunk; returns the whole group's bytes once every chunk is in. A group whose first
/// chunks the stream's limits discarded never completes (one entry per torn group, only at the
/// stream's start).
fn add_chunk(
    partial: &mut HashMap<String, Partial>,
    group: &str,
    index: usize,
    count: usize,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if count == 0 || index >= count || count > 1 << 16 {
        return None;
    }
    let entry = partial.entry(group.to_string()).or_insert_with(|| Partial {
        chunks: vec![None; count],
    });
    if entry.chunks.len() != count {
        return None;
    }
    entry.chunks[index] = Some(payload.to_vec());
    if entry.chunks.iter().any(Option::is_none) {
        return None;
    }
    let done = partial.remove(group)?;
    Some(done.chunks.into_iter().flatten().flatten().collect())
}

async fn apply_group(store: &JetStreamStore, bytes: Vec<u8>, device: &Device) {
    let device = device.clone();
    let decoded = tokio::task::spawn_blocking(move || codec::decode_group(&bytes, &device)).await;
    let group = match decoded {
        Ok(Ok(group)) => group,
        Ok(Err(e)) => {
            store.metrics.quarantined.inc();
            tracing::error!(error = %e, "undecodable group on the learning stream: skipped");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "decoding a group");
            return;
        }
    };
    let Ok(mut index) = store.lock() else {
        return;
    };
    let (_, evicted) = index.insert_group(&group.group_id, group.created_at, group.images);
    for e in &evicted {
        store.metrics.evictions.inc_by(e.images as u64);
        if e.untrained {
            store.metrics.evicted_untrained.inc();
        }
    }
    store.publish_gauges(&index);
}

fn apply_feedback(store: &JetStreamStore, group: &str, payload: &[u8]) {
    let Some(feedback) = serde_json::from_slice::<FeedbackMessage>(payload)
        .ok()
        .and_then(|m| m.to_feedback())
    else {
        tracing::warn!(group, "malformed feedback on the learning stream: skipped");
        return;
    };
    let Ok(mut index) = store.lock() else {
        return;
    };
    // An image evicted here (or generated while this trainer's budget was full) has no chain
    // to train on: its feedback is dropped, counted like an eviction.
    if let Err(e) = index.apply(&feedback) {
        tracing::debug!(group, error = %e, "feedback for a group this trainer does not hold");
        store.nats.metrics.unmatched_feedback.inc();
    }
    index.evict_to_budget();
    store.publish_gauges(&index);
}

fn apply_ledger(store: &JetStreamStore, group: &str, payload: &[u8]) {
    let Ok(entry) = serde_json::from_slice::<LedgerMessage>(payload) else {
        tracing::warn!(
            group,
            "malformed ledger entry on the learning stream: skipped"
        );
        return;
    };
    let pairs: Vec<(String, String, String)> = entry
        .pairs
        .into_iter()
        .map(|(w, l)| (group.to_string(), w, l))
        .collect();
    let settled: Vec<(String, u64)> = entry
        .settled
        .map(|v| vec![(group.to_string(), v)])
        .unwrap_or_default();
    if let Ok(mut index) = store.lock() {
        index.mark_trained(&pairs, &settled);
        store.publish_gauges(&index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble_in_any_order_and_torn_groups_never_complete() {
        let mut partial = HashMap::new();
        assert_eq!(add_chunk(&mut partial, "g", 1, 3, b"cd"), None);
        assert_eq!(add_chunk(&mut partial, "g", 0, 3, b"ab"), None);
        assert_eq!(
            add_chunk(&mut partial, "g", 2, 3, b"e"),
            Some(b"abcde".to_vec())
        );
        assert!(partial.is_empty());
        // The stream's limits dropped chunk 0 of `t`: it stays incomplete.
        assert_eq!(add_chunk(&mut partial, "t", 1, 2, b"x"), None);
        assert_eq!(add_chunk(&mut partial, "t", 1, 2, b"x"), None);
        // Inconsistent headers are refused, not indexed out of bounds.
        assert_eq!(add_chunk(&mut partial, "u", 5, 2, b"x"), None);
        assert_eq!(add_chunk(&mut partial, "t", 0, 3, b"x"), None);
        assert_eq!(
            add_chunk(&mut partial, "one", 0, 1, b"z"),
            Some(b"z".to_vec())
        );
    }
}
