//! Model-core benchmark: prints figures, asserts nothing.
//!
//! `cargo bench -p imagegen-server --bench model` runs everything; set `BENCH_SD15=0` to skip the
//! SD-1.5-size UNet (inference, LoRA training and a D3PO step: several minutes and about 8 GB),
//! `BENCH_TINY=0` to run only those (`BENCH_TINY=d3po` / `pipe1` / `pipe4`: of the tiny ones only the D3PO
//! step / the one- or four-image pipeline, for profiling), `BENCH_SD15_TRAINING=0` to skip their training workloads,
//! `BENCH_ITERS` to change repetitions (`BENCH_SD15_ITERS` for the SD-1.5 forwards),
//! `BENCH_STAT=min` to report minimums. The last line
//! is one JSON object of medians in ms, keyed as the PyTorch peer's (`../shared/bench/peer`), for
//! `scripts/bench-vs-pytorch.sh`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use imagegen_server::model::seeded::SeededWeights;
use imagegen_server::model::{AdapterBatch, Mode, TrainableLora, UNet2DConditionModel, UNetConfig};
use imagegen_server::pipeline::DiffusionModel;
use imagegen_server::pipeline::{AdapterChoice, SampleRequest};
use imagegen_server::sampler::TransitionBatch;
use imagegen_server::sampler::{log_prob, log_ratio};
use imagegen_server::tiny::write_tiny_model;
use plugin_d3po::{D3poLossConfig, d3po_loss};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

fn iters() -> usize {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Timed SD-1.5 forwards per batch size (`BENCH_SD15_ITERS`), by default 3 as the PyTorch peer
/// times them: the median of three, where one run alone was at the mercy of a noisy host.
fn sd15_iters() -> usize {
    std::env::var("BENCH_SD15_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Runs `f` once to warm up, then `n` times; returns the median (the minimum with
/// `BENCH_STAT=min`, the steadier figure for A/B runs of two builds on a noisy machine).
fn time<T>(n: usize, mut f: impl FnMut() -> T) -> Duration {
    std::hint::black_box(f());
    let mut samples: Vec<Duration> = (0..n.max(1))
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect();
    samples.sort();
    if std::env::var("BENCH_STAT").is_ok_and(|v| v == "min") {
        return samples[0];
    }
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:9.1} ms", d.as_secs_f64() * 1e3)
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn unet_forward(
    unet: &UNet2DConditionModel,
    batch: usize,
    side: usize,
    seq: usize,
    n: usize,
) -> Duration {
    let ch = unet.config().in_channels;
    let x = randn(&[batch, ch, side, side], 1);
    let ctx = randn(&[batch, seq, unet.config().cross_attention_dim], 2);
    let t = vec![500.0; batch];
    time(n, || {
        unet.forward(&x, &t, &ctx, &AdapterBatch::BASE, Mode::Inference)
            .expect("forward")
    })
}

/// mimalloc keeps freed pages for reuse: glibc's malloc returns large tensor buffers to the OS
/// and page-faults them back in on every forward (30% of a batch-16 UNet step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn millis(d: Duration) -> serde_json::Value {
    serde_json::json!((d.as_secs_f64() * 1e4).round() / 10.0)
}

/// GFLOP/s of a 1024^3 f32 matmul (what the peer calls `sgemm_1024_gflops`).
fn sgemm_gflops() -> anyhow::Result<f64> {
    let a = randn(&[1024, 1024], 21);
    let b = randn(&[1024, 1024], 22);
    let t = time(30, || {
        imagegen_server::model::nn::matmul(&a, &b).expect("matmul")
    });
    Ok(2.0 * 1024f64.powi(3) / t.as_secs_f64() / 1e9)
}

fn main() -> anyhow::Result<()> {
    // As the server runs (`imagegen_server::allocator`).
    imagegen_server::allocator::set_purge_delay(imagegen_server::allocator::SERVING_PURGE_DELAY_MS);
    if let Ok(workload) = std::env::var(TRAINING_CHILD) {
        return sd15_training_child(&workload);
    }
    let n = iters();
    let mut json = serde_json::Map::new();
    println!(
        "threads: {}, CPU matrix products: {}, element-wise kernels: {}",
        candle_core::utils::get_num_threads(),
        imagegen_server::model::nn::cpu_gemm_backend(),
        imagegen_server::model::nn::vector_isa()
    );
    let gflops = sgemm_gflops()?;
    println!("sgemm 1024^3: {gflops:.1} GFLOP/s");
    json.insert(
        "cpu_gemm".into(),
        imagegen_server::model::nn::cpu_gemm_backend().into(),
    );
    json.insert(
        "vector_isa".into(),
        imagegen_server::model::nn::vector_isa().into(),
    );
    json.insert(
        "threads".into(),
        candle_core::utils::get_num_threads().into(),
    );
    json.insert(
        "sgemm_1024_gflops".into(),
        serde_json::json!((gflops * 10.0).round() / 10.0),
    );
    // BENCH_TINY=0: the SD-1.5-size workloads only.
    if std::env::var("BENCH_TINY").map_or(true, |v| v != "0") {
        tiny_workloads(&mut json, n)?;
    }

    if std::env::var("BENCH_SD15")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        println!(
            "\n== UNet forward, SD-1.5 size (random weights, 64x64 latent, 77 tokens), inference =="
        );
        let sd = sd15_unet()?;
        for batch in [1, 2] {
            let t = unet_forward(&sd, batch, 64, 77, sd15_iters());
            println!("batch {batch}: {}", ms(t));
            json.insert(format!("sd15_unet_fwd_b{batch}_ms"), millis(t));
        }
        drop(sd);
        println!(
            "\n== SD-1.5 size, LoRA r4 on to_q/to_k/to_v/to_out.0, training (64x64 latent, 77 tokens; each in a process of its own, peak RSS from its start) =="
        );
        // BENCH_SD15_TRAINING=0: the forwards only (the training children take minutes).
        if std::env::var("BENCH_SD15_TRAINING").map_or(true, |v| v != "0") {
            for workload in ["lora", "d3po"] {
                json.extend(sd15_training_in_child(workload)?);
            }
        }
    }
    json.insert(
        "peak_rss_mib".into(),
        imagegen_server::allocator::peak_rss_mib()
            .map_or(serde_json::Value::Null, serde_json::Value::from),
    );
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

/// The tiny UNet's forwards, the tiny and built-in pipelines, recording, and the tiny D3PO step.
fn tiny_workloads(
    json: &mut serde_json::Map<String, serde_json::Value>,
    n: usize,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path(), 0)?;
    let model = DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu)?;
    match std::env::var("BENCH_TINY").as_deref() {
        Ok("d3po") => {}
        Ok(only @ ("pipe1" | "pipe4")) => {
            let images = if only == "pipe1" { 1 } else { 4 };
            let t = time_generation(&model, images, n, 5.0);
            println!("tiny pipeline, {images} image(s): {}", ms(t));
            json.insert(format!("tiny_pipe_{images}img_20steps_ms"), millis(t));
            return Ok(());
        }
        _ => tiny_inference_workloads(json, &model, n)?,
    }
    println!(
        "\n== D3PO LoRA training step, tiny: one pair (2 images x CFG), policy fwd+bwd + reference fwd =="
    );
    let req = SampleRequest {
        num_images: 2,
        seed: 5,
        steps: 20,
        guidance_scale: 5.0,
        eta: 1.0,
        width: 64,
        height: 64,
        shared_noise: false,
    };
    let cond = model.conditioning("a small red circle on a blue background", "")?;
    let gen_ = model
        .generate(
            std::slice::from_ref(&req),
            std::slice::from_ref(&cond),
            AdapterChoice::default(),
            &mut |_, _| true,
        )?
        .remove(0);
    let (line, step) = train_step(model.denoiser(), &gen_.trajectories, n)?;
    println!("{line}");
    json.insert("d3po_pair_timestep_ms".into(), millis(step));
    Ok(())
}

/// The tiny UNet's forwards, the tiny and built-in pipelines, and recording.
fn tiny_inference_workloads(
    json: &mut serde_json::Map<String, serde_json::Value>,
    model: &DiffusionModel,
    n: usize,
) -> anyhow::Result<()> {
    println!("\n== UNet forward, tiny config (32x32 latent, 77 tokens), inference ==");
    let tiny = UNet2DConditionModel::new(
        &UNetConfig::tiny(),
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    for batch in [1, 2, 4, 8] {
        let t = unet_forward(&tiny, batch, 32, 77, n * 4);
        println!("batch {batch}: {}", ms(t));
        json.insert(format!("tiny_unet_fwd_b{batch}_ms"), millis(t));
    }

    println!(
        "\n== 20-step generation, tiny pipeline, CFG 5, eta 1, 64x64 px (recording on, prompt encoding included) =="
    );
    for images in [1, 4] {
        let t = time_generation(model, images, n, 5.0);
        println!("{images} image(s): {}", ms(t));
        json.insert(format!("tiny_pipe_{images}img_20steps_ms"), millis(t));
    }

    println!(
        "\n== 20-step generation, built-in trained model, CFG 5, eta 1, 64x64 px (prompt encoding included) =="
    );
    let builtin = imagegen_server::builtin::load(DType::F32, &Device::Cpu)?;
    for images in [1, 4] {
        println!(
            "{images} image(s): {}",
            ms(time_generation(&builtin, images, n, 5.0))
        );
    }
    // What a client gets by default: one image at the built-in model's own guidance.
    let t = time_generation(&builtin, 1, n, imagegen_server::builtin::GUIDANCE_SCALE);
    println!(
        "1 image at its default guidance {}: {}",
        imagegen_server::builtin::GUIDANCE_SCALE,
        ms(t)
    );
    json.insert("builtin_1img_20steps_ms".into(), millis(t));
    drop(builtin);

    let latents = randn(&[4, 4, 32, 32], 6);
    println!(
        "VAE decode of 4 latents (part of the above): {}",
        ms(time(n, || model.vae.decode_rgb8(&latents).expect("decode")))
    );

    println!("\n== cost of recording (per 20-step generation of 4 images) ==");
    let lat = randn(&[4, 4, 32, 32], 3);
    let mu = randn(&[4, 4, 32, 32], 4);
    let snaps: Vec<Tensor> = (0..21).map(|i| randn(&[4, 4, 32, 32], 10 + i)).collect();
    let record = time(n * 4, || {
        for _ in 0..20 {
            let lp = log_prob(&lat, &mu, &[0.5; 4])
                .expect("logp")
                .to_vec1::<f32>()
                .expect("vec");
            std::hint::black_box(lp);
        }
        let chains = Tensor::stack(&snaps, 1).expect("stack");
        (0..4)
            .map(|i| chains.get(i).expect("get"))
            .collect::<Vec<_>>()
    });
    println!(
        "log-probs + latent snapshots + chain assembly: {}",
        ms(record)
    );

    Ok(())
}

/// Median time of a 20-step, 64x64 generation of `images` images at `guidance`, prompt encoding
/// included.
fn time_generation(model: &DiffusionModel, images: usize, n: usize, guidance: f32) -> Duration {
    let req = SampleRequest {
        num_images: images,
        seed: 1,
        steps: 20,
        guidance_scale: f64::from(guidance),
        eta: 1.0,
        width: 64,
        height: 64,
        shared_noise: false,
    };
    time(n, || {
        let cond = model
            .conditioning("a small red circle on a blue background", "")
            .expect("encode");
        model
            .generate(
                std::slice::from_ref(&req),
                std::slice::from_ref(&cond),
                AdapterChoice::default(),
                &mut |_, _| true,
            )
            .expect("generate")
    })
}

fn sd15_unet() -> anyhow::Result<UNet2DConditionModel> {
    let start = Instant::now();
    let sd = UNet2DConditionModel::new(
        &UNetConfig::sd15(),
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    println!("(built in {:.1} s)", start.elapsed().as_secs_f64());
    Ok(sd)
}

/// The environment variable that makes the bench one training workload's child process.
const TRAINING_CHILD: &str = "IMAGEGEN_BENCH_SD15_TRAINING";

/// Runs an SD-1.5 training workload in a fresh process of this bench, so that its peak RSS is
/// its own (weights included, as the peer's is): the parent's freed buffers would count in it.
fn sd15_training_in_child(
    workload: &str,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env(TRAINING_CHILD, workload)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut result = serde_json::Map::new();
    for line in stdout.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => result = map,
            _ => println!("{line}"),
        }
    }
    if !out.status.success() {
        anyhow::bail!("the {workload} training workload failed: {}", out.status);
    }
    Ok(result)
}

/// One SD-1.5 training workload: `lora`, the peer's `sd15_lora_fwd_bwd_b2_64` (LoRA r4 on every
/// attention projection, batch 2, `mean(y^2)` backward), or `d3po`, one D3PO step per time index
/// (one pair, CFG: 4 UNet rows for the reference and 4 for the policy). Prints its JSON.
fn sd15_training_child(workload: &str) -> anyhow::Result<()> {
    let sd = sd15_unet()?;
    let mut json = serde_json::Map::new();
    let peak = || imagegen_server::allocator::peak_rss_mib();
    let shown = |p: Option<f64>| p.map_or("?".into(), |p| format!("{p:.0}"));
    match workload {
        "lora" => {
            let mut rng = StdRng::seed_from_u64(11);
            let lora = TrainableLora::init(
                sd.lora_targets(),
                4,
                4.0,
                &imagegen_server::model::lora::TARGET_MODULES,
                &Device::Cpu,
                || StandardNormal.sample(&mut rng),
            )?;
            let x = randn(&[2, 4, 64, 64], 12);
            let ctx = randn(&[2, 77, 768], 13);
            let t = time(1, || {
                let y = sd
                    .forward(
                        &x,
                        &[501.0; 2],
                        &ctx,
                        &AdapterBatch::Uniform(Some(&lora.weights)),
                        Mode::Training,
                    )
                    .expect("forward");
                y.sqr()
                    .and_then(|y| y.mean_all())
                    .and_then(|l| l.backward())
                    .expect("backward")
            });
            println!(
                "LoRA forward+backward, batch 2: {}   peak RSS {} MiB",
                ms(t),
                shown(peak())
            );
            json.insert("sd15_lora_fwd_bwd_b2_64_ms".into(), millis(t));
            json.insert("sd15_lora_fwd_bwd_b2_64_peak_rss_mib".into(), peak().into());
        }
        "d3po" => {
            let scheduler = imagegen_server::sampler::SchedulerConfig::default();
            let schedule = imagegen_server::sampler::DdimSchedule::new(&scheduler, 20)?;
            let embedding = |seed| std::sync::Arc::new(randn(&[1, 77, 768], seed));
            let chain = |seed: u64| imagegen_server::sampler::Trajectory {
                latents: randn(&[21, 4, 64, 64], seed),
                timesteps: schedule.steps().iter().map(|s| s.t).collect(),
                log_probs: vec![0.0; 20],
                conditioning: imagegen_server::sampler::Conditioning {
                    prompt: "a photo".into(),
                    negative_prompt: String::new(),
                    prompt_embeddings: embedding(seed + 1),
                    negative_embeddings: embedding(seed + 2),
                },
                guidance_scale: 7.5,
                eta: 1.0,
                seed,
                image_index: 0,
                model_id: "sd15-random".into(),
                adapter_generation: None,
            };
            let denoiser = imagegen_server::sampler::Denoiser {
                unet: &sd,
                scheduler: &scheduler,
                micro_batch_rows: imagegen_server::model::DevicePlan::for_device(&Device::Cpu)
                    .micro_batch_rows,
            };
            let (line, step) = train_step(denoiser, &[chain(20), chain(30)], 1)?;
            println!("D3PO {line}   peak RSS {} MiB", shown(peak()));
            json.insert("sd15_d3po_pair_timestep_64_ms".into(), millis(step));
            json.insert(
                "sd15_d3po_pair_timestep_64_peak_rss_mib".into(),
                peak().into(),
            );
        }
        other => anyhow::bail!("unknown training workload {other}"),
    }
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

fn train_step(
    denoiser: imagegen_server::sampler::Denoiser<'_>,
    trajectories: &[imagegen_server::sampler::Trajectory],
    n: usize,
) -> anyhow::Result<(String, Duration)> {
    let targets = denoiser.unet.lora_targets().to_vec();
    let mut rng = StdRng::seed_from_u64(9);
    let lora = TrainableLora::init(
        &targets,
        4,
        4.0,
        &["to_q", "to_k", "to_v", "to_out.0"],
        &Device::Cpu,
        || StandardNormal.sample(&mut rng),
    )?;
    let reference = lora.weights.detached()?;
    let items = [(&trajectories[0], 10usize), (&trajectories[1], 10usize)];
    let batch = TransitionBatch::new(denoiser, &items)?;
    let sigmas = batch.sigmas();
    let cfg = D3poLossConfig::default();
    let mut fwd = Duration::ZERO;
    let step = time(n, || {
        let start = Instant::now();
        let (mu_ref, _) = batch
            .policy_mean(
                denoiser,
                &AdapterBatch::Uniform(Some(&reference)),
                Mode::Training,
            )
            .expect("ref");
        let (mu, _) = batch
            .policy_mean(
                denoiser,
                &AdapterBatch::Uniform(Some(&lora.weights)),
                Mode::Training,
            )
            .expect("policy");
        let delta = log_ratio(&batch.x_prev, &mu, &mu_ref.detach(), &sigmas).expect("delta");
        let loss = d3po_loss(
            &delta.narrow(0, 0, 1).expect("w"),
            &delta.narrow(0, 1, 1).expect("l"),
            &cfg,
        )
        .expect("loss");
        fwd = start.elapsed();
        loss.sum_all().expect("sum").backward().expect("backward")
    });
    Ok((
        format!(
            "step (fwd ref + fwd policy + loss + backward): {}   of which forwards: {}",
            ms(step),
            ms(fwd)
        ),
        step,
    ))
}
