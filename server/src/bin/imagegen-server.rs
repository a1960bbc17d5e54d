//! `imagegen-server`: serves the image-generation API (the default); also pretrains and
//! evaluates the embedded model, and writes the tiny test model.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imagegen_server::config::ServeConfig;

#[derive(Debug, Parser)]
#[command(
    name = "imagegen-server",
    version,
    about = "Image-generation server that learns from feedback (D3PO)"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (what runs when no subcommand is given).
    Serve(Box<ServeConfig>),
    /// Write the tiny test pipeline (diffusers layout, deterministic random weights) into DIR.
    MakeTinyModel {
        /// Output directory (created if missing).
        dir: PathBuf,
        /// Seed of the weights; the same seed writes the same files.
        #[arg(long, env = "IMAGEGEN_TINY_SEED", default_value_t = 0)]
        seed: u64,
    },
    /// Pretrain a model on the procedural shapes dataset (how the embedded model was made).
    Pretrain(PretrainArgs),
    /// Score a model on held-out captions with the shapes evaluator, and time one image.
    Evaluate(EvaluateArgs),
}

#[derive(Debug, clap::Args)]
struct PretrainArgs {
    /// The recipe (architecture, schedule, optimizer, seed).
    #[arg(
        long,
        env = "IMAGEGEN_PRETRAIN_RECIPE",
        default_value = "server/embedded/recipe.json"
    )]
    recipe: PathBuf,
    /// Output directory: a diffusers pipeline, rewritten at every checkpoint.
    #[arg(long, env = "IMAGEGEN_PRETRAIN_OUT")]
    out: PathBuf,
    /// Override the recipe's step count (for quick trials).
    #[arg(long, env = "IMAGEGEN_PRETRAIN_STEPS")]
    steps: Option<usize>,
    /// Write the model every this many steps.
    #[arg(
        long,
        env = "IMAGEGEN_PRETRAIN_CHECKPOINT_EVERY",
        default_value_t = 250
    )]
    checkpoint_every: usize,
    /// Held-out prompts scored at every checkpoint (0 = none).
    #[arg(long, env = "IMAGEGEN_PRETRAIN_EVAL_PROMPTS", default_value_t = 24)]
    eval_prompts: usize,
}

#[derive(Debug, clap::Args)]
struct EvaluateArgs {
    /// Model directory (default: the embedded model).
    #[arg(long, env = "IMAGEGEN_MODEL")]
    model: Option<PathBuf>,
    /// Held-out prompts to score.
    #[arg(long, env = "IMAGEGEN_EVAL_PROMPTS", default_value_t = 200)]
    prompts: usize,
    /// Denoising steps per image.
    #[arg(long, env = "IMAGEGEN_EVAL_STEPS", default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale (2: what the server uses for the built-in model).
    #[arg(
        long,
        env = "IMAGEGEN_EVAL_GUIDANCE",
        default_value_t = f64::from(imagegen_server::builtin::GUIDANCE_SCALE)
    )]
    guidance: f64,
    /// DDIM eta in (0, 1] (1: the server's default).
    #[arg(long, env = "IMAGEGEN_EVAL_ETA", default_value_t = 1.0)]
    eta: f64,
    /// Seed of the prompts and of the sampling noise.
    #[arg(long, env = "IMAGEGEN_EVAL_SEED", default_value_t = 1000)]
    seed: u64,
}

/// mimalloc keeps freed pages for reuse: glibc's malloc returns large tensor buffers to the OS
/// and page-faults them back in on every forward (30% of a batch-16 UNet step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // Pretraining never returns memory (one long job); serving returns what stays unused for
    // 30 s (see `imagegen_server::allocator`).
    imagegen_server::allocator::set_purge_delay(
        if std::env::args().nth(1).as_deref() == Some("pretrain") {
            -1
        } else {
            imagegen_server::allocator::SERVING_PURGE_DELAY_MS
        },
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MakeTinyModel { dir, seed }) => {
            imagegen_server::tiny::write_tiny_model(&dir, seed)
                .with_context(|| format!("writing the tiny model to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), seed, "wrote the tiny model");
            Ok(())
        }
        Some(Command::Pretrain(args)) => pretrain(&args),
        Some(Command::Evaluate(args)) => evaluate(&args),
        Some(Command::Serve(config)) => serve(*config),
        None => serve(cli.serve),
    }
}

fn pretrain(args: &PretrainArgs) -> anyhow::Result<()> {
    use imagegen_server::builtin::Recipe;
    use imagegen_server::builtin::pretrain::{PretrainRun, pretrain};
    let mut recipe = Recipe::from_file(&args.recipe)?;
    if let Some(steps) = args.steps {
        recipe.steps = steps;
    }
    let run = PretrainRun {
        recipe,
        out: args.out.clone(),
        checkpoint_every: args.checkpoint_every,
        eval_prompts: args.eval_prompts,
    };
    pretrain(&run).with_context(|| format!("pretraining into {}", args.out.display()))
}

fn evaluate(args: &EvaluateArgs) -> anyhow::Result<()> {
    use imagegen_server::builtin::{evaluate_with_eta as evaluate, held_out_prompts};
    let device = candle_core::Device::Cpu;
    let model = match &args.model {
        Some(dir) => {
            imagegen_server::pipeline::DiffusionModel::load(dir, candle_core::DType::F32, &device)?
        }
        None => imagegen_server::builtin::load(candle_core::DType::F32, &device)?,
    };
    let size = 64;
    let prompts = held_out_prompts(args.seed, args.prompts, size);
    let started = std::time::Instant::now();
    let report = evaluate(
        &model,
        &prompts,
        args.steps,
        args.guidance,
        args.eta,
        args.seed,
        size,
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    // One image alone, as a client would ask for it (prompt encoding included).
    let single = std::time::Instant::now();
    evaluate(
        &model,
        &prompts[..1.min(prompts.len())],
        args.steps,
        args.guidance,
        args.eta,
        0,
        size,
    )?;
    let single = single.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": model.id,
            "prompts": report.prompts,
            "accuracy": report.accuracy(),
            "shape_correct": report.shape_correct,
            "colour_correct": report.colour_correct,
            "background_correct": report.background_correct,
            "with_background": report.with_background,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "eta": args.eta,
            "seconds_per_image_in_batches_of_4": elapsed / report.prompts.max(1) as f64,
            "seconds_for_one_image": single,
        }))?
    );
    Ok(())
}

fn serve(config: ServeConfig) -> anyhow::Result<()> {
    tracing::info!(
        ?config,
        cpu_gemm = imagegen_server::model::nn::cpu_gemm_backend(),
        cpu_vectors = imagegen_server::model::nn::vector_isa(),
        "starting"
    );
    let model = imagegen_server::server::load_model(&config).context("loading the model")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = imagegen_server::server::start(&config, model)
            .await
            .context("starting the server")?;
        shutdown_signal().await;
        server.stop();
        server.wait().await.map_err(anyhow::Error::msg)?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
