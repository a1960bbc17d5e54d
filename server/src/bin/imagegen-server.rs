//! `imagegen-server`: the image-generation server and its model tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "imagegen-server",
    version,
    about = "Image-generation server that learns from feedback (D3PO)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the tiny test pipeline (diffusers layout, deterministic random weights) into DIR.
    MakeTinyModel {
        /// Output directory (created if missing).
        dir: PathBuf,
        /// Seed of the weights; the same seed writes the same files.
        #[arg(long, env = "IMAGEGEN_TINY_SEED", default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::MakeTinyModel { dir, seed } => {
            imagegen_server::model::tiny::write_tiny_model(&dir, seed)
                .with_context(|| format!("writing the tiny model to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), seed, "wrote the tiny model");
        }
    }
    Ok(())
}
