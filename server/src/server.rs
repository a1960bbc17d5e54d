//! Wires the parts together and serves: gRPC (generation, admin, health, reflection) and the
//! Prometheus endpoint, with a graceful drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use candle_core::Device;
use imagegen_proto::v1::adapters_server::AdaptersServer;
use imagegen_proto::v1::admin_server::AdminServer;
use imagegen_proto::v1::image_generator_server::ImageGeneratorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::adapters::AdapterRegistry;
use crate::auth::ApiKeys;
use crate::config::ServeConfig;
use crate::engine::{Engine, EngineConfig};
use crate::grpc::{AdaptersService, AdminService, AppState, GeneratorService};
use crate::metrics::Metrics;
use crate::model::ModelError;
use crate::pipeline::DiffusionModel;
use crate::plugins::{PluginHost, TrainingControl, TrainingGate};
use crate::store::StoreMetrics;
use crate::store::jetstream::{
    JetStreamAdapters, JetStreamStore, Nats, NatsMetrics, NatsOptions, TrainerLease,
};
use crate::supervisor::Supervisor;
use crate::tokens::TokenSigner;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag is out of range or inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// The model could not be loaded.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// A port could not be bound or a thread started.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Internal setup (metrics registry, reflection).
    #[error("setup: {0}")]
    Setup(String),
}

/// Loads the model the configuration names: `--model DIR`, or the built-in model.
pub fn load_model(config: &ServeConfig) -> Result<DiffusionModel, StartError> {
    let dtype = config.dtype.dtype();
    let device = if config.cuda {
        Device::new_cuda(0).map_err(|e| {
            StartError::Config(format!("--cuda: {e} (build with `--features cuda`)"))
        })?
    } else {
        Device::Cpu
    };
    Ok(match &config.model {
        Some(dir) => DiffusionModel::load(dir, dtype, &device)?,
        None => crate::builtin::load(dtype, &device)?,
    })
}

/// A server running in the background.
#[derive(Debug)]
pub struct RunningServer {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), String>>,
}

impl RunningServer {
    /// Starts the drain: health turns NOT_SERVING, new work is refused, in-flight work finishes.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has drained and stopped.
    pub async fn wait(self) -> Result<(), String> {
        self.task.await.map_err(|e| format!("server task: {e}"))?
    }
}

/// Starts serving `model` as `config` says; returns once both ports are bound.
pub async fn start(
    config: &ServeConfig,
    model: DiffusionModel,
) -> Result<RunningServer, StartError> {
    config.validate().map_err(StartError::Config)?;
    let keys = api_keys(config)?;
    let data_dir = config.data_dir();
    match &data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tracing::info!(data_dir = %dir.display(), "persistent data directory");
        }
        None => tracing::warn!(
            "--ephemeral: trajectories, feedback and adapters live in memory only and die with the process"
        ),
    }
    let metrics = Metrics::new().map_err(|e| StartError::Setup(e.to_string()))?;
    let scale_out = &config.scale_out;
    let nats = match &scale_out.nats_url {
        Some(url) => {
            let nats_metrics = NatsMetrics::register(&metrics.registry)
                .map_err(|e| StartError::Setup(e.to_string()))?;
            let options = NatsOptions {
                url: url.clone(),
                creds: scale_out.nats_creds.clone(),
                stream_bytes: scale_out.nats_stream_bytes,
            };
            let nats = Nats::connect(&options, nats_metrics)
                .await
                .map_err(|e| StartError::Config(e.to_string()))?;
            tracing::info!(role = ?scale_out.role, "scale-out on NATS JetStream");
            Some(nats)
        }
        None => None,
    };
    let secret = match (&nats, &config.feedback_secret) {
        (Some(nats), None) => nats.shared_secret().await.map_err(setup)?,
        _ => feedback_secret(config, data_dir.as_deref())?,
    };
    let defaults = config.request_defaults(&model);
    let limits = config.request_limits(&model).map_err(StartError::Config)?;
    let model_id = model.id.clone();
    let store_dir = data_dir.as_ref().map(|d| d.join("adapters"));
    let registry = AdapterRegistry::open(
        model.unet.lora_targets().to_vec(),
        &model_id,
        model.unet.device(),
        store_dir.as_deref(),
    )
    .map_err(setup)?
    .with_metrics(metrics.clone());
    let adapters = match &nats {
        Some(nats) => {
            let shared = JetStreamAdapters::open(nats).await.map_err(setup)?;
            let attached = Arc::new(shared.clone());
            // Following the shared alias fetches through blocking calls: off the runtime.
            let registry = tokio::task::spawn_blocking(move || registry.with_shared(attached))
                .await
                .map_err(setup)?
                .map_err(setup)?;
            let registry = Arc::new(registry);
            tokio::spawn(crate::store::jetstream::watch_live(
                shared,
                registry.clone(),
            ));
            registry
        }
        None => Arc::new(registry),
    };
    let engine_config = EngineConfig {
        max_batch: config.max_batch,
        batch_wait: config.batch_wait(),
        max_queue: config.max_queue,
        embedding_cache: config.embedding_cache,
    };
    let model = Arc::new(model);
    let supervisor = Supervisor::new(metrics.thread_panics.clone());
    let engine = Engine::start(model.clone(), engine_config, metrics.clone(), &supervisor)?;
    let store_metrics = StoreMetrics::register(&metrics).map_err(setup)?;
    let mut gate = TrainingGate::default();
    let store: Arc<dyn crate::store::LearningStore> = match (&nats, &data_dir) {
        (Some(nats), _) => {
            let store = JetStreamStore::open(
                nats.clone(),
                config.trajectory_buffer_bytes,
                Duration::from_secs(config.feedback_token_ttl_secs),
                scale_out.role.trains(),
                model.unet.device(),
                store_metrics,
            )
            .await
            .map_err(setup)?;
            if scale_out.role.trains() {
                gate.caught_up = Some(store.caught_up());
                let lease = TrainerLease::start(
                    nats,
                    Duration::from_secs(scale_out.trainer_lease_secs),
                    lease_holder(),
                )
                .await
                .map_err(setup)?;
                gate.lease = Some(lease.flag());
            }
            store
        }
        (None, Some(dir)) => crate::store::embedded(
            dir,
            config.trajectory_buffer_bytes,
            model.unet.device(),
            store_metrics,
        )
        .map_err(setup)?,
        (None, None) => crate::store::ephemeral(config.trajectory_buffer_bytes, store_metrics),
    };
    tracing::info!(
        backend = store.backend(),
        budget_bytes = config.trajectory_buffer_bytes,
        "learning store open"
    );
    let training = Arc::new(TrainingControl::default());
    let plugin_stop = Arc::new(AtomicBool::new(false));
    let trainer = match scale_out.role.trains() {
        true => config.plugins.trainer(&training),
        false => None,
    };
    if let Some(plugin) = trainer {
        let host = PluginHost::new(
            store.clone(),
            model.clone(),
            adapters.clone(),
            metrics.registry.clone(),
            metrics.queue_depth.clone(),
            plugin_stop.clone(),
        )
        .with_gate(gate);
        let name = plugin.name();
        supervisor.spawn(&format!("plugin-{name}"), move || plugin.run(host))?;
        tracing::info!(plugin = name, "training is on");
    }
    let state = Arc::new(AppState {
        engine,
        adapters,
        store,
        training: training.clone(),
        signer: TokenSigner::new(&secret, Duration::from_secs(config.feedback_token_ttl_secs)),
        keys,
        metrics: metrics.clone(),
        model_id: model_id.clone(),
        defaults,
        limits,
        serves: scale_out.role.serves(),
        draining: AtomicBool::new(false),
    });

    let grpc_listener = TcpListener::bind(config.grpc_addr).await?;
    let metrics_listener = TcpListener::bind(config.metrics_addr).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(crate::metrics::serve(
        metrics_listener,
        metrics,
        stop_rx.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ImageGeneratorServer<GeneratorService>>()
        .await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health
        .set_serving::<AdaptersServer<AdaptersService>>()
        .await;

    let drain_state = state.clone();
    let mut signal_rx = stop_rx.clone();
    let mut fatal_rx = supervisor.fatal();
    let mut fatal_for_drain = supervisor.fatal();
    let shutdown_signal = async move {
        tokio::select! {
            _ = signal_rx.wait_for(|stop| *stop) => {
                tracing::info!("shutting down: draining in-flight requests");
            }
            _ = fatal_for_drain.wait_for(Option::is_some) => {
                tracing::error!("a supervised thread died: NOT_SERVING, shutting down");
            }
        }
        drain_state.draining.store(true, Ordering::Release);
        plugin_stop.store(true, Ordering::Release);
        training.wake();
        health
            .set_not_serving::<ImageGeneratorServer<GeneratorService>>()
            .await;
        health.set_not_serving::<AdminServer<AdminService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?)
        .add_service(
            ImageGeneratorServer::new(GeneratorService::new(state.clone()))
                .max_decoding_message_size(1 << 20),
        )
        .add_service(admin_only(
            state.clone(),
            AdminServer::new(AdminService::new(state.clone())).max_decoding_message_size(64 << 10),
        ))
        .add_service(admin_only(
            state.clone(),
            AdaptersServer::new(AdaptersService::new(state.clone()))
                .max_decoding_message_size(config.max_import_bytes),
        ));
    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);
    let mut timeout_rx = stop_rx;
    let task = tokio::spawn(async move {
        let serve = router.serve_with_incoming_shutdown(no_delay(grpc_listener), shutdown_signal);
        let deadline = async move {
            let _ = timeout_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(drain_timeout).await;
        };
        let result = tokio::select! {
            r = serve => r.map_err(|e| format!("gRPC server: {e}")),
            () = deadline => {
                tracing::warn!(?drain_timeout, "drain timeout reached; exiting with requests still in flight");
                Ok(())
            }
        };
        // A dead model or plugin thread fails the run, so the process exits non-zero.
        let result = match fatal_rx.borrow_and_update().clone() {
            Some(reason) => Err(reason),
            None => result,
        };
        // The last reference to the state drops the engine, which finishes its queue and joins.
        drop(state);
        result
    });
    tracing::info!(%grpc_addr, %metrics_addr, model = %model_id, "serving");
    Ok(RunningServer {
        grpc_addr,
        metrics_addr,
        stop,
        task,
    })
}

fn setup(e: impl std::fmt::Display) -> StartError {
    StartError::Setup(e.to_string())
}

/// Who holds the trainer lease, as logs and other trainers see it: the pod's name under
/// Kubernetes (HOSTNAME), the process id, and a random suffix.
fn lease_holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "imagegen".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The API keys of `--api-keys-file` and `--api-keys`, with a warning when there are none.
fn api_keys(config: &ServeConfig) -> Result<ApiKeys, StartError> {
    let mut keys = ApiKeys::default();
    if let Some(path) = &config.api_keys_file {
        keys.extend(ApiKeys::from_file(path).map_err(StartError::Config)?);
    }
    if let Some(inline) = &config.api_keys {
        keys.extend(
            ApiKeys::parse(inline).map_err(|e| StartError::Config(format!("--api-keys: {e}")))?,
        );
    }
    if keys.enabled() {
        tracing::info!(
            keys = keys.len(),
            "API keys configured: every RPC but health and reflection needs a key"
        );
    } else if config.grpc_addr.ip().is_loopback() {
        tracing::warn!(addr = %config.grpc_addr, "no API keys configured: serving unauthenticated, on loopback only");
    } else {
        tracing::warn!(addr = %config.grpc_addr, "no API keys configured and listening beyond loopback: anyone who can reach this port can use the server");
    }
    Ok(keys)
}

/// The key that signs feedback tokens: `--feedback-secret`; else the one kept in the data
/// directory (generated on first start); else, with `--ephemeral`, a random one for this process.
fn feedback_secret(
    config: &ServeConfig,
    data_dir: Option<&std::path::Path>,
) -> Result<Vec<u8>, StartError> {
    match (&config.feedback_secret, data_dir) {
        (Some(s), _) if s.len() >= 16 => Ok(s.as_bytes().to_vec()),
        (Some(_), _) => Err(StartError::Config(
            "--feedback-secret must be at least 16 characters".into(),
        )),
        (None, Some(dir)) => Ok(crate::tokens::kept_secret(&dir.join("feedback-secret"))?),
        (None, None) => {
            tracing::info!("--ephemeral: feedback tokens are valid until this process exits");
            Ok(crate::tokens::random_secret())
        }
    }
}

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(imagegen_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Server reflection (`grpc.reflection.v1`) over the API's and health's descriptors.
fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    StartError,
> {
    reflection_builder()
        .build_v1()
        .map_err(|e| StartError::Setup(e.to_string()))
}

/// The same as `grpc.reflection.v1alpha`: what grpcio-reflection, older grpcurl and several GUI
/// clients speak.
fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    StartError,
> {
    reflection_builder()
        .build_v1alpha()
        .map_err(|e| StartError::Setup(e.to_string()))
}

/// `service` behind an admin-key check that runs on the headers, before the body is read or
/// decoded: an unauthenticated 200 MB ImportAdapter is refused without buffering it.
fn admin_only<S>(
    state: Arc<AppState>,
    service: S,
) -> tonic::service::interceptor::InterceptedService<
    S,
    impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
> {
    tonic::service::interceptor::InterceptedService::new(service, move |request| {
        state
            .authorize(&request, crate::auth::Role::Admin)
            .map_err(tonic::Status::from)?;
        Ok(request)
    })
}

/// Accepted connections with TCP_NODELAY: without it a response's last frame waits for the
/// client's delayed ACK, 40 ms added to every request (measured at concurrency 1).
fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        conn.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        })
    })
}
