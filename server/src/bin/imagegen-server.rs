//! `imagegen-server`: serves the image-generation API (the default), or writes the tiny model.

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
}

/// mimalloc keeps freed pages for reuse: glibc's malloc returns large tensor buffers to the OS
/// and page-faults them back in on every forward (30% of a batch-16 UNet step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MakeTinyModel { dir, seed }) => {
            imagegen_server::model::tiny::write_tiny_model(&dir, seed)
                .with_context(|| format!("writing the tiny model to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), seed, "wrote the tiny model");
            Ok(())
        }
        Some(Command::Serve(config)) => serve(*config),
        None => serve(cli.serve),
    }
}

fn serve(config: ServeConfig) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
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
