//! The server's configuration: one struct, every flag also an `IMAGEGEN_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::DType;
use clap::Args;

use crate::grpc::{Defaults, Limits};
use crate::pipeline::{DiffusionModel, SampleLimits};

/// Where persistent data goes when `--data-dir` is not given.
pub const DEFAULT_DATA_DIR: &str = "imagegen-data";
/// Denoising steps of a request that leaves them unset.
const DEFAULT_STEPS: u32 = 20;
/// DDIM eta of a request that leaves it unset (1: DDPM-like, what D3PO trains on).
const DEFAULT_ETA: f32 = 1.0;
/// Guidance of a request to a `--model` that leaves it unset (diffusers' usual 5 to 7.5).
const DEFAULT_GUIDANCE: f32 = 5.0;

/// Longest feedback-token lifetime: ten years (beyond it token expiry times overflow).
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// Weight precision (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (needs a GPU).
    Bf16,
}

impl Precision {
    /// The tensor dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// What one process does (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Serve and train (training only while holding the trainer lease when on NATS).
    All,
    /// Serve only: never train; follow the live adapter the trainer publishes.
    Serve,
    /// Train only (needs `--nats-url`): Generate is refused, feedback arrives through NATS.
    Train,
}

impl Role {
    /// Whether this process may run training rounds.
    pub fn trains(self) -> bool {
        self != Self::Serve
    }

    /// Whether this process answers Generate.
    pub fn serves(self) -> bool {
        self != Self::Train
    }
}

/// Scale-out: many serving replicas and one trainer sharing what they learn through NATS
/// JetStream.
#[derive(Clone, Args)]
pub struct ScaleOutConfig {
    /// NATS server to share trajectories, feedback, adapters and the live alias through
    /// (`nats://host:4222`; user and password may go in the URL). Without it the process keeps
    /// its learning store in the data directory.
    #[arg(long, env = "IMAGEGEN_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// NATS credentials file (`.creds`: JWT and NKey seed).
    #[arg(long, env = "IMAGEGEN_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// `all` (serve and train), `serve` (never train) or `train` (train only; needs NATS).
    #[arg(long, env = "IMAGEGEN_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,

    /// Byte limit of the JetStream learning stream (trajectories, feedback, ledger): the oldest
    /// messages go first. Size it above `--trajectory-buffer-bytes`.
    #[arg(long, env = "IMAGEGEN_NATS_STREAM_BYTES", default_value_t = 8 << 30)]
    pub nats_stream_bytes: i64,

    /// Time-to-live of the trainer lease in seconds: a second trainer takes over this long
    /// after the first stops renewing.
    #[arg(long, env = "IMAGEGEN_TRAINER_LEASE_SECS", default_value_t = 10)]
    pub trainer_lease_secs: u64,
}

impl std::fmt::Debug for ScaleOutConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("ScaleOutConfig")
            .field("nats_url", &self.nats_url.as_ref().map(|_| "<redacted>"))
            .field("nats_creds", &self.nats_creds)
            .field("role", &self.role)
            .field("nats_stream_bytes", &self.nats_stream_bytes)
            .field("trainer_lease_secs", &self.trainer_lease_secs)
            .finish()
    }
}

impl ScaleOutConfig {
    fn validate(&self) -> Result<(), String> {
        if self.role == Role::Train && self.nats_url.is_none() {
            return Err(
                "--role train needs --nats-url (the trainer reads feedback from NATS); use --role all on one machine"
                    .into(),
            );
        }
        if self.nats_url.is_none() && self.nats_creds.is_some() {
            return Err("--nats-creds needs --nats-url".into());
        }
        if !(2..=3600).contains(&self.trainer_lease_secs) {
            return Err(format!(
                "--trainer-lease-secs must be in 2..=3600, got {}",
                self.trainer_lease_secs
            ));
        }
        if self.nats_stream_bytes < 1 << 20 {
            return Err("--nats-stream-bytes must be at least 1 MiB".into());
        }
        Ok(())
    }
}

/// Settings of `imagegen-server serve`.
#[derive(Clone, Args)]
pub struct ServeConfig {
    /// Diffusers pipeline directory to serve; the built-in model when absent.
    #[arg(long, env = "IMAGEGEN_MODEL")]
    pub model: Option<PathBuf>,

    /// Weight precision: f32 or f16 (bf16 needs a GPU).
    #[arg(long, env = "IMAGEGEN_DTYPE", value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,

    /// Run on the first CUDA GPU (needs the `cuda` build).
    #[arg(long, env = "IMAGEGEN_CUDA", default_value_t = false)]
    pub cuda: bool,

    /// Directory for persistent data (default `./imagegen-data`): the learning store
    /// (`learning.redb`: trajectories, feedback, idempotency keys, the ledger of trained
    /// pairs), adapter generations and the live alias (`adapters/`), and the generated feedback
    /// secret (`feedback-secret`).
    #[arg(long, env = "IMAGEGEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Keep everything in memory only (tests, throwaway runs): nothing survives the process.
    #[arg(long, env = "IMAGEGEN_EPHEMERAL", default_value_t = false)]
    pub ephemeral: bool,

    /// gRPC listen address.
    #[arg(long, env = "IMAGEGEN_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "IMAGEGEN_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,

    /// Most images one model batch holds (requests are merged up to this).
    #[arg(long, env = "IMAGEGEN_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,

    /// How long the batcher waits for compatible requests before running a batch.
    #[arg(long, env = "IMAGEGEN_BATCH_WAIT_MS", default_value_t = 10)]
    pub batch_wait_ms: u64,

    /// Requests admitted at once (queued plus running); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "IMAGEGEN_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Byte budget of the learning store (chains and feedback): whole requests go oldest
    /// first, requests with feedback no round has consumed yet last.
    #[arg(long, env = "IMAGEGEN_TRAJECTORY_BUFFER_BYTES", default_value_t = 1 << 30)]
    pub trajectory_buffer_bytes: usize,

    /// Prompt embeddings kept in the LRU cache.
    #[arg(long, env = "IMAGEGEN_EMBEDDING_CACHE", default_value_t = 256)]
    pub embedding_cache: usize,

    /// Most denoising steps a request may ask for.
    #[arg(long, env = "IMAGEGEN_MAX_STEPS", default_value_t = 100)]
    pub max_steps: u32,

    /// Most images one request may ask for (at most `--max-batch`: a request runs as one batch).
    #[arg(long, env = "IMAGEGEN_MAX_IMAGES", default_value_t = 8)]
    pub max_images: u32,

    /// Largest width or height in pixels (default: twice the model's native size).
    #[arg(long, env = "IMAGEGEN_MAX_IMAGE_SIZE")]
    pub max_image_size: Option<u32>,

    /// Largest ImportAdapter message in bytes (the adapter's files together); larger ones get
    /// RESOURCE_EXHAUSTED before they are decoded.
    #[arg(long, env = "IMAGEGEN_MAX_IMPORT_BYTES", default_value_t = 128 << 20)]
    pub max_import_bytes: usize,

    /// Longest prompt, in characters.
    #[arg(long, env = "IMAGEGEN_MAX_PROMPT_CHARS", default_value_t = 2000)]
    pub max_prompt_chars: usize,

    /// Guidance scale of requests that leave it unset (default: 2 for the built-in model, where
    /// its evaluator scores best, 5 for a `--model`).
    #[arg(long, env = "IMAGEGEN_DEFAULT_GUIDANCE")]
    pub default_guidance: Option<f32>,

    /// File of API keys, one `ROLES KEY` per line (`generate,feedback sk-...`; roles: generate,
    /// feedback, admin). Without keys the server is unauthenticated and should stay on loopback.
    #[arg(long, env = "IMAGEGEN_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// API keys inline, in the file's format with `;` between entries.
    #[arg(long, env = "IMAGEGEN_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,

    /// Secret that signs feedback tokens. When absent one is generated once and kept in
    /// `DATA_DIR/feedback-secret` (mode 0600), so tokens survive restarts; with `--ephemeral` it
    /// is random per start. Replicas behind one load balancer must share it.
    #[arg(long, env = "IMAGEGEN_FEEDBACK_SECRET", hide_env_values = true)]
    pub feedback_secret: Option<String>,

    /// How long a feedback token stays valid, in seconds.
    #[arg(long, env = "IMAGEGEN_FEEDBACK_TOKEN_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub feedback_token_ttl_secs: u64,

    /// Learning plugins' settings (`--d3po-*`).
    #[command(flatten)]
    pub plugins: crate::plugins::PluginsConfig,

    /// Scale-out settings (`--nats-*`, `--role`).
    #[command(flatten)]
    pub scale_out: ScaleOutConfig,

    /// Longest a SIGTERM waits for in-flight requests before exiting.
    #[arg(long, env = "IMAGEGEN_DRAIN_TIMEOUT_SECS", default_value_t = 60)]
    pub drain_timeout_secs: u64,
}

impl ServeConfig {
    /// Every flag at its default (`IMAGEGEN_*` environment variables still apply, as on the
    /// command line, and fail here when malformed).
    pub fn defaults() -> Result<Self, clap::Error> {
        use clap::{Command, FromArgMatches};
        let matches = Self::augment_args(Command::new("imagegen-server"))
            .try_get_matches_from(["imagegen-server"])?;
        Self::from_arg_matches(&matches)
    }

    /// The batching window.
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    /// Checks ranges that clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.ephemeral && self.data_dir.is_some() {
            return Err("--ephemeral keeps nothing on disk: drop --data-dir or --ephemeral".into());
        }
        if self
            .default_guidance
            .is_some_and(|g| !g.is_finite() || g < 0.0)
        {
            return Err("--default-guidance must be finite and >= 0".into());
        }
        if !(1..=MAX_TOKEN_TTL_SECS).contains(&self.feedback_token_ttl_secs) {
            return Err(format!(
                "--feedback-token-ttl-secs must be in 1..={MAX_TOKEN_TTL_SECS} (ten years), got {}",
                self.feedback_token_ttl_secs
            ));
        }
        if self.max_batch == 0 {
            return Err("--max-batch must be at least 1".into());
        }
        if self.max_queue == 0 {
            return Err("--max-queue must be at least 1".into());
        }
        if self.max_steps == 0 || self.max_images == 0 {
            return Err("--max-steps and --max-images must be at least 1".into());
        }
        self.plugins.validate()?;
        self.scale_out.validate()?;
        Ok(())
    }

    /// Where persistent data lives (`None` with `--ephemeral`).
    pub fn data_dir(&self) -> Option<PathBuf> {
        if self.ephemeral {
            None
        } else {
            Some(
                self.data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            )
        }
    }

    /// What unset request fields default to, for `model`.
    pub(crate) fn request_defaults(&self, model: &DiffusionModel) -> Defaults {
        let builtin = model.id == crate::builtin::BUILTIN_ID;
        Defaults {
            num_images: 1,
            steps: DEFAULT_STEPS,
            guidance_scale: self.default_guidance.unwrap_or(if builtin {
                crate::builtin::GUIDANCE_SCALE
            } else {
                DEFAULT_GUIDANCE
            }),
            size: native_size(model),
            eta: DEFAULT_ETA,
        }
    }

    /// What requests may ask of `model`: the flags, tightened by what the model supports.
    pub(crate) fn request_limits(&self, model: &DiffusionModel) -> Result<Limits, String> {
        let intrinsic = model.sample_limits();
        let max_size = self
            .max_image_size
            .map_or(2 * native_size(model) as usize, |s| s as usize);
        if max_size < intrinsic.size_multiple {
            return Err(format!(
                "--max-image-size must be at least {}",
                intrinsic.size_multiple
            ));
        }
        Ok(Limits {
            sample: SampleLimits {
                // One request runs as one model batch (its images share one noise stream), so
                // it can hold no more images than a batch may.
                max_images: (self.max_images as usize).min(self.max_batch),
                max_steps: (self.max_steps as usize).min(intrinsic.max_steps),
                max_size,
                size_multiple: intrinsic.size_multiple,
            },
            max_prompt_chars: self.max_prompt_chars,
            max_batch: self.max_batch,
            max_queue: self.max_queue,
        })
    }
}

/// Secrets never reach the logs: `Debug` prints whether they are set, not what they are.
impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| if v.is_some() { "<redacted>" } else { "<unset>" };
        f.debug_struct("ServeConfig")
            .field("model", &self.model)
            .field("data_dir", &self.data_dir)
            .field("ephemeral", &self.ephemeral)
            .field("dtype", &self.dtype)
            .field("cuda", &self.cuda)
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("max_batch", &self.max_batch)
            .field("batch_wait_ms", &self.batch_wait_ms)
            .field("max_queue", &self.max_queue)
            .field("trajectory_buffer_bytes", &self.trajectory_buffer_bytes)
            .field("embedding_cache", &self.embedding_cache)
            .field("max_steps", &self.max_steps)
            .field("max_images", &self.max_images)
            .field("max_image_size", &self.max_image_size)
            .field("max_prompt_chars", &self.max_prompt_chars)
            .field("max_import_bytes", &self.max_import_bytes)
            .field("default_guidance", &self.default_guidance)
            .field("api_keys_file", &self.api_keys_file)
            .field("api_keys", &redacted(&self.api_keys))
            .field("feedback_secret", &redacted(&self.feedback_secret))
            .field("feedback_token_ttl_secs", &self.feedback_token_ttl_secs)
            .field("drain_timeout_secs", &self.drain_timeout_secs)
            .field("plugins", &self.plugins)
            .field("scale_out", &self.scale_out)
            .finish()
    }
}

/// The model's native image side in pixels.
fn native_size(model: &DiffusionModel) -> u32 {
    (model.vae_scale_factor() * model.unet.config().sample_size) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_never_holds_more_images_than_a_batch() {
        let model = crate::builtin::load(DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut config = ServeConfig::defaults().unwrap();
        (config.max_images, config.max_batch) = (8, 4);
        assert_eq!(config.request_limits(&model).unwrap().sample.max_images, 4);
        (config.max_images, config.max_batch) = (2, 4);
        assert_eq!(config.request_limits(&model).unwrap().sample.max_images, 2);
    }

    #[test]
    fn an_overflowing_token_lifetime_is_refused_by_name() {
        let mut config = ServeConfig::defaults().unwrap();
        assert!(config.validate().is_ok());
        config.feedback_token_ttl_secs = u64::MAX;
        let err = config.validate().unwrap_err();
        assert!(err.contains("--feedback-token-ttl-secs"), "{err}");
        config.feedback_token_ttl_secs = 0;
        assert!(config.validate().is_err());
        config.feedback_token_ttl_secs = 3600;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn scale_out_flags_are_checked_by_name_and_the_url_is_never_printed() {
        let mut config = ServeConfig::defaults().unwrap();
        config.scale_out.role = Role::Train;
        let err = config.validate().unwrap_err();
        assert!(err.contains("--role train needs --nats-url"), "{err}");
        config.scale_out.nats_url = Some("nats://user:hunter2@nats:4222".into());
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("hunter2"));
        config.scale_out.trainer_lease_secs = 1;
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("--trainer-lease-secs")
        );
        config.scale_out.trainer_lease_secs = 10;
        config.scale_out.nats_url = None;
        config.scale_out.role = Role::All;
        config.scale_out.nats_creds = Some("x.creds".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("--nats-creds needs --nats-url")
        );
        assert!(Role::All.trains() && Role::All.serves());
        assert!(!Role::Serve.trains() && !Role::Train.serves());
    }
}
