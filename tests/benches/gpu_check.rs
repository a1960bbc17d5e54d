//! The GPU check's Rust side (`scripts/gpu-check.sh` runs it; prints figures, asserts nothing).
//!
//! `GPU_CHECK_DEVICE=cuda` (default) or `cpu` (the dry run); `GPU_CHECK_ONLY` picks sections
//! (`tiny,unet,generate,train,swap`, default all) so that the script can sample GPU memory per
//! section; `GPU_CHECK_SIZE=sd15` (default on CUDA) or `tiny` (default on the CPU) sets the
//! model the timed sections use. The last line is one JSON object of what ran.
//!
//! - `tiny`: the tiny model on the device against the same model on the CPU (one request of two
//!   images, 20 steps, CFG 5): largest pixel and latent differences, the recorded log-probs'
//!   difference, the log-probs recomputed on the device (as training does) against the recorded
//!   ones, the D3PO loss of one pair on both, and f16 against f32 on the device.
//! - `unet`: UNet forward at 64x64 latent (32x32 for tiny), per dtype and batch 1/2/4/8.
//! - `generate`: a whole 20-step CFG generation, 512 px for SD-1.5 size, batch 1.
//! - `train`: one D3PO step (one pair, CFG, one time index) at 64x64 latent.
//! - `swap`: a server on the device under 3 concurrent clients while the live adapter flips 20
//!   times: requests served and failed.
//!
//! The JSON carries the process's peak RSS; GPU memory is sampled by the script per section.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use imagegen_proto::v1 as pb;
use imagegen_server::model::{AdapterBatch, Mode, TrainableLora, UNet2DConditionModel};
use imagegen_server::pipeline::{AdapterChoice, DiffusionModel, Generation, SampleRequest};
use imagegen_server::sampler::{TransitionBatch, log_prob, log_ratio};
use imagegen_tests::TestServer;
use plugin_d3po::{D3poLossConfig, d3po_loss};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Map, Value, json};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROMPT: &str = "a small red circle on a blue background";

fn main() -> anyhow::Result<()> {
    let cuda = std::env::var("GPU_CHECK_DEVICE").map_or(true, |d| d != "cpu");
    let device = if cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let sd15 = std::env::var("GPU_CHECK_SIZE").map_or(cuda, |s| s == "sd15");
    let only = std::env::var("GPU_CHECK_ONLY").unwrap_or("tiny,unet,generate,train,swap".into());
    let wants = |s: &str| only.split(',').any(|o| o.trim() == s);
    // f16 and bf16 where the device computes them; the CPU computes f32 (and f16, slowly).
    let dtypes: Vec<DType> = if cuda {
        vec![DType::F16, DType::BF16]
    } else {
        vec![DType::F32]
    };
    let mut out = Map::new();
    out.insert("device".into(), json!(if cuda { "cuda" } else { "cpu" }));
    out.insert("size".into(), json!(if sd15 { "sd15" } else { "tiny" }));

    let tiny_dir = tempfile::tempdir()?;
    imagegen_server::tiny::write_tiny_model(tiny_dir.path(), 0)?;
    if wants("tiny") {
        eprintln!("== tiny model on {device:?} against the CPU");
        out.insert("tiny".into(), tiny_suite(tiny_dir.path(), &device)?);
    }
    // `GPU_CHECK_MODEL_DIR` keeps the SD-1.5-size model between the script's sections.
    let scratch = tempfile::tempdir()?;
    let sd15_dir = std::env::var_os("GPU_CHECK_MODEL_DIR")
        .map_or_else(|| scratch.path().to_path_buf(), std::path::PathBuf::from);
    let timed_dir = if sd15 && (wants("unet") || wants("generate") || wants("train")) {
        if !sd15_dir.join("model_index.json").exists() {
            let start = Instant::now();
            imagegen_server::tiny::write_sd15_size_model(&sd15_dir, 0)?;
            eprintln!(
                "(SD-1.5-size random model written in {:.0} s)",
                start.elapsed().as_secs_f64()
            );
        }
        sd15_dir.as_path()
    } else {
        tiny_dir.path()
    };
    // SD-1.5 size: 64x64 latent, 512 px; tiny: 32x32 latent, 64 px (its VAE scales by 2).
    let (latent, pixels) = if sd15 { (64, 512) } else { (32, 64) };
    if wants("unet") {
        let mut unet = Map::new();
        for &dtype in &dtypes {
            let model = DiffusionModel::load(timed_dir, dtype, &device)?;
            for batch in [1, 2, 4, 8] {
                let t = unet_forward(&model.unet, batch, latent, &device)?;
                eprintln!("UNet forward {dtype:?} batch {batch}: {:.1} ms", ms(t));
                unet.insert(format!("{}_b{batch}_ms", dtype_name(dtype)), json!(ms(t)));
            }
        }
        out.insert("unet_fwd".into(), Value::Object(unet));
    }
    if wants("generate") {
        let mut generate = Map::new();
        for &dtype in &dtypes {
            let model = DiffusionModel::load(timed_dir, dtype, &device)?;
            let request = sample_request(1, pixels);
            let t = median(3, || generate_once(&model, &request).map(drop))?;
            eprintln!("{pixels} px, 20 steps, CFG, {dtype:?}: {:.1} ms", ms(t));
            generate.insert(
                format!("{}_{pixels}px_20steps_ms", dtype_name(dtype)),
                json!(ms(t)),
            );
        }
        out.insert("generate".into(), Value::Object(generate));
    }
    if wants("train") {
        // Training computes in f32 (as the trainer does): LoRA gradients in half precision
        // underflow.
        let model = DiffusionModel::load(timed_dir, DType::F32, &device)?;
        let pixels = latent * model.vae_scale_factor();
        let generation = generate_once(&model, &sample_request(2, pixels))?;
        let (step, loss) = train_step(&model, &generation, &device)?;
        eprintln!(
            "D3PO step at {latent}x{latent} latent: {:.1} ms (loss {loss:.4})",
            ms(step)
        );
        out.insert(
            "train".into(),
            json!({"d3po_step_ms": ms(step), "latent": latent, "loss": loss}),
        );
    }
    if wants("swap") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        out.insert("swap".into(), runtime.block_on(swap_under_load(cuda))?);
    }
    out.insert(
        "peak_rss_mib".into(),
        json!(imagegen_server::allocator::peak_rss_mib()),
    );
    println!("{}", Value::Object(out));
    Ok(())
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Median of `n` timed runs after one warm-up.
fn median(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    f()?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

fn randn(shape: &[usize], seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

fn unet_forward(
    unet: &UNet2DConditionModel,
    batch: usize,
    side: usize,
    device: &Device,
) -> anyhow::Result<Duration> {
    let config = unet.config();
    let x = randn(
        &[batch, config.in_channels, side, side],
        1,
        unet.dtype(),
        device,
    )?;
    let ctx = randn(
        &[batch, 77, config.cross_attention_dim],
        2,
        unet.dtype(),
        device,
    )?;
    let t = vec![500.0; batch];
    median(5, || {
        let y = unet.forward(&x, &t, &ctx, &AdapterBatch::BASE, Mode::Inference)?;
        device.synchronize()?;
        drop(y);
        Ok(())
    })
}

fn sample_request(images: usize, pixels: usize) -> SampleRequest {
    SampleRequest {
        num_images: images,
        seed: 7,
        steps: 20,
        guidance_scale: 5.0,
        eta: 1.0,
        width: pixels,
        height: pixels,
        shared_noise: false,
    }
}

fn generate_once(model: &DiffusionModel, request: &SampleRequest) -> anyhow::Result<Generation> {
    let cond = model.conditioning(PROMPT, "")?;
    Ok(model
        .generate(
            std::slice::from_ref(request),
            std::slice::from_ref(&cond),
            AdapterChoice::default(),
            &mut |_, _| true,
        )?
        .remove(0))
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (
        a.to_dtype(DType::F32)?,
        b.to_dtype(DType::F32)?.to_device(a.device())?,
    );
    Ok(f64::from(
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?,
    ))
}

fn max_pixel_diff(a: &Generation, b: &Generation) -> u8 {
    a.images
        .iter()
        .zip(&b.images)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| p.abs_diff(*q)))
        .max()
        .unwrap_or(0)
}

/// Mean absolute pixel difference (0-255).
fn mean_pixel_diff(a: &Generation, b: &Generation) -> f64 {
    let (sum, n) = a
        .images
        .iter()
        .zip(&b.images)
        .flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(p, q)| p.abs_diff(*q)))
        .fold((0u64, 0u64), |(s, n), d| (s + u64::from(d), n + 1));
    sum as f64 / n.max(1) as f64
}

/// Runs `f` as the device runs it: on the CPU (the dry run) with the portable ops, the code a
/// GPU runs, so that the tiny suite compares the GPU's code path with the CPU kernels.
fn on_device<T>(device: &Device, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    if device.is_cpu() {
        imagegen_server::model::nn::with_portable_ops(f)
    } else {
        f()
    }
}

fn tiny_suite(dir: &std::path::Path, device: &Device) -> anyhow::Result<Value> {
    let cpu = DiffusionModel::load(dir, DType::F32, &Device::Cpu)?;
    let dev = DiffusionModel::load(dir, DType::F32, device)?;
    let request = sample_request(2, 64);
    let on_cpu = generate_once(&cpu, &request)?;
    let on_dev = on_device(device, || generate_once(&dev, &request))?;
    let mut latent_diff = 0f64;
    let mut recorded_logp_diff = 0f64;
    for (a, b) in on_cpu.trajectories.iter().zip(&on_dev.trajectories) {
        latent_diff = latent_diff.max(max_diff(&a.latents, &b.latents)?);
        for (p, q) in a.log_probs.iter().zip(&b.log_probs) {
            recorded_logp_diff = recorded_logp_diff.max(f64::from((p - q).abs()));
        }
    }
    // The device's own chains re-evaluated on the device, as the trainer does.
    let recompute_diff = on_device(device, || {
        let mut diff = 0f64;
        for traj in &on_dev.trajectories {
            let items: Vec<_> = (0..traj.steps()).map(|j| (traj, j)).collect();
            let batch = TransitionBatch::new(dev.denoiser(), &items)?;
            let (mu, sigmas) =
                batch.policy_mean(dev.denoiser(), &AdapterBatch::BASE, Mode::Inference)?;
            let recomputed: Vec<f32> = log_prob(&batch.x_prev, &mu, &sigmas)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            for (p, q) in recomputed.iter().zip(&traj.log_probs) {
                diff = diff.max(f64::from((p - q).abs()));
            }
        }
        Ok(diff)
    })?;
    // The CPU's chains on both, so that only the arithmetic differs.
    let (loss_cpu, grad_cpu) = pair_gradient(&cpu, &on_cpu, &Device::Cpu)?;
    let (loss_dev, grad_dev) = on_device(device, || pair_gradient(&dev, &on_cpu, device))?;
    let mut half = Map::new();
    if !device.is_cpu() {
        for dtype in [DType::F16, DType::BF16] {
            let model = DiffusionModel::load(dir, dtype, device)?;
            let images = generate_once(&model, &request)?;
            half.insert(
                format!("{}_vs_f32_mean_pixel_diff", dtype_name(dtype)),
                json!(mean_pixel_diff(&images, &on_dev)),
            );
        }
    }
    let result = json!({
        "device_code_path": if device.is_cpu() { "portable ops on the CPU" } else { "cuda" },
        "max_pixel_diff_vs_cpu": max_pixel_diff(&on_cpu, &on_dev),
        "mean_pixel_diff_vs_cpu": mean_pixel_diff(&on_cpu, &on_dev),
        "max_latent_diff_vs_cpu": latent_diff,
        "max_recorded_logprob_diff_vs_cpu": recorded_logp_diff,
        "max_logprob_recompute_diff": recompute_diff,
        "logprob_recompute_within_1e-4": recompute_diff <= 1e-4,
        "d3po_loss_cpu": loss_cpu,
        "d3po_loss_device": loss_dev,
        "d3po_grad_norm_cpu": grad_cpu,
        "d3po_grad_norm_device": grad_dev,
        "d3po_grad_norm_rel_diff": (grad_dev - grad_cpu).abs() / grad_cpu.abs().max(1e-30),
        "half_precision": half,
    });
    eprintln!("{result}");
    Ok(result)
}

/// The loss and the LoRA gradient's norm of one D3PO step on the first pair of `generation`
/// (step 10): the loss is ln 2 at the start (policy = reference), the gradient is not zero.
fn pair_gradient(
    model: &DiffusionModel,
    generation: &Generation,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let lora = init_lora(model, device)?;
    let loss = d3po_step_loss(model, generation, &lora)?;
    let grads = loss.sum_all()?.backward()?;
    let mut sum_sq = 0f64;
    for var in &lora.vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum_sq += f64::from(
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?,
            );
        }
    }
    let loss = f64::from(loss.to_dtype(DType::F32)?.to_vec1::<f32>()?[0]);
    Ok((loss, sum_sq.sqrt()))
}

/// The trainer's fresh adapter: rank 4 on every attention projection (B = 0).
fn init_lora(model: &DiffusionModel, device: &Device) -> anyhow::Result<TrainableLora> {
    let mut rng = StdRng::seed_from_u64(9);
    Ok(TrainableLora::init(
        model.unet.lora_targets(),
        4,
        4.0,
        &["to_q", "to_k", "to_v", "to_out.0"],
        device,
        || StandardNormal.sample(&mut rng),
    )?)
}

/// The D3PO loss of the first pair of `generation` at step 10: reference forward (no graph),
/// policy forward (with one), the loss.
fn d3po_step_loss(
    model: &DiffusionModel,
    generation: &Generation,
    lora: &TrainableLora,
) -> anyhow::Result<Tensor> {
    let reference = lora.weights.detached()?;
    let items = [
        (&generation.trajectories[0], 10usize),
        (&generation.trajectories[1], 10usize),
    ];
    let batch = TransitionBatch::new(model.denoiser(), &items)?;
    let sigmas = batch.sigmas();
    let (mu_ref, _) = batch.policy_mean(
        model.denoiser(),
        &AdapterBatch::Uniform(Some(&reference)),
        Mode::Inference,
    )?;
    let (mu, _) = batch.policy_mean(
        model.denoiser(),
        &AdapterBatch::Uniform(Some(&lora.weights)),
        Mode::Training,
    )?;
    let delta = log_ratio(&batch.x_prev, &mu, &mu_ref.detach(), &sigmas)?;
    let loss = d3po_loss(
        &delta.narrow(0, 0, 1)?,
        &delta.narrow(0, 1, 1)?,
        &D3poLossConfig::default(),
    )?;
    Ok(loss)
}

fn train_step(
    model: &DiffusionModel,
    generation: &Generation,
    device: &Device,
) -> anyhow::Result<(Duration, f64)> {
    // The adapter is made once, as the trainer makes it once per round; the timed step is the
    // two forwards, the loss and the backward.
    let lora = init_lora(model, device)?;
    let mut last_loss = None;
    let t = median(3, || {
        let loss = d3po_step_loss(model, generation, &lora)?;
        let grads = loss.sum_all()?.backward()?;
        device.synchronize()?;
        drop(grads);
        last_loss = Some(loss);
        Ok(())
    })?;
    let loss = match last_loss {
        Some(l) => f64::from(l.to_dtype(DType::F32)?.to_vec1::<f32>()?[0]),
        None => f64::NAN,
    };
    Ok((t, loss))
}

/// A server on the device (tiny model) trains one adapter from two rated pairs, then serves 3
/// concurrent clients while the live adapter flips 20 times.
async fn swap_under_load(cuda: bool) -> anyhow::Result<Value> {
    let t = TestServer::start(|c| {
        c.cuda = cuda;
        c.plugins.d3po.lr = 1e-3;
        c.plugins.d3po.max_drift = 0.0; // the random tiny model drifts; every round publishes
        c.plugins.d3po.interval_secs = 1_000_000;
    })
    .await?;
    let mut client = t.generator();
    for g in 0..2 {
        let r = client.generate(request(100 + g, 2)).await?.into_inner();
        client
            .submit_feedback(pb::FeedbackRequest {
                image_id: r.images[0].image_id.clone(),
                feedback_token: r.images[0].feedback_token.clone(),
                feedback: Some(pb::feedback_request::Feedback::PreferredOver(
                    r.images[1].image_id.clone(),
                )),
                ..Default::default()
            })
            .await?;
    }
    let mut adapters = t.adapters();
    let (_, status) =
        imagegen_client::demo::train_round(&mut adapters, &None, Duration::from_secs(600)).await?;
    let live = adapters
        .list_adapters(pb::ListAdaptersRequest {})
        .await?
        .into_inner()
        .live;
    anyhow::ensure!(!live.is_empty(), "the round published nothing: {status:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let mut client = t.generator();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    match client.generate(request(w, 1)).await {
                        Ok(_) => served += 1,
                        Err(e) => {
                            eprintln!("request failed during swaps: {e}");
                            failed += 1;
                        }
                    }
                }
                (served, failed)
            })
        })
        .collect();
    let mut current = live.clone();
    let mut swap_ms = Vec::new();
    for i in 0..20 {
        let next = if i % 2 == 0 {
            String::new()
        } else {
            live.clone()
        };
        let start = Instant::now();
        adapters
            .activate_adapter(pb::ActivateAdapterRequest {
                generation: next.clone(),
                expected_live: current.clone(),
            })
            .await?;
        swap_ms.push(start.elapsed().as_secs_f64() * 1e3);
        current = next;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut served, mut failed) = (0, 0);
    for w in workers {
        let (s, f) = w.await?;
        served += s;
        failed += f;
    }
    swap_ms.sort_by(f64::total_cmp);
    let result = json!({
        "swaps": 20,
        "requests_served": served,
        "requests_failed": failed,
        "swap_rpc_p50_ms": (swap_ms[10] * 10.0).round() / 10.0,
        "swap_rpc_max_ms": (swap_ms[19] * 10.0).round() / 10.0,
    });
    eprintln!("{result}");
    Ok(result)
}

fn request(seed: u64, images: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a small red circle".into(),
        seed: Some(seed),
        steps: Some(4),
        num_images: Some(images),
        ..Default::default()
    }
}
