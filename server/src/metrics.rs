//! Prometheus metrics and the `/metrics` endpoint. Names and labels are a contract with
//! dashboards: change them only with the dashboards.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Buckets for whole requests: from a fraction of a second (tiny model, GPU) to minutes (SD on CPU).
const REQUEST_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets for one denoising step.
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric the server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry they live in (plugins register theirs here too).
    pub registry: Registry,
    /// `imagegen_requests_total{rpc,code}`.
    pub requests: IntCounterVec,
    /// `imagegen_request_duration_seconds{rpc}`.
    pub request_duration: HistogramVec,
    /// `imagegen_queue_depth`: requests admitted and not finished.
    pub queue_depth: IntGauge,
    /// `imagegen_batch_size`: images per model batch.
    pub batch_size: Histogram,
    /// `imagegen_images_generated_total`.
    pub images_generated: IntCounter,
    /// `imagegen_denoise_step_duration_seconds`.
    pub denoise_step: Histogram,
    /// `imagegen_trajectory_buffer_bytes`.
    pub buffer_bytes: IntGauge,
    /// `imagegen_trajectory_buffer_entries`.
    pub buffer_entries: IntGauge,
    /// `imagegen_trajectory_evictions_total`.
    pub evictions: IntCounter,
    /// `imagegen_trajectories_untrainable_total`: chains not stored because they are not finite.
    pub untrainable: IntCounter,
    /// `imagegen_thread_panics_total{thread}`: panics of supervised threads (each one fatal).
    pub thread_panics: IntCounterVec,
    /// `imagegen_adapters_quarantined_total`: damaged adapter files moved aside at start.
    pub adapters_quarantined: IntCounter,
    /// `imagegen_feedback_total{kind}`.
    pub feedback: IntCounterVec,
    /// `imagegen_requests_cancelled_total`: work dropped because its client left.
    pub cancelled: IntCounter,
    /// `imagegen_feedback_by_adapter_total{generation,kind}`.
    pub feedback_by_adapter: IntCounterVec,
    /// `imagegen_adapter_swaps_total`.
    pub adapter_swaps: IntCounter,
    /// `imagegen_adapter_swap_duration_seconds`.
    pub adapter_swap_duration: Histogram,
    /// `imagegen_adapter_live_info{generation}` = 1 for the live generation (`base` for none).
    pub adapter_live: prometheus::IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "imagegen_requests_total",
                "RPCs served, by method and gRPC status code.",
            ),
            &["rpc", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "imagegen_request_duration_seconds",
                "Time from receiving an RPC to its answer.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["rpc"],
        )?;
        let queue_depth = IntGauge::new(
            "imagegen_queue_depth",
            "Generation requests admitted and not yet finished.",
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("imagegen_batch_size", "Images per model batch.")
                .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )?;
        let images_generated =
            IntCounter::new("imagegen_images_generated_total", "Images generated.")?;
        let denoise_step = Histogram::with_opts(
            HistogramOpts::new(
                "imagegen_denoise_step_duration_seconds",
                "Duration of one denoising step of a batch.",
            )
            .buckets(STEP_BUCKETS.to_vec()),
        )?;
        let buffer_bytes = IntGauge::new(
            "imagegen_trajectory_buffer_bytes",
            "Bytes held by the trajectory buffer.",
        )?;
        let buffer_entries = IntGauge::new(
            "imagegen_trajectory_buffer_entries",
            "Trajectories held by the trajectory buffer.",
        )?;
        let evictions = IntCounter::new(
            "imagegen_trajectory_evictions_total",
            "Trajectories evicted from the buffer to stay within its budget.",
        )?;
        let untrainable = IntCounter::new(
            "imagegen_trajectories_untrainable_total",
            "Generated chains not stored for training because a latent or log-prob is not finite.",
        )?;
        let adapters_quarantined = IntCounter::new(
            "imagegen_adapters_quarantined_total",
            "Damaged adapter generations or live-alias files moved aside at start.",
        )?;
        let thread_panics = IntCounterVec::new(
            Opts::new(
                "imagegen_thread_panics_total",
                "Panics of the model or plugin thread; each one stops the server.",
            ),
            &["thread"],
        )?;
        let feedback = IntCounterVec::new(
            Opts::new("imagegen_feedback_total", "Feedback accepted, by kind."),
            &["kind"],
        )?;
        let cancelled = IntCounter::new(
            "imagegen_requests_cancelled_total",
            "Generation requests dropped because the client left or the deadline passed.",
        )?;
        let feedback_by_adapter = IntCounterVec::new(
            Opts::new(
                "imagegen_feedback_by_adapter_total",
                "Feedback accepted, by the adapter generation that drew the image and kind.",
            ),
            &["generation", "kind"],
        )?;
        let adapter_swaps = IntCounter::new(
            "imagegen_adapter_swaps_total",
            "Changes of the live adapter.",
        )?;
        let adapter_swap_duration = Histogram::with_opts(
            HistogramOpts::new(
                "imagegen_adapter_swap_duration_seconds",
                "Time to swap the live adapter (persisting the alias included).",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
        )?;
        let adapter_live = prometheus::IntGaugeVec::new(
            Opts::new(
                "imagegen_adapter_live_info",
                "The live adapter generation (value 1; `base` when none).",
            ),
            &["generation"],
        )?;
        adapter_live.with_label_values(&["base"]).set(1);
        registry.register(Box::new(feedback_by_adapter.clone()))?;
        registry.register(Box::new(adapter_swaps.clone()))?;
        registry.register(Box::new(adapter_swap_duration.clone()))?;
        registry.register(Box::new(adapter_live.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(images_generated.clone()))?;
        registry.register(Box::new(denoise_step.clone()))?;
        registry.register(Box::new(buffer_bytes.clone()))?;
        registry.register(Box::new(buffer_entries.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(untrainable.clone()))?;
        registry.register(Box::new(thread_panics.clone()))?;
        registry.register(Box::new(adapters_quarantined.clone()))?;
        registry.register(Box::new(feedback.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        Ok(Self {
            registry,
            requests,
            request_duration,
            queue_depth,
            batch_size,
            images_generated,
            denoise_step,
            buffer_bytes,
            buffer_entries,
            evictions,
            untrainable,
            thread_panics,
            adapters_quarantined,
            feedback,
            cancelled,
            feedback_by_adapter,
            adapter_swaps,
            adapter_swap_duration,
            adapter_live,
        })
    }

    /// Records a change of the live adapter.
    pub fn observe_swap(&self, live: Option<&str>, took: std::time::Duration) {
        self.adapter_swaps.inc();
        self.adapter_swap_duration.observe(took.as_secs_f64());
        self.adapter_live.reset();
        self.adapter_live
            .with_label_values(&[live.unwrap_or("base")])
            .set(1);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}
