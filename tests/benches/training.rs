//! Training benchmark: prints figures, asserts nothing.
//!
//! - one D3PO update per pair and per time index, tiny pipeline (20-step chains) and an
//!   SD-1.5-size UNet (random weights, 64x64 latent, two time indices) with the peak RSS;
//! - adapter swap latency (in memory, and persisted to a store);
//! - serving p50/p99 at concurrency 4 without and with a training round running.
//!
//! `BENCH_SD15=0` skips the SD-1.5-size step.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use imagegen_proto::v1 as pb;
use imagegen_server::adapters::AdapterRegistry;
use imagegen_server::model::seeded::SeededWeights;
use imagegen_server::model::{
    AdapterBatch, LoraWeights, Mode, TrainableLora, UNet2DConditionModel, UNetConfig,
};
use imagegen_server::sampler::{
    DdimSchedule, PredictionType, SchedulerConfig, StepConstants, guided_mean, log_ratio,
};
use imagegen_tests::TestServer;
use pb::feedback_request::Feedback;
use plugin_d3po::{D3poTrainer, StepPolicy, TrainConfig};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn randn(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// A chain of random latents over a 20-step schedule with random conditioning.
struct Chain {
    latents: Vec<Tensor>,
    context: Tensor,
}

/// A UNet with a trainable LoRA as a D3PO policy over synthetic chains.
struct Policy<'a> {
    unet: &'a UNet2DConditionModel,
    steps: &'a [StepConstants],
    policy: &'a LoraWeights,
    reference: Option<&'a LoraWeights>,
}

impl StepPolicy for Policy<'_> {
    type Item = Chain;

    fn steps(&self, c: &Chain) -> usize {
        c.latents.len() - 1
    }

    fn log_ratios(&self, batch: &[(&Chain, usize)]) -> plugin_d3po::Result<Tensor> {
        let x_t = Tensor::stack(
            &batch
                .iter()
                .map(|(c, j)| c.latents[*j].clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let x_prev = Tensor::stack(
            &batch
                .iter()
                .map(|(c, j)| c.latents[j + 1].clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let steps: Vec<StepConstants> = batch.iter().map(|(_, j)| self.steps[*j]).collect();
        let negatives: Vec<Tensor> = batch.iter().map(|(c, _)| c.context.clone()).collect();
        let context = Tensor::cat(&[negatives.clone(), negatives].concat(), 0)?;
        let g = vec![5.0; batch.len()];
        let eta = vec![1.0; batch.len()];
        let run = |w: Option<&LoraWeights>| {
            guided_mean(
                self.unet,
                PredictionType::Epsilon,
                &x_t,
                &steps,
                &context,
                &g,
                &eta,
                &AdapterBatch::Uniform(w),
                Mode::Training,
                usize::MAX,
            )
            .map_err(|e| plugin_d3po::D3poError::Policy(e.to_string()))
        };
        let (mu, sigmas) = run(Some(self.policy))?;
        let (mu_ref, _) = run(self.reference)?;
        log_ratio(&x_prev, &mu, &mu_ref.detach(), &sigmas)
            .map_err(|e| plugin_d3po::D3poError::Policy(e.to_string()))
    }
}

fn update_time(config: &UNetConfig, side: usize, label: &str) -> anyhow::Result<()> {
    let unet = UNet2DConditionModel::new(
        config,
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    let schedule = DdimSchedule::new(&SchedulerConfig::default(), 20)?;
    let mut rng = StdRng::seed_from_u64(1);
    let chain = |rng: &mut StdRng| Chain {
        latents: (0..21).map(|_| randn(&[4, side, side], rng)).collect(),
        context: randn(&[1, 77, config.cross_attention_dim], rng),
    };
    let (w, l) = (chain(&mut rng), chain(&mut rng));
    let targets = unet.lora_targets().to_vec();
    let lora = TrainableLora::init(
        &targets,
        4,
        4.0,
        &["to_q", "to_k", "to_v", "to_out.0"],
        &Device::Cpu,
        || StandardNormal.sample(&mut rng),
    )?;
    let reference = lora.weights.detached()?;
    let policy = Policy {
        unet: &unet,
        steps: schedule.steps(),
        policy: &lora.weights,
        reference: Some(&reference),
    };
    // Two time indices per pair keep the SD-size run short; the cost is linear in them.
    let fraction = if side > 32 || config.block_out_channels[0] > 64 {
        0.1
    } else {
        1.0
    };
    let mut trainer = D3poTrainer::new(
        lora.vars.clone(),
        TrainConfig {
            timestep_fraction: fraction,
            ..TrainConfig::default()
        },
        0,
    )?;
    let start = Instant::now();
    let outcome = trainer.train_pair(&policy, &w, &l, &mut || {})?;
    let took = start.elapsed();
    println!(
        "{label}: one pair, {} time indices: {:.2} s  ->  {:.0} ms per time index (2 chains x CFG = 4 UNet rows, policy fwd+bwd, reference fwd)",
        outcome.steps,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / outcome.steps as f64
    );
    Ok(())
}

fn swap_latency() -> anyhow::Result<()> {
    let unet = UNet2DConditionModel::new(
        &UNetConfig::tiny(),
        SeededWeights::new(0).var_builder(DType::F32, &Device::Cpu),
    )?;
    let targets = unet.lora_targets().to_vec();
    let mut rng = StdRng::seed_from_u64(3);
    let dir = tempfile::tempdir()?;
    for (label, store) in [("in memory", None), ("persisted", Some(dir.path()))] {
        let registry = AdapterRegistry::open(targets.clone(), "bench", &Device::Cpu, store)?;
        let mut ids = Vec::new();
        for _ in 0..2 {
            let lora = TrainableLora::init(
                &targets,
                4,
                4.0,
                &["to_q", "to_k", "to_v", "to_out.0"],
                &Device::Cpu,
                || StandardNormal.sample(&mut rng),
            )?;
            ids.push(
                registry
                    .publish(lora.weights.detached()?, None, "trained", None, vec![])?
                    .meta
                    .id
                    .clone(),
            );
        }
        let mut live: Option<String> = None;
        let n = 50;
        let start = Instant::now();
        for i in 0..n {
            let next = ids[i % 2].clone();
            registry.activate(Some(&next), live.as_deref(), "bench")?;
            live = Some(next);
        }
        println!(
            "adapter swap ({label}): {:.3} ms",
            start.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    Ok(())
}

async fn load(t: &TestServer, requests: usize) -> (Duration, Duration) {
    let per = requests / 4;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = t.generator();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..per {
                    let r = pb::GenerateRequest {
                        prompt: "load".into(),
                        seed: Some((w * 100 + i) as u64),
                        steps: Some(4),
                        ..Default::default()
                    };
                    let s = Instant::now();
                    client.generate(r).await.expect("generate");
                    lat.push(s.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    all.sort();
    (all[all.len() / 2], all[(all.len() - 1) * 99 / 100])
}

fn main() -> anyhow::Result<()> {
    update_time(&UNetConfig::tiny(), 32, "tiny UNet, 32x32 latent")?;
    if std::env::var("BENCH_SD15")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        // SD-1.5 at the size people use (64x64 latent, 512 px): the training forward
        // checkpoints every resnet and transformer and the attention recomputes its
        // probabilities in the backward, so the 4 rows fit in PyTorch's memory for 2.
        // BENCH_SD15_SIDE picks another latent side.
        let side = std::env::var("BENCH_SD15_SIDE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        update_time(
            &UNetConfig::sd15(),
            side,
            &format!("SD-1.5-size UNet, {side}x{side} latent"),
        )?;
        println!(
            "peak RSS of the process so far (weights included): {} MiB",
            imagegen_server::allocator::peak_rss_mib().map_or("?".into(), |p| format!("{p:.0}"))
        );
    }
    swap_latency()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let t = TestServer::start(|c| {
            c.plugins.d3po.min_pairs = 1_000_000;
            c.plugins.d3po.heldout_fraction = 0.0;
        })
        .await?;
        let (p50, p99) = load(&t, 24).await;
        println!("serving, concurrency 4, no training:     p50 {:7.0} ms  p99 {:7.0} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
        // Feedback for a round of 12 pairs (20-step chains), then load while it trains.
        let mut client = t.generator();
        for g in 0..12 {
            let r = pb::GenerateRequest { prompt: "pairs".into(), seed: Some(500 + g), steps: Some(20), num_images: Some(2), ..Default::default() };
            let r = client.generate(r).await?.into_inner();
            let (a, b) = (&r.images[0], &r.images[1]);
            client
                .submit_feedback(pb::FeedbackRequest {
                    image_id: a.image_id.clone(),
                    feedback_token: a.feedback_token.clone(),
                    feedback: Some(Feedback::PreferredOver(b.image_id.clone())),
                    ..Default::default()
                })
                .await?;
        }
        t.adapters().trigger_training(pb::TriggerTrainingRequest {}).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (p50, p99) = load(&t, 24).await;
        let status = t.adapters().get_training_status(pb::GetTrainingStatusRequest {}).await?.into_inner();
        println!("serving, concurrency 4, training round:  p50 {:7.0} ms  p99 {:7.0} ms  (trainer state after: {})", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3, status.state);
        loop {
            let s = t.adapters().get_training_status(pb::GetTrainingStatusRequest {}).await?.into_inner();
            if s.rounds_published + s.rounds_rejected > 0 {
                println!("training round of 12 pairs x 20 steps (yielding to serving): {:.1} s, {:.0} ms per pair-step", s.last_round_seconds, s.last_round_seconds * 1e3 / (12.0 * 20.0));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok::<_, anyhow::Error>(())
    })
}
