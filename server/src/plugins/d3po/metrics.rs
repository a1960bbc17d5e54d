//! The D3PO plugin's Prometheus metrics.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};

/// The plugin's metrics.
#[derive(Debug, Clone)]
pub(super) struct D3poMetrics {
    pub(super) rounds: IntCounterVec,
    pub(super) round_duration: Histogram,
    pub(super) loss: Gauge,
    pub(super) pairs_used: IntCounter,
    pub(super) heldout_accuracy: Gauge,
    pub(super) drift: Gauge,
    pub(super) skipped_steps: IntCounter,
    pub(super) skipped_updates: IntCounter,
}

impl D3poMetrics {
    pub(super) fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            rounds: IntCounterVec::new(
                Opts::new(
                    "imagegen_d3po_rounds_total",
                    "D3PO training rounds, by result.",
                ),
                &["result"],
            )?,
            round_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "imagegen_d3po_round_duration_seconds",
                    "Wall time of a D3PO round.",
                )
                .buckets(vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )?,
            loss: Gauge::new("imagegen_d3po_loss", "Mean D3PO loss of the last round.")?,
            pairs_used: IntCounter::new(
                "imagegen_d3po_pairs_used_total",
                "Preference pairs trained on.",
            )?,
            heldout_accuracy: Gauge::new(
                "imagegen_d3po_heldout_accuracy",
                "Held-out ranking accuracy of the last trained adapter.",
            )?,
            drift: Gauge::new(
                "imagegen_d3po_drift",
                "Mean KL divergence per step and latent element (nats) of the last trained adapter from the base model on its round's probe chains.",
            )?,
            skipped_steps: IntCounter::new(
                "imagegen_d3po_skipped_steps_total",
                "Time indices left out of training because their loss or log-ratios were not finite.",
            )?,
            skipped_updates: IntCounter::new(
                "imagegen_d3po_skipped_updates_total",
                "Pair updates not applied because no time index or the gradient was finite.",
            )?,
        };
        registry.register(Box::new(m.skipped_steps.clone()))?;
        registry.register(Box::new(m.skipped_updates.clone()))?;
        registry.register(Box::new(m.rounds.clone()))?;
        registry.register(Box::new(m.round_duration.clone()))?;
        registry.register(Box::new(m.loss.clone()))?;
        registry.register(Box::new(m.pairs_used.clone()))?;
        registry.register(Box::new(m.heldout_accuracy.clone()))?;
        registry.register(Box::new(m.drift.clone()))?;
        Ok(m)
    }
}
