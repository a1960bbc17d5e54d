//! The adapter store on disk and the PEFT file format.
//!
//! ```text
//! <dir>/<generation>/adapter_model.safetensors   PEFT keys: unet.<module>.lora_A.weight [r, in],
//!                                                 unet.<module>.lora_B.weight [out, r]
//! <dir>/<generation>/adapter_config.json          r, lora_alpha, target_modules (PEFT's LoraConfig)
//! <dir>/<generation>/meta.json                    parent, created_at, training stats, feedback used
//! <dir>/state.json                                the live alias and its history
//! ```
//! The same two PEFT files are what `ExportAdapter` sends and `ImportAdapter` takes; diffusers'
//! `pipe.load_lora_weights(dir)` loads them. Every file is written to a temporary name, fsynced
//! and renamed, so a crash leaves the old file or the new one, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{AdapterError, AdapterMeta, LiveState};
use crate::model::lora::all_finite;
use crate::model::{LoraPair, LoraTarget, LoraWeights};

/// PEFT's `adapter_config.json` (the fields diffusers and PEFT read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha; the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Projections adapted (`to_q`, `to_k`, `to_v`, `to_out.0`).
    pub target_modules: Vec<String>,
    /// How B and A start (`gaussian`: A ~ N(0, 1/r^2), B = 0).
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    /// The model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT options this server does not implement; an adapter that sets one is refused by
    /// name rather than run at the wrong scale or shape.
    #[serde(flatten, skip_serializing)]
    pub unsupported: UnsupportedOptions,
}

/// PEFT `LoraConfig` options outside what the unmerged LoRA here computes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct UnsupportedOptions {
    /// DoRA (magnitude-direction decomposition).
    #[serde(default)]
    pub use_dora: bool,
    /// Rank-stabilised scale `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module ranks.
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

impl UnsupportedOptions {
    /// The name of the first option set, if any.
    fn first_set(&self) -> Option<&'static str> {
        [
            ("use_dora", self.use_dora),
            ("use_rslora", self.use_rslora),
            ("rank_pattern", !self.rank_pattern.is_empty()),
            ("alpha_pattern", !self.alpha_pattern.is_empty()),
        ]
        .into_iter()
        .find(|(_, set)| *set)
        .map(|(name, _)| name)
    }
}

/// The LoRA settings of a diffusers file without `adapter_config.json`: from the header's
/// `lora_adapter_metadata` (keys `unet.r`, ...) as `save_lora_weights` writes them, else the
/// rank from the tensors and alpha = rank (diffusers' default scale 1).
fn config_from_header(safetensors_bytes: &[u8]) -> Result<PeftConfig, AdapterError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(safetensors_bytes)
        .map_err(|e| AdapterError::Format(format!("adapter safetensors: {e}")))?;
    let settings = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
        .and_then(|json| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json).ok()
        });
    if let Some(settings) = settings {
        let unet: serde_json::Map<String, serde_json::Value> = settings
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(DIFFUSERS_PREFIX).map(|k| (k.to_string(), v)))
            .collect();
        if !unet.is_empty() {
            let mut unet = unet;
            unet.entry("peft_type").or_insert_with(|| "LORA".into());
            return serde_json::from_value(serde_json::Value::Object(unet)).map_err(|e| {
                AdapterError::Format(format!("the header's lora_adapter_metadata: {e}"))
            });
        }
    }
    let rank = header
        .tensors()
        .iter()
        .find(|(k, _)| k.ends_with(".lora_A.weight"))
        .and_then(|(_, info)| info.shape.first().copied())
        .ok_or_else(|| AdapterError::Format("no lora_A tensors in the file".into()))?;
    Ok(PeftConfig {
        r: rank,
        lora_alpha: rank as f64,
        ..PeftConfig::lora()
    })
}

impl PeftConfig {
    /// A plain LoRA config (rank 1, alpha 1) to fill in.
    fn lora() -> Self {
        Self {
            peft_type: "LORA".into(),
            r: 1,
            lora_alpha: 1.0,
            target_modules: Vec::new(),
            init_lora_weights: serde_json::Value::Null,
            base_model_name_or_path: None,
            unsupported: UnsupportedOptions::default(),
        }
    }
}

/// The PEFT files of an adapter: safetensors bytes and `adapter_config.json` bytes.
pub fn to_peft(
    weights: &LoraWeights,
    targets: &[LoraTarget],
    model_id: &str,
) -> Result<(Vec<u8>, Vec<u8>), AdapterError> {
    let (tensors, config) = lora_tensors(weights, targets, model_id, DIFFUSERS_PREFIX)?;
    let config_json =
        serde_json::to_vec_pretty(&config).map_err(|e| AdapterError::Format(e.to_string()))?;
    // diffusers' `load_lora_weights` reads the LoRA settings from the header, keyed by the
    // component they belong to (`unet.r`, `unet.target_modules`, ...) as its own
    // `save_lora_weights` writes them; unprefixed entries are dropped (KeyError: 'model_type').
    let prefixed: serde_json::Map<String, serde_json::Value> =
        match serde_json::to_value(&config).map_err(|e| AdapterError::Format(e.to_string()))? {
            serde_json::Value::Object(fields) => fields
                .into_iter()
                .map(|(k, v)| (format!("{DIFFUSERS_PREFIX}{k}"), v))
                .collect(),
            _ => serde_json::Map::new(),
        };
    let header = [(
        "lora_adapter_metadata".to_string(),
        serde_json::Value::Object(prefixed).to_string(),
    )];
    Ok((serialize(&tensors, header)?, config_json))
}

/// The factors of `weights` on the CPU in f32 under `prefix<module>.lora_A/B.weight`, and the
/// PEFT config describing them.
fn lora_tensors(
    weights: &LoraWeights,
    targets: &[LoraTarget],
    model_id: &str,
    prefix: &str,
) -> Result<(Vec<(String, Tensor)>, PeftConfig), AdapterError> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut modules = std::collections::BTreeSet::new();
    for (path, pair) in weights.named_layers(targets) {
        let target = targets
            .iter()
            .find(|t| t.path == path)
            .map(LoraTarget::module)
            .unwrap_or_default();
        modules.insert(target.to_string());
        let cpu = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
        };
        tensors.push((format!("{prefix}{path}.lora_A.weight"), cpu(&pair.down)?));
        tensors.push((format!("{prefix}{path}.lora_B.weight"), cpu(&pair.up)?));
    }
    let config = PeftConfig {
        peft_type: "LORA".into(),
        r: weights.rank(),
        lora_alpha: weights.alpha(),
        target_modules: modules.into_iter().collect(),
        init_lora_weights: serde_json::json!("gaussian"),
        base_model_name_or_path: Some(model_id.to_string()),
        unsupported: UnsupportedOptions::default(),
    };
    Ok((tensors, config))
}

/// safetensors bytes of `tensors` with `format: pt` and `extra` entries in the header.
fn serialize(
    tensors: &[(String, Tensor)],
    extra: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<u8>, AdapterError> {
    let mut metadata: HashMap<String, String> = extra.into_iter().collect();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
        .map_err(|e| AdapterError::Format(e.to_string()))
}

/// Key prefix of the UNet's tensors in diffusers' LoRA files (and this server's store).
const DIFFUSERS_PREFIX: &str = "unet.";
/// Key prefix of PEFT's `save_pretrained` of a `PeftModel` wrapping the UNet.
const PEFT_PREFIX: &str = "base_model.model.";

/// The files of an export: what diffusers' `load_lora_weights(dir)` reads
/// (`pytorch_lora_weights.safetensors`, `unet.` keys and the settings in its header) and what
/// PEFT's `PeftModel.from_pretrained(unet, dir)` reads (`adapter_model.safetensors` with
/// `base_model.model.` keys, and `adapter_config.json`).
pub(crate) fn export_files(
    weights: &LoraWeights,
    targets: &[LoraTarget],
    model_id: &str,
) -> Result<Vec<(&'static str, Vec<u8>)>, AdapterError> {
    let (diffusers, config) = to_peft(weights, targets, model_id)?;
    let (peft, _) = lora_tensors(weights, targets, model_id, PEFT_PREFIX)?;
    Ok(vec![
        ("pytorch_lora_weights.safetensors", diffusers),
        ("adapter_model.safetensors", serialize(&peft, [])?),
        ("adapter_config.json", config),
    ])
}

/// Highest LoRA rank accepted.
const MAX_RANK: usize = 1024;
/// Highest scale `lora_alpha / r` accepted: published SD LoRAs use at most a few; 1e300 made
/// every image black.
const MAX_SCALE: f64 = 64.0;

/// Reads PEFT files back into weights for `targets`; every key, shape and setting is checked.
pub fn from_peft(
    safetensors_bytes: &[u8],
    config_json: &[u8],
    targets: &[LoraTarget],
    device: &Device,
) -> Result<LoraWeights, AdapterError> {
    let tensors = candle_core::safetensors::load_buffer(safetensors_bytes, device)
        .map_err(|e| AdapterError::Format(format!("adapter_model.safetensors: {e}")))?;
    let (tensors, kohya) = if super::kohya::is_kohya(&tensors) {
        let (tensors, r, alpha) = super::kohya::to_server_layout(tensors, targets)?;
        (tensors, Some((r, alpha)))
    } else {
        (tensors, None)
    };
    let config: PeftConfig = match (config_json.is_empty(), kohya) {
        (true, Some((r, lora_alpha))) => PeftConfig {
            r,
            lora_alpha,
            ..PeftConfig::lora()
        },
        (true, None) => config_from_header(safetensors_bytes)?,
        (false, _) => serde_json::from_slice(config_json)
            .map_err(|e| AdapterError::Format(format!("adapter_config.json: {e}")))?,
    };
    if let Some(option) = config.unsupported.first_set() {
        return Err(AdapterError::Format(format!(
            "adapter_config.json sets `{option}`, which this server does not implement; \
             export the adapter without it"
        )));
    }
    if config.peft_type != "LORA" {
        return Err(AdapterError::Format(format!(
            "peft_type `{}` is not LORA",
            config.peft_type
        )));
    }
    if config.r == 0 || config.r > MAX_RANK {
        return Err(AdapterError::Format(format!(
            "adapter_config.json: r = {} is out of range; use 1..={MAX_RANK}",
            config.r
        )));
    }
    let max_alpha = MAX_SCALE * config.r as f64;
    if !(config.lora_alpha > 0.0 && config.lora_alpha <= max_alpha) {
        return Err(AdapterError::Format(format!(
            "adapter_config.json: lora_alpha = {} is out of range; use (0, {max_alpha}] \
             (a scale lora_alpha / r of at most {MAX_SCALE})",
            config.lora_alpha
        )));
    }
    // diffusers names the UNet's tensors `unet.<module>`, PEFT's `save_pretrained` of a wrapped
    // UNet `base_model.model.<module>`: both are read.
    let prefix = if tensors.keys().any(|k| k.starts_with(PEFT_PREFIX)) {
        PEFT_PREFIX
    } else {
        DIFFUSERS_PREFIX
    };
    let mut used = 0;
    let mut layers = Vec::with_capacity(targets.len());
    for target in targets {
        let a = tensors.get(&format!("{prefix}{}.lora_A.weight", target.path));
        let b = tensors.get(&format!("{prefix}{}.lora_B.weight", target.path));
        layers.push(match (a, b) {
            (Some(a), Some(b)) => {
                used += 2;
                // Shapes first: an empty or mis-sized tensor is named before its values are read.
                let want_a = [config.r, target.in_features];
                let want_b = [target.out_features, config.r];
                for (name, t, want) in [("lora_A", a, want_a), ("lora_B", b, want_b)] {
                    if t.dims() != want {
                        return Err(AdapterError::Format(format!(
                            "{prefix}{}.{name}.weight has shape {:?}; this model and r = {} need {want:?}",
                            target.path,
                            t.dims(),
                            config.r
                        )));
                    }
                }
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                for (name, t) in [("lora_A", &a), ("lora_B", &b)] {
                    if !all_finite(t)? {
                        return Err(AdapterError::Format(format!(
                            "{prefix}{}.{name}.weight holds NaN or infinite values",
                            target.path
                        )));
                    }
                }
                Some(LoraPair { down: a, up: b })
            }
            (None, None) => None,
            _ => {
                return Err(AdapterError::Format(format!(
                    "`{}` has only one of lora_A / lora_B",
                    target.path
                )));
            }
        });
    }
    if used != tensors.len() {
        let unknown: Vec<&String> = tensors
            .keys()
            .filter(|k| {
                !targets
                    .iter()
                    .any(|t| k.starts_with(&format!("{prefix}{}.lora_", t.path)))
            })
            .take(3)
            .collect();
        return Err(AdapterError::Format(format!(
            "keys that match no projection of this model, e.g. {unknown:?}"
        )));
    }
    if used == 0 {
        return Err(AdapterError::Format(
            "no LoRA tensors for this model's projections".into(),
        ));
    }
    LoraWeights::new(config.r, config.lora_alpha, targets, layers)
        .map_err(|e| AdapterError::Format(e.to_string()))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let io = |e: std::io::Error| AdapterError::Io(format!("{}: {e}", path.display()));
    let dir = path
        .parent()
        .ok_or_else(|| AdapterError::Io(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The adapter directory.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    dir: PathBuf,
}

impl AdapterStore {
    /// A store rooted at `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, AdapterError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AdapterError::Io(format!("{}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn generation_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Persists a generation (weights, config, metadata).
    pub fn save(
        &self,
        meta: &AdapterMeta,
        weights: &LoraWeights,
        targets: &[LoraTarget],
        model_id: &str,
    ) -> Result<(), AdapterError> {
        let dir = self.generation_dir(&meta.id);
        let (tensors, config) = to_peft(weights, targets, model_id)?;
        write_atomic(&dir.join("adapter_model.safetensors"), &tensors)?;
        write_atomic(&dir.join("adapter_config.json"), &config)?;
        let meta_json =
            serde_json::to_vec_pretty(meta).map_err(|e| AdapterError::Format(e.to_string()))?;
        write_atomic(&dir.join("meta.json"), &meta_json)
    }

    /// Loads a generation's weights.
    pub fn load_weights(
        &self,
        id: &str,
        targets: &[LoraTarget],
        device: &Device,
    ) -> Result<LoraWeights, AdapterError> {
        let dir = self.generation_dir(id);
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| AdapterError::Io(format!("{}: {e}", dir.join(name).display())))
        };
        from_peft(
            &read("adapter_model.safetensors")?,
            &read("adapter_config.json")?,
            targets,
            device,
        )
    }

    /// Every stored generation's metadata (unreadable entries are skipped with a warning).
    pub fn list(&self) -> Vec<AdapterMeta> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut metas: Vec<AdapterMeta> = entries
            .flatten()
            .filter(|e| e.path().is_dir() && e.file_name() != "quarantine")
            .filter_map(|e| {
                let path = e.path().join("meta.json");
                match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                    Ok(meta) => Some(meta),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "skipping an unreadable adapter");
                        None
                    }
                }
            })
            .collect();
        metas.sort_by(|a: &AdapterMeta, b| a.created_at.total_cmp(&b.created_at));
        metas
    }

    /// The saved live alias and history, if any.
    pub fn load_state(&self) -> Result<Option<LiveState>, AdapterError> {
        let path = self.dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| AdapterError::Format(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AdapterError::Io(format!("{}: {e}", path.display()))),
        }
    }

    /// Moves a damaged generation (or `state.json`) aside into `quarantine/`, where an operator
    /// can inspect it; the server goes on without it. Returns where it went.
    pub(crate) fn quarantine(&self, name: &str) -> Result<PathBuf, AdapterError> {
        let from = self.dir.join(name);
        let aside = self.dir.join("quarantine");
        std::fs::create_dir_all(&aside)
            .map_err(|e| AdapterError::Io(format!("{}: {e}", aside.display())))?;
        let stamp = crate::clock::now_seconds() as u64;
        let to = aside.join(format!("{name}.{stamp}"));
        std::fs::rename(&from, &to).map_err(|e| {
            AdapterError::Io(format!("{} -> {}: {e}", from.display(), to.display()))
        })?;
        Ok(to)
    }

    /// Saves the live alias and history.
    pub fn save_state(&self, state: &LiveState) -> Result<(), AdapterError> {
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| AdapterError::Format(e.to_string()))?;
        write_atomic(&self.dir.join("state.json"), &bytes)
    }
}
