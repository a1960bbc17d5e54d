//! Durability benchmark: prints figures, asserts nothing.
//!
//! The cost of "acknowledged means durable": Generate at concurrency 4 on the tiny model with the
//! embedded store (redb, fsync per commit) and with JetStream (a local nats-server with file
//! storage, started here) against `--ephemeral`, run alternately twice so drift shows;
//! SubmitFeedback latency (p50/p99, one client) and throughput (8 clients); and the store's own
//! commit time (p50/p99 from `imagegen_store_commit_seconds`). `BENCH_REQUESTS` (default 32) and
//! `BENCH_FEEDBACK` (default 400) tune the run.

use std::time::{Duration, Instant};

use imagegen_proto::v1 as pb;
use imagegen_tests::TestServer;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

/// Generate at concurrency 4; returns (requests/s, p50 ms, p99 ms) and every image with its token.
async fn generate(server: &TestServer, total: usize) -> ((f64, f64, f64), Vec<pb::GeneratedImage>) {
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = server.generator();
            tokio::spawn(async move {
                let mut out = (Vec::new(), Vec::new());
                for i in 0..total / 4 {
                    let request = pb::GenerateRequest {
                        prompt: format!("a small red circle on a blue background {}", i % 4),
                        seed: Some((w * 1000 + i) as u64),
                        steps: Some(4),
                        num_images: Some(2),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let response = client.generate(request).await.expect("generate");
                    out.0.push(t.elapsed());
                    out.1.extend(response.into_inner().images);
                }
                out
            })
        })
        .collect();
    let (mut latencies, mut images) = (Vec::new(), Vec::new());
    for w in workers {
        let (l, i) = w.await.expect("worker");
        latencies.extend(l);
        images.extend(i);
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort();
    let figures = (
        latencies.len() as f64 / wall,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
    );
    (figures, images)
}

fn vote(image: &pb::GeneratedImage, n: usize) -> pb::FeedbackRequest {
    let vote = if n.is_multiple_of(2) {
        pb::Vote::Up
    } else {
        pb::Vote::Down
    };
    pb::FeedbackRequest {
        image_id: image.image_id.clone(),
        feedback_token: image.feedback_token.clone(),
        feedback: Some(pb::feedback_request::Feedback::Vote(vote as i32)),
        ..Default::default()
    }
}

/// Feedback: (p50 ms, p99 ms) one at a time, then feedback/s from 8 clients.
async fn feedback(
    server: &TestServer,
    images: &[pb::GeneratedImage],
    total: usize,
) -> (f64, f64, f64) {
    let mut client = server.generator();
    let mut latencies = Vec::with_capacity(total);
    for n in 0..total {
        let t = Instant::now();
        client
            .submit_feedback(vote(&images[n % images.len()], n))
            .await
            .expect("feedback");
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let mut client = server.generator();
            let images = images.to_vec();
            tokio::spawn(async move {
                for n in 0..total / 8 {
                    let image = &images[(w * 31 + n) % images.len()];
                    client
                        .submit_feedback(vote(image, n))
                        .await
                        .expect("feedback");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let per_second = (total / 8 * 8) as f64 / started.elapsed().as_secs_f64();
    (
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        per_second,
    )
}

/// p50 and p99 commit time in ms of `what`, interpolated in the histogram's buckets as
/// Prometheus' `histogram_quantile` does.
async fn commit_ms(server: &TestServer, what: &str) -> Option<(f64, f64)> {
    let text = server.scrape().await.ok()?;
    let label = format!("what=\"{what}\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("imagegen_store_commit_seconds_bucket") && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    let quantile = |q: f64| {
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, count) in &buckets {
            if count >= rank {
                if le.is_infinite() {
                    return lower * 1e3;
                }
                let share = if count > below {
                    (rank - below) / (count - below)
                } else {
                    1.0
                };
                return (lower + (le - lower) * share) * 1e3;
            }
            (lower, below) = (le, count);
        }
        lower * 1e3
    };
    (total > 0.0).then(|| (quantile(0.5), quantile(0.99)))
}

/// A nats-server with JetStream on a free port, for the `jetstream` runs.
struct Nats(
    std::process::Child,
    String,
    #[allow(dead_code)] tempfile::TempDir,
);

impl Nats {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let binary = ["/usr/sbin/nats-server", "nats-server"]
            .into_iter()
            .find(|b| !b.starts_with('/') || std::path::Path::new(b).exists())
            .unwrap_or("nats-server");
        let child = std::process::Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self(child, format!("nats://127.0.0.1:{port}"), dir))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let requests = env("BENCH_REQUESTS", 32);
    let votes = env("BENCH_FEEDBACK", 400);
    println!(
        "tiny model, 2 images/request, 4 steps, concurrency 4, {requests} requests; {votes} feedback per run"
    );
    let backends = ["ephemeral", "embedded", "jetstream"];
    let mut generate_rates = vec![Vec::new(); backends.len()];
    for round in 0..2 {
        for (k, name) in backends.into_iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let nats = (name == "jetstream").then(Nats::start).transpose()?;
            let server = TestServer::start(|c| {
                c.max_queue = 64;
                c.plugins.d3po.enabled = false;
                match name {
                    "embedded" => c.data_dir = Some(dir.path().to_path_buf()),
                    "jetstream" => c.scale_out.nats_url = nats.as_ref().map(|n| n.1.clone()),
                    _ => {}
                }
            })
            .await?;
            let ((rate, p50, p99), images) = generate(&server, requests).await;
            generate_rates[k].push(rate);
            let (f50, f99, fps) = feedback(&server, &images, votes).await;
            println!(
                "run {round} {name:<9}  Generate {rate:6.2} req/s p50 {p50:7.1} ms p99 {p99:7.1} ms | \
                 SubmitFeedback p50 {f50:6.2} ms p99 {f99:6.2} ms, {fps:7.0}/s with 8 clients"
            );
            if name != "ephemeral" {
                let show = |f: Option<(f64, f64)>| {
                    f.map_or("-".to_string(), |(p50, p99)| {
                        format!("p50 {p50:.2} ms p99 {p99:.2} ms")
                    })
                };
                println!(
                    "             commit: trajectories {}, feedback {}",
                    show(commit_ms(&server, "trajectories").await),
                    show(commit_ms(&server, "feedback").await)
                );
            }
            server.server.stop();
            server.server.wait().await.map_err(anyhow::Error::msg)?;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (k, name) in backends.into_iter().enumerate().skip(1) {
        let cost = 1.0 - mean(&generate_rates[k]) / mean(&generate_rates[0]);
        println!(
            "durability cost on Generate throughput, {name}: {:.1}% (against ephemeral, mean of 2 runs each)",
            cost * 100.0
        );
    }
    Ok(())
}
