//! The model core through the library API on the tiny pipeline written to disk in the diffusers
//! layout: loading (and its errors), sampling, trajectories, log-prob consistency.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use imagegen_server::model::ModelError;
use imagegen_server::model::{LoraPair, LoraWeights, Mode};
use imagegen_server::pipeline::DiffusionModel;
use imagegen_server::pipeline::{AdapterChoice, Generation, SampleRequest};
use imagegen_server::tiny::write_tiny_model;

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(dir.path(), 0).expect("write tiny model");
    dir
}

fn load(dir: &Path) -> DiffusionModel {
    DiffusionModel::load(dir, DType::F32, &Device::Cpu).expect("load tiny model")
}

fn request(seed: u64, num_images: usize, steps: usize) -> SampleRequest {
    SampleRequest {
        num_images,
        seed,
        steps,
        guidance_scale: 5.0,
        eta: 1.0,
        width: 64,
        height: 64,
        shared_noise: false,
    }
}

fn generate(model: &DiffusionModel, req: &SampleRequest, adapter: AdapterChoice<'_>) -> Generation {
    let cond = model
        .conditioning("a small red circle on a blue background", "")
        .expect("encode");
    let mut out = model
        .generate(std::slice::from_ref(req), &[cond], adapter, &mut |_, _| {
            true
        })
        .expect("generate");
    out.remove(0)
}

/// A LoRA on every target with small random factors (deterministic).
fn random_adapter(model: &DiffusionModel) -> LoraWeights {
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    };
    let layers = model
        .unet
        .lora_targets()
        .iter()
        .map(|t| {
            let a: Vec<f32> = (0..4 * t.in_features).map(|_| next()).collect();
            let b: Vec<f32> = (0..t.out_features * 4).map(|_| next()).collect();
            Some(LoraPair {
                down: Tensor::from_vec(a, (4, t.in_features), &Device::Cpu).unwrap(),
                up: Tensor::from_vec(b, (t.out_features, 4), &Device::Cpu).unwrap(),
            })
        })
        .collect();
    LoraWeights::new(4, 4.0, model.unet.lora_targets(), layers).unwrap()
}

#[test]
fn generates_images_and_trajectories_of_the_requested_shape() {
    let dir = tiny_dir();
    let model = load(dir.path());
    assert_eq!(model.vae_scale_factor(), 2);
    let req = request(7, 2, 4);
    let gen_ = generate(&model, &req, AdapterChoice::default());
    assert_eq!(gen_.images.len(), 2);
    for image in &gen_.images {
        assert_eq!(
            (image.width, image.height, image.data.len()),
            (64, 64, 64 * 64 * 3)
        );
        let distinct: std::collections::HashSet<_> = image.data.iter().collect();
        assert!(distinct.len() > 10, "a decoded image is not constant");
    }
    let [a, b] = [&gen_.trajectories[0], &gen_.trajectories[1]];
    assert_eq!(a.latents.dims(), &[5, 4, 32, 32]);
    assert_eq!(a.timesteps, vec![751, 501, 251, 1]);
    assert_eq!(a.log_probs.len(), 4);
    assert!(a.log_probs.iter().all(|v| v.is_finite()));
    assert_eq!((a.seed, a.image_index, b.image_index), (7, 0, 1));
    assert_eq!(a.adapter_generation, None);
    // Image i starts from its own noise, seed + i.
    assert_eq!((a.seed, b.seed), (7, 8));
    assert_ne!(latent(a, 0), latent(b, 0));
    // With shared initial noise the images start alike and part with the steps' noise.
    let shared = generate(
        &model,
        &SampleRequest {
            shared_noise: true,
            ..req.clone()
        },
        AdapterChoice::default(),
    );
    let [c, d] = [&shared.trajectories[0], &shared.trajectories[1]];
    assert_eq!(latent(c, 0), latent(d, 0));
    assert_eq!(latent(c, 0), latent(a, 0), "image 0 is the same either way");
    assert_ne!(latent(c, 1), latent(d, 1));
}

fn latent(t: &imagegen_server::sampler::Trajectory, step: usize) -> Vec<f32> {
    t.latents
        .get(step)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Image i of a request is image 0 of a request with seed + i: one image reproduces alone.
#[test]
fn an_image_of_a_batch_reproduces_alone_from_its_seed() {
    let dir = tiny_dir();
    let model = load(dir.path());
    let batch = generate(&model, &request(40, 3, 3), AdapterChoice::default());
    let alone = generate(&model, &request(42, 1, 3), AdapterChoice::default());
    let (third, single) = (&batch.trajectories[2], &alone.trajectories[0]);
    assert_eq!(third.seed, 42);
    assert_eq!(
        latent(third, 0),
        latent(single, 0),
        "the same initial noise"
    );
    // The same noise all the way; the UNet may round differently at another batch size.
    let last = third.latents.dims()[0] - 1;
    let gap = latent(third, last)
        .iter()
        .zip(latent(single, last))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(gap < 1e-3, "final latents differ by {gap}");
}

#[test]
fn the_same_seed_gives_identical_bytes_and_another_seed_differs() {
    let dir = tiny_dir();
    let model = load(dir.path());
    let first = generate(&model, &request(42, 1, 3), AdapterChoice::default());
    let again = generate(&model, &request(42, 1, 3), AdapterChoice::default());
    let other = generate(&model, &request(43, 1, 3), AdapterChoice::default());
    assert_eq!(first.images[0].data, again.images[0].data);
    assert_ne!(first.images[0].data, other.images[0].data);
}

#[test]
fn recomputed_log_probs_reproduce_the_recorded_ones() {
    let dir = tiny_dir();
    let model = load(dir.path());
    let adapter = random_adapter(&model);
    let steps = 10;
    for weights in [None, Some(&adapter)] {
        let choice = AdapterChoice {
            generation: weights.map(|_| "g1"),
            weights,
        };
        let gen_ = generate(&model, &request(3, 2, steps), choice);
        // Every step of both images in one batch: items at different timesteps.
        let items: Vec<_> = gen_
            .trajectories
            .iter()
            .flat_map(|t| (0..steps).map(move |j| (t, j)))
            .collect();
        let recomputed = model
            .recompute_log_probs(&items, weights, Mode::Inference)
            .unwrap();
        for ((traj, j), value) in items.iter().zip(&recomputed) {
            let recorded = traj.log_probs[*j];
            assert!(
                (recorded - value).abs() <= 1e-5,
                "step {j}: recorded {recorded}, recomputed {value}"
            );
        }
        // The differentiable training path agrees too.
        let trained = model
            .recompute_log_probs(&items, weights, Mode::Training)
            .unwrap();
        for ((traj, j), value) in items.iter().zip(&trained) {
            assert!(
                (traj.log_probs[*j] - value).abs() <= 1e-4,
                "training mode, step {j}"
            );
        }
        if weights.is_some() {
            // Under another policy (the base model) the same chain is less likely.
            let base = model
                .recompute_log_probs(&items, None, Mode::Inference)
                .unwrap();
            let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
            assert!(
                mean(&base) < mean(&recomputed),
                "base {} vs adapter {}",
                mean(&base),
                mean(&recomputed)
            );
            assert_eq!(
                gen_.trajectories[0].adapter_generation.as_deref(),
                Some("g1")
            );
        }
    }
}

#[test]
fn half_precision_variants_load() {
    let dir = tiny_dir();
    // The UNet only as an f16 `.fp16` variant, the VAE stored in bf16.
    let unet_dir = dir.path().join("unet");
    let full = unet_dir.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&full, &Device::Cpu).unwrap();
    let half: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &half,
        unet_dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(&full).unwrap();
    let vae = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&vae, &Device::Cpu).unwrap();
    let bf16: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&bf16, &vae).unwrap();
    // candle's CPU backend has no bf16 matmul: bf16 compute is refused there, with the reason.
    let err = DiffusionModel::load(dir.path(), DType::BF16, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bf16") && err.contains("CPU"), "{err}");
    for dtype in [DType::F32, DType::F16] {
        let model = DiffusionModel::load(dir.path(), dtype, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        assert_eq!(model.unet.dtype(), dtype);
        let gen_ = generate(&model, &request(1, 1, 2), AdapterChoice::default());
        assert_eq!(gen_.images[0].data.len(), 64 * 64 * 3);
        assert!(
            gen_.trajectories[0].log_probs.iter().all(|v| v.is_finite()),
            "{dtype:?}"
        );
    }
}

#[test]
fn loading_errors_name_the_file_and_the_key() {
    // A missing weight file.
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let err = DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    // A missing tensor, and a tensor of the wrong shape.
    let key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    for (case, mutate) in [
        (
            "missing",
            Box::new(|m: &mut HashMap<String, Tensor>| {
                m.remove(key);
            }) as Box<dyn Fn(&mut HashMap<String, Tensor>)>,
        ),
        (
            "shape",
            Box::new(|m: &mut HashMap<String, Tensor>| {
                m.insert(
                    key.into(),
                    Tensor::zeros((64, 31), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
        ),
    ] {
        let dir = tiny_dir();
        let path = dir.path().join("unet/diffusion_pytorch_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        mutate(&mut tensors);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(key) && err.contains("unet/diffusion_pytorch_model.safetensors"),
            "{case}: {err}"
        );
    }

    // An unsupported scheduler setting and a malformed config.
    let dir = tiny_dir();
    let sched = dir.path().join("scheduler/scheduler_config.json");
    std::fs::write(&sched, r#"{"prediction_type": "sample"}"#).unwrap();
    let err = DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("scheduler_config.json") && err.contains("sample"),
        "{err}"
    );
    std::fs::write(dir.path().join("unet/config.json"), "{ not json").unwrap();
    std::fs::write(&sched, "{}").unwrap();
    let err = DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unet/config.json"), "{err}");
}

#[test]
fn bad_requests_are_rejected_with_the_field_named() {
    let dir = tiny_dir();
    let model = load(dir.path());
    let cases = [
        (
            SampleRequest {
                eta: 0.0,
                ..request(1, 1, 2)
            },
            "eta",
        ),
        (
            SampleRequest {
                eta: 1.5,
                ..request(1, 1, 2)
            },
            "eta",
        ),
        (
            SampleRequest {
                steps: 0,
                ..request(1, 1, 2)
            },
            "steps",
        ),
        (
            SampleRequest {
                steps: 1001,
                ..request(1, 1, 2)
            },
            "steps",
        ),
        (
            SampleRequest {
                width: 66,
                ..request(1, 1, 2)
            },
            "width",
        ),
        (
            SampleRequest {
                num_images: 0,
                ..request(1, 1, 2)
            },
            "num_images",
        ),
        (
            SampleRequest {
                guidance_scale: f64::NAN,
                ..request(1, 1, 2)
            },
            "guidance_scale",
        ),
    ];
    for (req, field) in cases {
        let err = model.check_request(&req).unwrap_err();
        assert!(
            matches!(err, ModelError::InvalidRequest { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
}

#[test]
fn the_tokenizer_keeps_caption_words_whole_and_pads_to_77() {
    let dir = tiny_dir();
    let model = load(dir.path());
    let pieces = model.tokenizer.pieces("A small RED circle").unwrap();
    assert_eq!(pieces, vec!["a</w>", "small</w>", "red</w>", "circle</w>"]);
    let tokens = model.tokenizer.encode("a red   circle").unwrap();
    assert_eq!(tokens.ids.len(), 77);
    assert!(!tokens.truncated);
    let long = model.tokenizer.encode(&"red ".repeat(100)).unwrap();
    assert!(long.truncated);
}
