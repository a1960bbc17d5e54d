//! The learning store's metrics (names are a contract with dashboards).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Commit latencies: an fsync is ~0.1-10 ms on local disks, more on network volumes.
const COMMIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Everything the store reports.
#[derive(Debug, Clone)]
pub(crate) struct StoreMetrics {
    /// `imagegen_trajectory_buffer_bytes`: bytes held (chains and feedback).
    pub bytes: IntGauge,
    /// `imagegen_trajectory_buffer_entries`: images held.
    pub entries: IntGauge,
    /// `imagegen_trajectory_evictions_total`: images evicted to stay within the budget.
    pub evictions: IntCounter,
    /// `imagegen_store_commit_seconds{what}`: time to make a change durable.
    pub commit_seconds: HistogramVec,
    /// `imagegen_store_commit_failures_total{what}`: changes refused because they could not be
    /// made durable.
    pub commit_failures: IntCounterVec,
    /// `imagegen_store_evicted_untrained_groups_total`: groups evicted before the trainer saw
    /// their feedback.
    pub evicted_untrained: IntCounter,
    /// `imagegen_store_quarantined_total`: damaged records or database files moved aside.
    pub quarantined: IntCounter,
    /// `imagegen_trainer_lag_groups`: labelled groups whose feedback no round has consumed.
    pub trainer_lag: IntGauge,
    /// `imagegen_store_backend_info{backend}`: 1 for the backend in use.
    pub backend: IntGaugeVec,
}

impl StoreMetrics {
    /// Registers the store's metrics beside the buffer gauges the server already exports.
    pub(crate) fn register(metrics: &crate::metrics::Metrics) -> prometheus::Result<Self> {
        let registry = &metrics.registry;
        let commit_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imagegen_store_commit_seconds",
                "Time to make one change of the learning store durable, by what changed.",
            )
            .buckets(COMMIT_BUCKETS.to_vec()),
            &["what"],
        )?;
        let commit_failures = IntCounterVec::new(
            Opts::new(
                "imagegen_store_commit_failures_total",
                "Changes refused because the learning store could not make them durable.",
            ),
            &["what"],
        )?;
        let evicted_untrained = IntCounter::new(
            "imagegen_store_evicted_untrained_groups_total",
            "Groups evicted before any training round consumed their feedback.",
        )?;
        let quarantined = IntCounter::new(
            "imagegen_store_quarantined_total",
            "Damaged learning-store records or database files moved aside.",
        )?;
        let trainer_lag = IntGauge::new(
            "imagegen_trainer_lag_groups",
            "Labelled groups whose feedback no training round has consumed yet.",
        )?;
        let backend = IntGaugeVec::new(
            Opts::new(
                "imagegen_store_backend_info",
                "The learning store backend in use (value 1).",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(commit_failures.clone()))?;
        registry.register(Box::new(evicted_untrained.clone()))?;
        registry.register(Box::new(quarantined.clone()))?;
        registry.register(Box::new(trainer_lag.clone()))?;
        registry.register(Box::new(backend.clone()))?;
        Ok(Self {
            bytes: metrics.buffer_bytes.clone(),
            entries: metrics.buffer_entries.clone(),
            evictions: metrics.evictions.clone(),
            commit_seconds,
            commit_failures,
            evicted_untrained,
            quarantined,
            trainer_lag,
            backend,
        })
    }
}
