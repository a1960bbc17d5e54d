//! The plugin API: what the host hands a learning plugin, and how it runs.
//!
//! A plugin runs on its own thread beside serving. It gets read access to the labelled
//! trajectory groups of the ring buffer, the base model (shared, immutable), the adapter
//! registry (to publish and swap generations) and the metrics registry, plus the serving
//! pressure, so it can yield to requests. It never blocks a request: the model's weights are
//! read-only and adapters are applied unmerged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::adapters::AdapterRegistry;
use crate::buffer::{Group, StoredImage, TrajectoryBuffer};
use crate::model::loader::DiffusionModel;

/// A learning plugin.
pub trait Plugin: Send + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Runs until `host.stopping()`; called on the plugin's own thread.
    fn run(self: Box<Self>, host: PluginHost);
}

/// What the host gives a plugin.
#[derive(Clone)]
pub struct PluginHost {
    buffer: Arc<Mutex<TrajectoryBuffer>>,
    /// The served model (shared with the engine; read-only).
    pub model: Arc<DiffusionModel>,
    /// Adapter generations and the live alias.
    pub adapters: Arc<AdapterRegistry>,
    /// Where plugin metrics are registered.
    pub metrics: prometheus::Registry,
    queue_depth: prometheus::IntGauge,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("model", &self.model.id)
            .finish()
    }
}

impl PluginHost {
    /// A host over the server's parts.
    pub fn new(
        buffer: Arc<Mutex<TrajectoryBuffer>>,
        model: Arc<DiffusionModel>,
        adapters: Arc<AdapterRegistry>,
        metrics: prometheus::Registry,
        queue_depth: prometheus::IntGauge,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            buffer,
            model,
            adapters,
            metrics,
            queue_depth,
            stop,
        }
    }

    /// The buffer's groups that carry feedback (a consistent copy; the lock is held briefly).
    pub fn labelled_groups(&self) -> Vec<(String, Group, Vec<StoredImage>)> {
        match self.buffer.lock() {
            Ok(buffer) => buffer.snapshot(false),
            Err(_) => Vec::new(),
        }
    }

    /// Requests admitted and not finished: the plugin should wait while this is non-zero.
    pub fn serving_load(&self) -> i64 {
        self.queue_depth.get()
    }

    /// Blocks while requests are in flight (serving has priority), at most `max`.
    pub fn yield_to_serving(&self, max: Duration) {
        let start = std::time::Instant::now();
        while self.serving_load() > 0 && !self.stopping() && start.elapsed() < max {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The flag set when the server shuts down.
    pub fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// Whether the server is shutting down.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}
