//! What the JetStream backend reports (names are a contract with dashboards).

use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

/// The NATS connection, recording, replay and the trainer lease.
#[derive(Debug, Clone)]
pub(crate) struct NatsMetrics {
    /// `imagegen_nats_connected`: 1 while connected to NATS.
    pub connected: IntGauge,
    /// `imagegen_nats_unrecorded_generations_total`: generations served while NATS could not
    /// record them (their images cannot be rated).
    pub unrecorded: IntCounter,
    /// `imagegen_nats_unmatched_feedback_total`: feedback the trainer replayed for groups it
    /// does not hold (evicted, or torn by the stream's limits).
    pub unmatched_feedback: IntCounter,
    /// `imagegen_nats_replayed_sequence`: the last stream sequence the trainer applied.
    pub replayed_sequence: IntGauge,
    /// `imagegen_trainer_lease_held`: 1 in the process that holds the trainer lease.
    pub lease_held: IntGauge,
}

impl NatsMetrics {
    /// Registers the backend's metrics.
    pub(crate) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let metrics = Self {
            connected: IntGauge::new("imagegen_nats_connected", "1 while connected to NATS.")?,
            unrecorded: IntCounter::new(
                "imagegen_nats_unrecorded_generations_total",
                "Generations served while NATS could not record them for training.",
            )?,
            unmatched_feedback: IntCounter::new(
                "imagegen_nats_unmatched_feedback_total",
                "Replayed feedback for groups the trainer does not hold (evicted or torn).",
            )?,
            replayed_sequence: IntGauge::new(
                "imagegen_nats_replayed_sequence",
                "The last learning-stream sequence this trainer applied.",
            )?,
            lease_held: IntGauge::new(
                "imagegen_trainer_lease_held",
                "1 in the process that holds the trainer lease.",
            )?,
        };
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.unrecorded.clone()))?;
        registry.register(Box::new(metrics.unmatched_feedback.clone()))?;
        registry.register(Box::new(metrics.replayed_sequence.clone()))?;
        registry.register(Box::new(metrics.lease_held.clone()))?;
        Ok(metrics)
    }
}

/// Mirrors the connection state into the gauge and logs each change (the client reconnects on
/// its own).
pub(super) async fn watch_connection(client: async_nats::Client, metrics: NatsMetrics) {
    let mut was = None;
    loop {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        metrics.connected.set(i64::from(connected));
        if was != Some(connected) {
            if connected {
                tracing::info!("connected to NATS");
            } else {
                tracing::error!(
                    "NATS connection lost: Generate serves without recording, feedback answers UNAVAILABLE until it is back"
                );
            }
            was = Some(connected);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
