//! The D3PO plugin: turns feedback into LoRA adapters while the server serves.
//!
//! Every `--d3po-interval-secs` (or on `TriggerTraining`), when at least `--d3po-min-pairs` new
//! preference pairs exist in the buffer, a round trains a LoRA adapter starting from the live one
//! (the reference policy is the round's starting point), checks it on held-out pairs, and, if it
//! passes the gate, publishes it and makes it live with a compare-and-swap. The algorithm itself
//! (pairs, loss, optimiser) is `plugin-d3po`'s; this folder connects it to the host, and is the
//! only place in the server that names that crate.

mod config;
mod metrics;
mod pairs;
mod policy;
mod round;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::D3poConfig;
use metrics::D3poMetrics;
use round::RoundResult;

use super::{Plugin, PluginHost, TrainingControl};

/// The D3PO plugin.
#[derive(Debug)]
pub(super) struct D3poPlugin {
    config: D3poConfig,
    control: Arc<TrainingControl>,
}

impl D3poPlugin {
    /// A plugin with `config`, reporting through `control`.
    pub(super) fn new(config: D3poConfig, control: Arc<TrainingControl>) -> Self {
        control.update(|s| {
            s.enabled = config.enabled;
            s.state = "idle".into();
        });
        Self { config, control }
    }
}

impl Plugin for D3poPlugin {
    fn name(&self) -> &'static str {
        "d3po"
    }

    fn run(self: Box<Self>, host: PluginHost) {
        let metrics = match D3poMetrics::register(host.metrics()) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "registering D3PO metrics; training disabled");
                return;
            }
        };
        let interval = Duration::from_secs(self.config.interval_secs.max(1));
        while !host.stopping() {
            self.control.update(|s| s.state = "waiting".into());
            let triggered = self.control.wait(interval, host.stop_flag());
            if host.stopping() {
                break;
            }
            if let Some(reason) = host.training_blocked() {
                self.control.update(|s| s.last_reason = reason.to_string());
                continue;
            }
            let started = Instant::now();
            let result = self.round(&host, triggered, &metrics);
            let seconds = started.elapsed().as_secs_f64();
            match &result {
                RoundResult::Published(id, stats) => {
                    metrics.rounds.with_label_values(&["published"]).inc();
                    metrics.round_duration.observe(seconds);
                    tracing::info!(generation = %id, pairs = stats.pairs, loss = stats.mean_loss, accuracy = stats.heldout_accuracy, "D3PO adapter published");
                }
                RoundResult::Rejected(reason) => {
                    metrics.rounds.with_label_values(&["rejected"]).inc();
                    metrics.round_duration.observe(seconds);
                    tracing::warn!(%reason, "D3PO adapter rejected");
                }
                RoundResult::Skipped(reason) => {
                    metrics.rounds.with_label_values(&["skipped"]).inc();
                    tracing::debug!(%reason, "D3PO round skipped");
                }
            }
            self.control.update(|s| {
                s.state = "idle".into();
                s.last_round_seconds = seconds;
                match result {
                    RoundResult::Published(id, _) => {
                        s.published += 1;
                        s.last_generation = id;
                        s.last_reason.clear();
                    }
                    RoundResult::Rejected(reason) => {
                        s.rejected += 1;
                        s.last_reason = reason;
                    }
                    RoundResult::Skipped(reason) => s.last_reason = reason,
                }
            });
        }
    }
}
