//! Serving benchmark: prints figures, asserts nothing.
//!
//! Requests/s and p50/p99 latency through the real gRPC server at concurrency 1, 4 and 16,
//! beside direct in-process pipeline calls (the server's overhead), and the batching gain
//! (max-batch 8 against 1 at concurrency 16). Tiny random-weight model (what `TestServer` serves), 64x64, one image per request.
//! `BENCH_STEPS` (default 4) and `BENCH_REQUESTS` (default 32 per configuration) tune the run.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use imagegen_proto::v1 as pb;
use imagegen_server::pipeline::{AdapterChoice, SampleRequest};
use imagegen_tests::TestServer;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn summarise(mut latencies: Vec<Duration>, wall: Duration) -> Figures {
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Figures {
        per_second: latencies.len() as f64 / wall.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label:<34} {:7.2} req/s   p50 {:8.1} ms   p99 {:8.1} ms",
        f.per_second,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3
    );
}

async fn through_grpc(
    server: &TestServer,
    concurrency: usize,
    total: usize,
    steps: u32,
) -> Figures {
    let started = Instant::now();
    let per_worker = total.div_ceil(concurrency);
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let mut client = server.generator();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let request = pb::GenerateRequest {
                        prompt: format!("a small red circle on a blue background {}", i % 4),
                        seed: Some((w * 1000 + i) as u64),
                        steps: Some(steps),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    client.generate(request).await.expect("generate");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.expect("worker"));
    }
    summarise(latencies, started.elapsed())
}

/// mimalloc keeps freed pages for reuse: glibc's malloc returns large tensor buffers to the OS
/// and page-faults them back in on every forward (30% of a batch-16 UNet step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let steps = env("BENCH_STEPS", 4);
    let total = env("BENCH_REQUESTS", 32);
    println!(
        "tiny model, 64x64, 1 image/request, {steps} steps, {total} requests per configuration, {} threads",
        candle_core::utils::get_num_threads()
    );

    // Direct, in-process pipeline calls: the floor the server adds to.
    let dir = tempfile::tempdir()?;
    imagegen_server::tiny::write_tiny_model(dir.path(), 0)?;
    let model =
        imagegen_server::pipeline::DiffusionModel::load(dir.path(), DType::F32, &Device::Cpu)?;
    let cond = model.conditioning("a small red circle on a blue background", "")?;
    let mut latencies = Vec::new();
    let started = Instant::now();
    for i in 0..total.min(16) {
        let req = SampleRequest {
            num_images: 1,
            seed: i as u64,
            steps,
            guidance_scale: 5.0,
            eta: 1.0,
            width: 64,
            height: 64,
            shared_noise: false,
        };
        let t = Instant::now();
        model.generate(
            std::slice::from_ref(&req),
            std::slice::from_ref(&cond),
            AdapterChoice::default(),
            &mut |_, _| true,
        )?;
        latencies.push(t.elapsed());
    }
    let direct = summarise(latencies, started.elapsed());
    print("in-process pipeline (sequential)", &direct);
    drop(model);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = TestServer::start(|c| {
            c.max_batch = 8;
            c.batch_wait_ms = 10;
        })
        .await?;
        let mut at16 = None;
        for concurrency in [1, 4, 16] {
            let f = through_grpc(&server, concurrency, total, steps as u32).await;
            print(&format!("gRPC, max-batch 8, concurrency {concurrency}"), &f);
            if concurrency == 1 {
                println!(
                    "  server overhead at concurrency 1: {:+.1} ms per request (p50)",
                    (f.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e3
                );
            }
            if concurrency == 16 {
                at16 = Some(f);
            }
        }
        server.server.stop();
        server.server.wait().await.map_err(anyhow::Error::msg)?;

        let unbatched = TestServer::start(|c| c.max_batch = 1).await?;
        let f = through_grpc(&unbatched, 16, total, steps as u32).await;
        print("gRPC, max-batch 1, concurrency 16", &f);
        if let Some(batched) = at16 {
            println!(
                "batching gain at concurrency 16: {:.2}x requests/s",
                batched.per_second / f.per_second
            );
        }
        unbatched.server.stop();
        unbatched.server.wait().await.map_err(anyhow::Error::msg)?;
        Ok::<_, anyhow::Error>(())
    })
}
