//! The JetStream store against a real nats-server (Debian's 2.9 in CI): an SD-1.5-size chain
//! crosses the 1 MB message limit in chunks and comes back exact; feedback is checked,
//! deduplicated and replayed into a trainer's index.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use super::{JetStreamStore, Nats, NatsMetrics, NatsOptions};
use crate::sampler::{Conditioning, Trajectory};
use crate::store::buffer::BufferError;
use crate::store::{FeedbackKind, LearningStore, NewFeedback, Rater, StoreError, StoreMetrics};

/// A throwaway nats-server with JetStream, killed when dropped.
struct NatsServer(Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl NatsServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let binary = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is needed (apt-get install nats-server)");
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child, port, dir)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn open(server: &NatsServer, replay: bool) -> Arc<JetStreamStore> {
    let registry = crate::metrics::Metrics::new().unwrap();
    let nats_metrics = NatsMetrics::register(&registry.registry).unwrap();
    let options = NatsOptions {
        url: format!("nats://127.0.0.1:{}", server.1),
        creds: None,
        stream_bytes: 1 << 30,
    };
    let nats = Nats::connect(&options, nats_metrics).await.unwrap();
    let metrics = StoreMetrics::register(&registry).unwrap();
    let retention = Duration::from_secs(3600);
    JetStreamStore::open(nats, 1 << 30, retention, replay, &Device::Cpu, metrics)
        .await
        .unwrap()
}

/// One SD-1.5-size chain (21 latents of 4x64x64 f32: 1.38 MB) and a small one.
fn group(prefix: &str) -> Vec<(String, Arc<Trajectory>)> {
    let emb = Arc::new(Tensor::ones((1, 77, 8), DType::F32, &Device::Cpu).unwrap());
    let conditioning = Conditioning {
        prompt: "a red circle".into(),
        negative_prompt: String::new(),
        prompt_embeddings: emb.clone(),
        negative_embeddings: emb,
    };
    [(21, 64), (3, 4)]
        .into_iter()
        .enumerate()
        .map(|(i, (steps, side))| {
            let n = steps * 4 * side * side;
            let values: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin()).collect();
            let latents = Tensor::from_vec(values, (steps, 4, side, side), &Device::Cpu).unwrap();
            let chain = Trajectory {
                latents,
                timesteps: (0..steps - 1).rev().collect(),
                log_probs: vec![-1.25; steps - 1],
                conditioning: conditioning.clone(),
                guidance_scale: 7.5,
                eta: 1.0,
                seed: 42 + i as u64,
                image_index: i,
                model_id: "sd15-size".into(),
                adapter_generation: Some("gen-1".into()),
            };
            (format!("{prefix}-{i}"), Arc::new(chain))
        })
        .collect()
}

fn feedback(image: &str, kind: FeedbackKind, key: &str, body: &str) -> NewFeedback {
    NewFeedback {
        image_id: image.into(),
        kind,
        rater: Rater::Named("alice".into()),
        idempotency: (!key.is_empty()).then(|| (format!("scope-{key}"), body.into())),
        idempotency_key: key.into(),
        feedback_id: format!("fb-{key}-{body}"),
    }
}

/// Runs a blocking store call off the runtime (the store waits on the runtime itself).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_over_the_message_limit_and_its_feedback_reach_the_trainer_exactly() {
    let server = NatsServer::start();
    let serving = open(&server, false).await;
    let images = group("a");
    let store = serving.clone();
    let sent = images.clone();
    blocking(move || store.record("g1", sent)).await.unwrap();
    let store = serving.clone();
    blocking(move || store.record("g2", group("b")))
        .await
        .unwrap();
    assert!(
        serving.chunk_bytes < 1 << 20,
        "chunks stay below the default 1 MB payload"
    );

    let store = serving.clone();
    let (first, retry, reused, unknown, across) = blocking(move || {
        let prefer = FeedbackKind::PreferredOver("b-1".into());
        (
            store.feedback(&feedback("b-0", prefer.clone(), "k1", "body")),
            store.feedback(&feedback("b-0", prefer.clone(), "k1", "body")),
            store.feedback(&feedback("b-0", FeedbackKind::BestOf, "k1", "other")),
            store.feedback(&feedback("nope", FeedbackKind::BestOf, "", "")),
            store.feedback(&feedback(
                "b-0",
                FeedbackKind::PreferredOver("a-1".into()),
                "",
                "",
            )),
        )
    })
    .await;
    let first = first.unwrap();
    assert_eq!(first.group_id, "g2");
    assert_eq!(first.adapter_generation, "gen-1");
    let retry = retry.unwrap();
    assert!(retry.duplicate && retry.feedback_id == first.feedback_id);
    assert!(matches!(
        reused,
        Err(StoreError::Rejected(BufferError::KeyReused(_)))
    ));
    assert!(matches!(
        unknown,
        Err(StoreError::Rejected(BufferError::UnknownImage(_)))
    ));
    assert!(matches!(
        across,
        Err(StoreError::Rejected(BufferError::DifferentGroups(..)))
    ));

    // A trainer started afterwards replays everything.
    let trainer = open(&server, true).await;
    let mut snapshot = Vec::new();
    for _ in 0..500 {
        let store = trainer.clone();
        snapshot = blocking(move || store.groups(true)).await.unwrap();
        if snapshot.len() == 2 && snapshot[1].group.comparisons.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(snapshot.len(), 2, "both groups replayed");
    assert!(
        trainer
            .caught_up()
            .load(std::sync::atomic::Ordering::Acquire)
    );
    let replayed = &snapshot[0].images[0].trajectory;
    let diff = (&replayed.latents - &images[0].1.latents)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "latents are stored exactly (f32)");
    assert_eq!(replayed.latents.dims(), &[21, 4, 64, 64]);
    assert_eq!(replayed.timesteps, images[0].1.timesteps);
    assert_eq!(
        snapshot[1].group.comparisons.len(),
        1,
        "the retry was deduplicated"
    );
    assert_eq!(snapshot[1].group.comparisons[0].winner, "b-0");
}
