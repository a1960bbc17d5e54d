//! The generation engine: the model lives on its own OS thread, fed by a bounded queue.
//! Admission is a semaphore (no permit: RESOURCE_EXHAUSTED at once); compatible requests
//! (same adapter, size and steps) are merged into one batch up to `max_batch` images within
//! `batch_wait`; work whose client has gone is dropped before it costs compute, and a batch
//! whose clients have all gone stops at the next step.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::adapters::AdapterGeneration;
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::pipeline::DiffusionModel;
use crate::pipeline::{AdapterChoice, BatchTimings, Generation, SampleRequest};
use crate::sampler::Conditioning;
use crate::supervisor::Supervisor;

/// Errors the engine answers with; the gRPC layer maps them to statuses.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No admission permit free.
    #[error("the server is at capacity ({0} requests in flight); retry later")]
    Overloaded(usize),
    /// The engine is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The model rejected the request.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model failed while running a batch.
    #[error("generation failed: {0}")]
    Failed(String),
}

/// What a request asks the model for (validated by the API layer).
#[derive(Debug, Clone)]
pub(crate) struct JobSpec {
    /// Prompt text.
    pub prompt: String,
    /// Negative prompt text.
    pub negative_prompt: String,
    /// Sampling parameters.
    pub sample: SampleRequest,
    /// The adapter generation, pinned at admission (`None`: the base model).
    pub adapter: Option<Arc<AdapterGeneration>>,
}

/// A finished job.
#[derive(Debug)]
pub(crate) struct JobOutput {
    /// Images and trajectories.
    pub generation: Generation,
    /// Time between admission and the batch starting.
    pub queued: Duration,
    /// The batch's denoise and decode time.
    pub timings: BatchTimings,
    /// Images in the batch this job ran in.
    pub batch_images: usize,
}

/// A request travelling to the model thread; its admission permit travels with it.
#[derive(Debug)]
pub(crate) struct Job {
    spec: JobSpec,
    progress: Option<mpsc::Sender<(u32, u32)>>,
    reply: oneshot::Sender<Result<JobOutput, EngineError>>,
    admitted_at: Instant,
    _admission: Admission,
}

impl Job {
    /// Whether the client is still waiting for this job.
    fn wanted(&self) -> bool {
        !self.reply.is_closed() && self.progress.as_ref().is_none_or(|p| !p.is_closed())
    }

    /// Requests that may share a batch.
    fn batch_key(&self) -> (usize, usize, usize, Option<String>) {
        let s = &self.spec.sample;
        (
            s.steps,
            s.width,
            s.height,
            self.spec.adapter.as_ref().map(|a| a.meta.id.clone()),
        )
    }
}

/// An admission permit; keeps `imagegen_queue_depth` in step with the requests it admits.
#[derive(Debug)]
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    depth: prometheus::IntGauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.depth.dec();
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineConfig {
    /// Most images per model batch.
    pub max_batch: usize,
    /// How long to wait for more compatible requests.
    pub batch_wait: Duration,
    /// Requests admitted at once.
    pub max_queue: usize,
    /// Prompt embeddings cached.
    pub embedding_cache: usize,
}

/// Handle to the model thread.
#[derive(Debug)]
pub(crate) struct Engine {
    queue: Option<SyncSender<Job>>,
    admission: Arc<Semaphore>,
    max_queue: usize,
    metrics: Metrics,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Moves `model` onto its own thread and starts serving jobs.
    pub(crate) fn start(
        model: Arc<DiffusionModel>,
        config: EngineConfig,
        metrics: Metrics,
        supervisor: &Supervisor,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.max_queue);
        let worker_metrics = metrics.clone();
        let worker = supervisor.spawn("model", move || {
            Worker::new(model, config, worker_metrics).run(rx)
        })?;
        Ok(Self {
            queue: Some(tx),
            admission: Arc::new(Semaphore::new(config.max_queue)),
            max_queue: config.max_queue,
            metrics,
            worker: Some(worker),
        })
    }

    /// Takes an admission permit, or fails at once when the server is full.
    pub(crate) fn admit(&self) -> Result<Admission, EngineError> {
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| EngineError::Overloaded(self.max_queue))?;
        self.metrics.queue_depth.inc();
        Ok(Admission {
            _permit: permit,
            depth: self.metrics.queue_depth.clone(),
        })
    }

    /// Queues an admitted job; the answer arrives on the returned receiver, progress (step,
    /// total) on `progress` when given.
    pub(crate) fn submit(
        &self,
        spec: JobSpec,
        admission: Admission,
        progress: Option<mpsc::Sender<(u32, u32)>>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, EngineError>>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            spec,
            progress,
            reply,
            admitted_at: Instant::now(),
            _admission: admission,
        };
        let queue = self.queue.as_ref().ok_or(EngineError::ShuttingDown)?;
        match queue.try_send(job) {
            Ok(()) => Ok(rx),
            // The channel holds max_queue jobs and each needs a permit, so it is never full.
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded(self.max_queue)),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShuttingDown),
        }
    }

    /// Stops taking jobs, lets the model thread finish what is queued, and waits for it.
    pub(crate) fn shutdown(&mut self) {
        self.queue = None;
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the model thread panicked");
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The model thread's state: the model and the prompt-embedding cache, owned by it alone.
struct Worker {
    model: Arc<DiffusionModel>,
    config: EngineConfig,
    metrics: Metrics,
    embeddings: LruCache<String, Arc<candle_core::Tensor>>,
    pending: VecDeque<Job>,
}

impl Worker {
    fn new(model: Arc<DiffusionModel>, config: EngineConfig, metrics: Metrics) -> Self {
        let capacity =
            NonZeroUsize::new(config.embedding_cache.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            model,
            config,
            metrics,
            embeddings: LruCache::new(capacity),
            pending: VecDeque::new(),
        }
    }

    fn run(mut self, queue: Receiver<Job>) {
        loop {
            if self.pending.is_empty() {
                match queue.recv() {
                    Ok(job) => self.pending.push_back(job),
                    Err(_) => return, // engine shut down and the queue is drained
                }
            }
            self.gather(&queue);
            let batch = self.take_batch();
            if !batch.is_empty() {
                self.run_batch(batch);
            }
        }
    }

    /// Waits up to `batch_wait` for requests compatible with the oldest pending one.
    fn gather(&mut self, queue: &Receiver<Job>) {
        let Some(key) = self.pending.front().map(Job::batch_key) else {
            return;
        };
        let deadline = Instant::now() + self.config.batch_wait;
        loop {
            let images: usize = self
                .pending
                .iter()
                .filter(|j| j.batch_key() == key)
                .map(|j| j.spec.sample.num_images)
                .sum();
            if images >= self.config.max_batch {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            match queue.recv_timeout(deadline - now) {
                Ok(job) => self.pending.push_back(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The oldest pending job plus compatible ones while the batch has room; jobs whose client
    /// has gone are dropped here, before they cost compute.
    fn take_batch(&mut self) -> Vec<Job> {
        let before = self.pending.len();
        self.pending.retain(Job::wanted);
        let dropped = before - self.pending.len();
        if dropped > 0 {
            self.metrics.cancelled.inc_by(dropped as u64);
        }
        let Some(key) = self.pending.front().map(Job::batch_key) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut images = 0;
        let mut rest = VecDeque::with_capacity(self.pending.len());
        while let Some(job) = self.pending.pop_front() {
            let n = job.spec.sample.num_images;
            if job.batch_key() == key && (batch.is_empty() || images + n <= self.config.max_batch) {
                images += n;
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        self.pending = rest;
        batch
    }

    fn embedding(&mut self, text: &str) -> Result<Arc<candle_core::Tensor>, ModelError> {
        if let Some(e) = self.embeddings.get(text) {
            return Ok(e.clone());
        }
        let e = Arc::new(self.model.encode_prompt(text)?);
        self.embeddings.put(text.to_string(), e.clone());
        Ok(e)
    }

    fn run_batch(&mut self, batch: Vec<Job>) {
        let started = Instant::now();
        let conditioning: Result<Vec<Conditioning>, ModelError> = batch
            .iter()
            .map(|job| {
                Ok(Conditioning {
                    prompt: job.spec.prompt.clone(),
                    negative_prompt: job.spec.negative_prompt.clone(),
                    prompt_embeddings: self.embedding(&job.spec.prompt)?,
                    negative_embeddings: self.embedding(&job.spec.negative_prompt)?,
                })
            })
            .collect();
        let conditioning = match conditioning {
            Ok(c) => c,
            Err(e) => return fail(batch, &e),
        };
        let requests: Vec<SampleRequest> = batch.iter().map(|j| j.spec.sample.clone()).collect();
        let images: usize = requests.iter().map(|r| r.num_images).sum();
        self.metrics.batch_size.observe(images as f64);
        let mut last_step = Instant::now();
        let step_metric = self.metrics.denoise_step.clone();
        let mut progress = |step: usize, total: usize| {
            step_metric.observe(last_step.elapsed().as_secs_f64());
            last_step = Instant::now();
            let mut anyone = false;
            for job in &batch {
                if let Some(p) = &job.progress {
                    // Never block the model on a slow reader: a full channel skips an event.
                    let _ = p.try_send((step as u32, total as u32));
                }
                anyone |= job.wanted();
            }
            anyone
        };
        // Every job of a batch has the same adapter (it is part of the batch key).
        let pinned = batch.first().and_then(|j| j.spec.adapter.clone());
        let adapter = AdapterChoice {
            generation: pinned.as_ref().map(|g| g.meta.id.as_str()),
            weights: pinned.as_ref().map(|g| &g.weights),
        };
        let result = self
            .model
            .generate_timed(&requests, &conditioning, adapter, &mut progress);
        match result {
            Ok((generations, timings)) => {
                self.metrics.images_generated.inc_by(images as u64);
                for (job, generation) in batch.into_iter().zip(generations) {
                    let queued = started.saturating_duration_since(job.admitted_at);
                    // Capacity is free before the client hears back: a client that sends its
                    // next request on the answer must not find the server still full.
                    drop(job._admission);
                    let _ = job.reply.send(Ok(JobOutput {
                        generation,
                        queued,
                        timings,
                        batch_images: images,
                    }));
                }
            }
            Err(ModelError::Cancelled) => {
                self.metrics.cancelled.inc_by(batch.len() as u64);
            }
            Err(e) => fail(batch, &e),
        }
    }
}

fn fail(batch: Vec<Job>, error: &ModelError) {
    tracing::error!(%error, jobs = batch.len(), "generation failed");
    for job in batch {
        let e = match error {
            ModelError::InvalidRequest { field, reason } => {
                EngineError::Model(ModelError::InvalidRequest {
                    field,
                    reason: reason.clone(),
                })
            }
            other => EngineError::Failed(other.to_string()),
        };
        drop(job._admission);
        let _ = job.reply.send(Err(e));
    }
}
