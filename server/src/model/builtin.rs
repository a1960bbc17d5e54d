//! The model the server runs when no `--model` is given.
//!
//! Until the trained embedded model lands, this is the tiny pipeline with deterministic random
//! weights: it exercises every code path (and the real loader, through a temporary directory)
//! but draws noise-like images.

use candle_core::{DType, Device};

use super::loader::DiffusionModel;
use super::tiny::write_tiny_model;
use crate::error::ModelError;

/// The built-in model's id.
pub const BUILTIN_ID: &str = "builtin-tiny";

/// Builds the built-in model.
pub fn load(dtype: DType, device: &Device) -> Result<DiffusionModel, ModelError> {
    let dir = std::env::temp_dir().join(format!(
        "imagegen-builtin-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    write_tiny_model(&dir, 0)?;
    let loaded = DiffusionModel::load(&dir, dtype, device);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove the built-in model's temporary files");
    }
    let mut model = loaded?;
    model.id = BUILTIN_ID.into();
    Ok(model)
}
