//! Registry behaviour: content ids, compare-and-swap activation, rollback, persistence, PEFT files.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::seeded::SeededWeights;
use crate::model::{LoraPair, UNet2DConditionModel, UNetConfig};

fn targets() -> Vec<LoraTarget> {
    let unet = UNet2DConditionModel::new(
        &UNetConfig::tiny(),
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    unet.lora_targets().to_vec()
}

fn weights(targets: &[LoraTarget], value: f32) -> LoraWeights {
    let layers = targets
        .iter()
        .map(|t| {
            Some(LoraPair {
                down: Tensor::full(value, (4, t.in_features), &Device::Cpu).unwrap(),
                up: Tensor::full(-value, (t.out_features, 4), &Device::Cpu).unwrap(),
            })
        })
        .collect();
    LoraWeights::new(4, 4.0, targets, layers).unwrap()
}

#[test]
fn ids_are_content_hashes_and_activation_is_compare_and_swap() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.1), None, "trained", None, vec![])
        .unwrap();
    let again = registry
        .publish(weights(&targets, 0.1), None, "trained", None, vec![])
        .unwrap();
    assert_eq!(a.meta.id, again.meta.id, "same content, same id");
    let b = registry
        .publish(
            weights(&targets, 0.2),
            Some(a.meta.id.clone()),
            "trained",
            None,
            vec![],
        )
        .unwrap();
    assert_ne!(a.meta.id, b.meta.id);

    assert!(
        registry.resolve("").unwrap().is_none(),
        "base is live at first"
    );
    registry
        .activate(Some(&a.meta.id), None, "activated")
        .unwrap();
    let err = registry
        .activate(Some(&b.meta.id), None, "activated")
        .unwrap_err();
    assert!(matches!(err, AdapterError::Conflict { .. }), "{err}");
    registry
        .activate(Some(&b.meta.id), Some(&a.meta.id), "activated")
        .unwrap();
    assert_eq!(
        registry.resolve("live").unwrap().unwrap().meta.id,
        b.meta.id
    );
    assert!(registry.resolve("base").unwrap().is_none());
    assert!(matches!(
        registry.resolve("nope").unwrap_err(),
        AdapterError::Unknown(_)
    ));

    // A request holding the old generation keeps it after a swap.
    let held = registry.resolve("").unwrap().unwrap();
    assert_eq!(
        registry.rollback().unwrap().as_deref(),
        Some(a.meta.id.as_str())
    );
    assert_eq!(held.meta.id, b.meta.id);
    assert_eq!(registry.live().unwrap().unwrap().meta.id, a.meta.id);
    assert_eq!(registry.rollback().unwrap(), None, "back to base");
    assert!(matches!(
        registry.rollback().unwrap_err(),
        AdapterError::NoHistory
    ));
}

#[test]
fn a_restart_restores_generations_and_the_live_alias() {
    let targets = targets();
    let dir = tempfile::tempdir().unwrap();
    let (id, live) = {
        let registry =
            AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, Some(dir.path())).unwrap();
        let a = registry
            .publish(
                weights(&targets, 0.1),
                None,
                "trained",
                Some(TrainingStats {
                    pairs: 3,
                    ..Default::default()
                }),
                vec!["g1".into()],
            )
            .unwrap();
        registry
            .activate(Some(&a.meta.id), None, "trained")
            .unwrap();
        (
            a.meta.id.clone(),
            registry.live().unwrap().unwrap().weights.layers()[0]
                .clone()
                .unwrap(),
        )
    };
    let registry = AdapterRegistry::open(targets, "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    let restored = registry.live().unwrap().unwrap();
    assert_eq!(restored.meta.id, id);
    assert_eq!(restored.meta.stats.as_ref().unwrap().pairs, 3);
    assert_eq!(restored.meta.learned_from, vec!["g1".to_string()]);
    let first = restored.weights.layers()[0].clone().unwrap();
    let same = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0
    };
    assert!(same(&first.down, &live.down) && same(&first.up, &live.up));
    assert_eq!(registry.history().unwrap().len(), 1);
    assert_eq!(registry.list().unwrap().len(), 1);
}

#[test]
fn peft_files_round_trip_and_bad_ones_are_refused_with_the_reason() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    let (tensors, config) = registry.export(&a.meta.id).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    let key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
    assert_eq!(parsed.tensor(key).unwrap().shape(), &[4, 64]);
    let peft: PeftConfig = serde_json::from_slice(&config).unwrap();
    assert_eq!(
        (peft.r, peft.lora_alpha, peft.target_modules.len()),
        (4, 4.0, 4)
    );

    // Importing the export gives the same generation back.
    let other = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    assert_eq!(other.import(&tensors, &config).unwrap().meta.id, a.meta.id);

    let bad_config = br#"{"peft_type": "IA3", "r": 4, "lora_alpha": 4, "target_modules": []}"#;
    assert!(
        other
            .import(&tensors, bad_config)
            .unwrap_err()
            .to_string()
            .contains("IA3")
    );
    assert!(
        other
            .import(b"garbage", &config)
            .unwrap_err()
            .to_string()
            .contains("safetensors")
    );
    // A rank that does not match the tensors.
    let wrong_rank =
        br#"{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["to_q"]}"#;
    assert!(other.import(&tensors, wrong_rank).is_err());
}

/// The tensors of an export with `edit` applied to one of them, as safetensors bytes.
fn edited_export(
    registry: &AdapterRegistry,
    id: &str,
    key: &str,
    edit: impl Fn(&Tensor) -> Tensor,
) -> Vec<u8> {
    let (bytes, _) = registry.export(id).unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let edited = edit(&tensors[key]);
    tensors.insert(key.to_string(), edited);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}

/// Hostile adapter files are refused as format errors (INVALID_ARGUMENT at the API) naming the
/// tensor or setting: a NaN past the first element, infinities, an empty tensor, an absurd
/// alpha. The old check (`max(|t|)` finite) let the NaN through; the empty tensor was INTERNAL.
#[test]
fn poisoned_or_malformed_adapter_files_are_refused_by_name() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    let (_, config) = registry.export(&a.meta.id).unwrap();
    let key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight";
    let fresh = || AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let refused = |bytes: &[u8], config: &[u8]| match fresh().import(bytes, config) {
        Err(e @ AdapterError::Format(_)) => e.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    };

    let nan_later = edited_export(&registry, &a.meta.id, key, |t| {
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[5] = f32::NAN;
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    });
    let message = refused(&nan_later, &config);
    assert!(
        message.contains("NaN or infinite") && message.contains("to_q.lora_B"),
        "{message}"
    );

    let infinite = edited_export(&registry, &a.meta.id, key, |t| {
        (t.ones_like().unwrap() * f64::INFINITY).unwrap()
    });
    assert!(refused(&infinite, &config).contains("NaN or infinite"));

    let empty = edited_export(&registry, &a.meta.id, key, |_| {
        Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap()
    });
    let message = refused(&empty, &config);
    assert!(
        message.contains("shape [0, 4]") && message.contains("to_q.lora_B"),
        "{message}"
    );

    let (good, _) = registry.export(&a.meta.id).unwrap();
    let huge_alpha =
        br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 1e300, "target_modules": ["to_q"]}"#;
    assert!(refused(&good, huge_alpha).contains("lora_alpha"));
    let zero_alpha =
        br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 0, "target_modules": ["to_q"]}"#;
    assert!(refused(&good, zero_alpha).contains("lora_alpha"));
    // The same files, undamaged, still import.
    assert!(fresh().import(&good, &config).is_ok());
}

/// The export's header carries the LoRA settings as diffusers' `save_lora_weights` writes
/// them, keyed by component (`unet.r`, ...): `load_lora_weights` finds no target modules in
/// unprefixed ones.
#[test]
fn exported_header_metadata_is_keyed_by_component_as_diffusers_reads_it() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    let (tensors, _) = registry.export(&a.meta.id).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&tensors).unwrap();
    let entries = header.metadata().clone().unwrap();
    assert_eq!(entries["format"], "pt");
    let settings: serde_json::Value =
        serde_json::from_str(&entries["lora_adapter_metadata"]).unwrap();
    assert_eq!(settings["unet.r"], 4);
    assert_eq!(settings["unet.lora_alpha"], 4.0);
    assert_eq!(settings["unet.peft_type"], "LORA");
    assert_eq!(settings["unet.target_modules"].as_array().unwrap().len(), 4);
    assert!(settings.get("r").is_none());
}

/// A data directory with `a` live, then `b` live (trained from `a`); returns their ids.
fn two_live_generations(targets: &[LoraTarget], dir: &std::path::Path) -> (String, String) {
    let registry =
        AdapterRegistry::open(targets.to_vec(), "tiny", &Device::Cpu, Some(dir)).unwrap();
    let nan_stats = TrainingStats {
        pairs: 2,
        mean_loss: f64::NAN,
        ..Default::default()
    };
    let a = registry
        .publish(weights(targets, 0.1), None, "trained", None, vec![])
        .unwrap();
    registry
        .activate(Some(&a.meta.id), None, "trained")
        .unwrap();
    let b = registry
        .publish(
            weights(targets, 0.2),
            Some(a.meta.id.clone()),
            "trained",
            Some(nan_stats),
            vec![],
        )
        .unwrap();
    registry
        .activate(Some(&b.meta.id), Some(&a.meta.id), "trained")
        .unwrap();
    (a.meta.id.clone(), b.meta.id.clone())
}

/// One damaged file in the data directory must not stop the server (exit 1 is a crash loop
/// under Kubernetes): the damaged live generation is moved aside and the one live before it
/// serves; a torn `state.json` is moved aside and the base model serves. A NaN statistic
/// (written as JSON `null`) reads back.
#[test]
fn damaged_files_are_quarantined_and_startup_goes_on() {
    let targets = targets();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_live_generations(&targets, dir.path());
    // The NaN loss of b was written as null and reads back as NaN.
    let reopened =
        AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    let stats = reopened.meta(&b).unwrap().stats.unwrap();
    assert!(stats.mean_loss.is_nan() && stats.pairs == 2);
    drop(reopened);

    // A truncated live safetensors file: b is quarantined, a (live before it) serves.
    let weights_file = dir.path().join(&b).join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights_file).unwrap();
    std::fs::write(&weights_file, &bytes[..bytes.len() / 2]).unwrap();
    let registry =
        AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    assert_eq!(registry.live().unwrap().unwrap().meta.id, a);
    assert!(!dir.path().join(&b).exists());
    let aside: Vec<String> = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(aside.iter().any(|n| n.starts_with(&b)), "{aside:?}");
    assert!(registry.list().unwrap().iter().all(|m| m.id != b));
    drop(registry);

    // A missing meta.json of the (now) live generation a: base serves.
    std::fs::remove_file(dir.path().join(&a).join("meta.json")).unwrap();
    let registry =
        AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    assert!(registry.live().unwrap().is_none());
    drop(registry);

    // A truncated state.json: quarantined, base serves, and new generations still persist.
    let state = dir.path().join("state.json");
    std::fs::write(&state, b"{\"live\": \"abc").unwrap();
    let registry =
        AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    assert!(registry.live().unwrap().is_none());
    let c = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    registry
        .activate(Some(&c.meta.id), None, "activated")
        .unwrap();
    drop(registry);
    let registry = AdapterRegistry::open(targets, "tiny", &Device::Cpu, Some(dir.path())).unwrap();
    assert_eq!(registry.live().unwrap().unwrap().meta.id, c.meta.id);
}

/// What diffusers and PEFT write imports: the diffusers file alone (settings from its header,
/// or from the shapes), PEFT's `base_model.model.` keys; PEFT options this server does not
/// compute are refused by name instead of running at the wrong scale.
#[test]
fn diffusers_and_peft_layouts_import_and_unsupported_options_are_named() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    let files: std::collections::HashMap<&str, Vec<u8>> = registry
        .export_files(&a.meta.id)
        .unwrap()
        .into_iter()
        .collect();
    let fresh = || AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    // diffusers: the file alone, its settings read from the header.
    let diffusers = &files["pytorch_lora_weights.safetensors"];
    assert_eq!(fresh().import(diffusers, b"").unwrap().meta.id, a.meta.id);
    // PEFT: `base_model.model.` keys with the config.
    let (peft, config) = (
        &files["adapter_model.safetensors"],
        &files["adapter_config.json"],
    );
    assert_eq!(fresh().import(peft, config).unwrap().meta.id, a.meta.id);
    // A file without settings: rank from the shapes, alpha = rank (scale 1, diffusers' default).
    let bare = edited_export(
        &registry,
        &a.meta.id,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        |t| t.clone(),
    );
    let imported = fresh().import(&bare, b"").unwrap();
    assert_eq!(
        (imported.weights.rank(), imported.weights.alpha()),
        (4, 4.0)
    );

    for option in [
        r#""use_dora": true"#,
        r#""use_rslora": true"#,
        r#""rank_pattern": {"to_q": 8}"#,
        r#""alpha_pattern": {"to_q": 8}"#,
    ] {
        let config = format!(
            r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["to_q"], {option}}}"#
        );
        let err = fresh()
            .import(peft, config.as_bytes())
            .unwrap_err()
            .to_string();
        let name = option.split('"').nth(1).unwrap();
        assert!(err.contains(name), "{option}: {err}");
    }
}

/// The kohya layout (`lora_unet_*` with lora_down / lora_up / alpha) imports as the same
/// generation; modules the server does not adapt are refused by name.
#[test]
fn kohya_files_import_and_other_modules_are_refused_by_name() {
    let targets = targets();
    let registry = AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    let a = registry
        .publish(weights(&targets, 0.3), None, "trained", None, vec![])
        .unwrap();
    let (bytes, _) = registry.export(&a.meta.id).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let mut kohya = std::collections::HashMap::new();
    for (key, t) in tensors {
        let path = key.trim_start_matches("unet.");
        let (module, part) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
            (m, "lora_down.weight")
        } else {
            (
                path.strip_suffix(".lora_B.weight").unwrap(),
                "lora_up.weight",
            )
        };
        let name = format!("lora_unet_{}", module.replace('.', "_"));
        kohya.insert(
            format!("{name}.alpha"),
            Tensor::new(4f32, &Device::Cpu).unwrap(),
        );
        kohya.insert(format!("{name}.{part}"), t);
    }
    let write = |tensors: &std::collections::HashMap<String, Tensor>| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.safetensors");
        candle_core::safetensors::save(tensors, &path).unwrap();
        std::fs::read(path).unwrap()
    };
    let fresh = || AdapterRegistry::open(targets.clone(), "tiny", &Device::Cpu, None).unwrap();
    assert_eq!(
        fresh().import(&write(&kohya), b"").unwrap().meta.id,
        a.meta.id
    );

    let down = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    for bad in [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
    ] {
        let mut with_bad = kohya.clone();
        with_bad.insert(bad.to_string(), down.clone());
        let err = fresh()
            .import(&write(&with_bad), b"")
            .unwrap_err()
            .to_string();
        let module = bad.split('.').next().unwrap();
        assert!(err.contains(module), "{err}");
    }
    let mut mixed = kohya.clone();
    let first_alpha = mixed
        .keys()
        .find(|k| k.ends_with(".alpha"))
        .unwrap()
        .clone();
    mixed.insert(first_alpha, Tensor::new(8f32, &Device::Cpu).unwrap());
    let err = fresh().import(&write(&mixed), b"").unwrap_err().to_string();
    assert!(err.contains("per-module alphas"), "{err}");
}
