//! Scale-out on NATS JetStream, as separate processes: a real `nats-server` (Debian's package,
//! installed by `scripts/install-test-tools.sh`) on a free loopback port with JetStream in a
//! temporary folder, serving replicas and trainers started from the binary.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Spawned, connect, metric, spawn_server};
use imagegen_proto::v1 as pb;
use pb::adapters_client::AdaptersClient;
use pb::image_generator_client::ImageGeneratorClient;
use tonic::transport::Channel;

const KEY: &str = "sk-scale-out-test-key";

/// A nats-server with JetStream, stopped when dropped.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        server.run();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let binary = ["nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("nats-server is needed (apt-get install nats-server; scripts/install-test-tools.sh does it)");
        let child = Command::new(binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A clean stop (SIGTERM), as an operator's restart does.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            child.wait().unwrap();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn with_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request
}

/// A process of the cluster; no `--feedback-secret`: the replicas share a generated one.
fn replica(nats: &NatsServer, role: &str, extra: &[&str]) -> Spawned {
    let keys = format!("generate,feedback,admin {KEY}");
    let url = nats.url();
    let mut args = vec![
        "--ephemeral",
        "--nats-url",
        &url,
        "--role",
        role,
        "--api-keys",
        &keys,
        "--trainer-lease-secs",
        "3",
        "--d3po-interval-secs",
        "3600",
        "--d3po-min-pairs",
        "1",
        "--d3po-heldout-fraction",
        "0",
        "--d3po-gate-margin",
        "-1",
        // The gate is not under test here: every round must publish.
        "--d3po-max-drift",
        "0",
    ];
    args.extend_from_slice(extra);
    spawn_server(&args)
}

fn kill_9(mut s: Spawned) {
    s.child.kill().unwrap();
    s.child.wait().unwrap();
}

async fn generate(channel: &Channel, prompt: &str) -> pb::GenerateResponse {
    ImageGeneratorClient::new(channel.clone())
        .generate(with_key(pb::GenerateRequest {
            prompt: prompt.into(),
            num_images: Some(4),
            steps: Some(4),
            seed: Some(5),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

fn best_of(image_id: &str) -> pb::FeedbackRequest {
    pb::FeedbackRequest {
        image_id: image_id.into(),
        rater_id: "alice".into(),
        feedback: Some(pb::feedback_request::Feedback::BestOf(pb::BestOf {})),
        ..Default::default()
    }
}

async fn status(channel: &Channel) -> pb::TrainingStatus {
    AdaptersClient::new(channel.clone())
        .get_training_status(with_key(pb::GetTrainingStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
}

async fn live(channel: &Channel) -> String {
    ImageGeneratorClient::new(channel.clone())
        .get_info(with_key(pb::GetInfoRequest {}))
        .await
        .unwrap()
        .into_inner()
        .live_adapter
}

/// Waits (generously: no speed is asserted) until `series` on `metrics` reads `value`.
async fn await_metric(metrics: &str, series: &str, value: f64) {
    for _ in 0..1200 {
        if metric(metrics, series).await == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never reached {value}");
}

/// Four requests of four images on `generator`, the best of each picked through `rater`: 12
/// preference pairs. Group 0 is rated with its feedback token, the others with an API key.
async fn rate_four_groups(generator: &Channel, rater: &Channel) {
    let mut client = ImageGeneratorClient::new(rater.clone());
    for g in 0..4 {
        let response = generate(generator, &format!("a blue triangle, take {g}")).await;
        let best = &response.images[g % 4];
        let request = if g == 0 {
            tonic::Request::new(pb::FeedbackRequest {
                image_id: best.image_id.clone(),
                feedback_token: best.feedback_token.clone(),
                feedback: Some(pb::feedback_request::Feedback::BestOf(pb::BestOf {})),
                ..Default::default()
            })
        } else {
            with_key(best_of(&best.image_id))
        };
        let answer = client.submit_feedback(request).await.unwrap().into_inner();
        assert_eq!(
            answer.group_id, response.group_id,
            "the rater's replica found the group"
        );
    }
}

/// Triggers a round on a trainer and waits for it to publish or be refused.
async fn finish_round(channel: &Channel) -> pb::TrainingStatus {
    let before = status(channel).await;
    AdaptersClient::new(channel.clone())
        .trigger_training(with_key(pb::TriggerTrainingRequest {}))
        .await
        .unwrap();
    for _ in 0..6000 {
        let now = status(channel).await;
        if now.rounds_published + now.rounds_rejected
            > before.rounds_published + before.rounds_rejected
            || (now.state == "waiting" && now.last_reason.starts_with("0 new"))
        {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the round never ended");
}

/// Two serving replicas and one trainer: images generated on A are rated through B (one with
/// its token, so the replicas share the generated secret), the trainer learns, and both
/// replicas serve the new live generation within 2 s of its publication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_and_a_trainer_share_what_they_learn() {
    let nats = NatsServer::start();
    let a = replica(&nats, "serve", &[]);
    let b = replica(&nats, "serve", &[]);
    let trainer = replica(&nats, "train", &[]);
    let (ca, cb, ct) = (
        connect(&a.grpc).await,
        connect(&b.grpc).await,
        connect(&trainer.grpc).await,
    );
    let refused = ImageGeneratorClient::new(ct.clone())
        .generate(with_key(pb::GenerateRequest {
            prompt: "a red circle".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    rate_four_groups(&ca, &cb).await;
    // An idempotent retry may land on any replica: the key is shared.
    let image = generate(&ca, "a retried vote").await.images[0]
        .image_id
        .clone();
    let keyed = |vote: pb::Vote| pb::FeedbackRequest {
        image_id: image.clone(),
        rater_id: "bob".into(),
        idempotency_key: "retry-1".into(),
        feedback: Some(pb::feedback_request::Feedback::Vote(vote as i32)),
        ..Default::default()
    };
    let once = ImageGeneratorClient::new(ca.clone())
        .submit_feedback(with_key(keyed(pb::Vote::Up)))
        .await
        .unwrap()
        .into_inner();
    let again = ImageGeneratorClient::new(cb.clone())
        .submit_feedback(with_key(keyed(pb::Vote::Up)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.duplicate && again.feedback_id == once.feedback_id,
        "{again:?}"
    );
    let reused = ImageGeneratorClient::new(cb.clone())
        .submit_feedback(with_key(keyed(pb::Vote::Down)))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), tonic::Code::FailedPrecondition, "{reused:?}");
    await_metric(&trainer.metrics, "imagegen_trainer_lease_held", 1.0).await;
    await_metric(&trainer.metrics, "imagegen_trainer_lag_groups", 5.0).await;
    let round = finish_round(&ct).await;
    assert_eq!(round.rounds_published, 1, "{round:?}");
    let published = Instant::now();
    let generation = live(&ct).await;
    assert!(!generation.is_empty());
    assert_eq!(
        metric(&trainer.metrics, "imagegen_d3po_pairs_used_total").await,
        Some(12.0)
    );
    let mut followed = [None, None];
    while followed.iter().any(Option::is_none) && published.elapsed() < Duration::from_secs(30) {
        for (seen, channel) in followed.iter_mut().zip([&ca, &cb]) {
            if seen.is_none() && live(channel).await == generation {
                *seen = Some(published.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("replicas followed the new live generation after {followed:?}");
    for lag in followed {
        let lag = lag.expect("a replica never followed the live generation");
        assert!(lag < Duration::from_secs(2), "hot swap took {lag:?}");
    }
    let served = generate(&cb, "after the swap").await;
    assert_eq!(served.adapter_generation, generation);
    // Not one trainer's privilege: a replica rolls back for everyone, by the shared alias.
    AdaptersClient::new(ca.clone())
        .rollback_adapter(with_key(pb::RollbackAdapterRequest {}))
        .await
        .unwrap();
    for _ in 0..300 {
        if live(&cb).await.is_empty() && live(&ct).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(live(&cb).await, "", "B followed A's rollback");
    let stale = AdaptersClient::new(cb.clone())
        .activate_adapter(with_key(pb::ActivateAdapterRequest {
            generation: generation.clone(),
            expected_live: generation.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        stale.code(),
        tonic::Code::Aborted,
        "the CAS checks the shared alias"
    );
    for s in [a, b, trainer] {
        kill_9(s);
    }
}

/// A trainer killed mid-round: a second one, waiting for the lease, takes it over when the
/// first's lease runs out and trains the same pairs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_round_is_replaced_and_its_pairs_trained_once() {
    let nats = NatsServer::start();
    let serve = replica(&nats, "serve", &[]);
    let first = replica(&nats, "train", &[]);
    let cs = connect(&serve.grpc).await;
    let c1 = connect(&first.grpc).await;
    await_metric(&first.metrics, "imagegen_trainer_lease_held", 1.0).await;
    let second = replica(&nats, "train", &[]);
    let c2 = connect(&second.grpc).await;
    rate_four_groups(&cs, &cs).await;
    await_metric(&first.metrics, "imagegen_trainer_lag_groups", 4.0).await;
    assert_eq!(
        metric(&second.metrics, "imagegen_trainer_lease_held").await,
        Some(0.0),
        "one trainer at a time"
    );
    AdaptersClient::new(c1.clone())
        .trigger_training(with_key(pb::TriggerTrainingRequest {}))
        .await
        .unwrap();
    let mut seen_training = false;
    for _ in 0..4000 {
        if status(&c1).await.state == "training" {
            seen_training = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_training, "the round never reached training");
    kill_9(first);

    await_metric(&second.metrics, "imagegen_trainer_lease_held", 1.0).await;
    assert_eq!(live(&c2).await, "", "the killed round published nothing");
    let round = finish_round(&c2).await;
    assert_eq!(round.rounds_published, 1, "{round:?}");
    assert_eq!(
        metric(&second.metrics, "imagegen_d3po_pairs_used_total").await,
        Some(12.0),
        "the killed round's pairs, each once"
    );
    let again = finish_round(&c2).await;
    assert!(
        again.last_reason.starts_with("0 new preference pairs"),
        "{again:?}"
    );
    // A third trainer replays the ledger: nothing to train again.
    kill_9(second);
    let third = replica(&nats, "train", &[]);
    let c3 = connect(&third.grpc).await;
    await_metric(&third.metrics, "imagegen_trainer_lease_held", 1.0).await;
    await_metric(&third.metrics, "imagegen_trainer_lag_groups", 0.0).await;
    let replayed = finish_round(&c3).await;
    assert!(
        replayed.last_reason.starts_with("0 new preference pairs"),
        "{replayed:?}"
    );
    kill_9(third);
    kill_9(serve);
}

/// NATS stopped for 10 s: Generate succeeds throughout, feedback answers UNAVAILABLE and then OK
/// again once NATS is back, and no acknowledged feedback is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_degrades_recording_and_loses_nothing_acknowledged() {
    let mut nats = NatsServer::start();
    let node = replica(&nats, "all", &["--d3po-enabled", "false"]);
    let channel = connect(&node.grpc).await;
    let mut client = ImageGeneratorClient::new(channel.clone());
    let before = generate(&channel, "a green square").await;
    let vote = |image: &str, rater: &str| pb::FeedbackRequest {
        image_id: image.into(),
        rater_id: rater.into(),
        idempotency_key: rater.into(),
        feedback: Some(pb::feedback_request::Feedback::Vote(pb::Vote::Up as i32)),
        ..Default::default()
    };
    let mut acked = Vec::new();
    for n in 0..5 {
        let rater = format!("before-{n}");
        client
            .submit_feedback(with_key(vote(&before.images[0].image_id, &rater)))
            .await
            .unwrap();
        acked.push(rater);
    }

    nats.stop();
    let outage = Instant::now();
    let mut unavailable = 0;
    let mut generated = 0;
    while outage.elapsed() < Duration::from_secs(10) {
        generate(&channel, "during the outage").await;
        generated += 1;
        match client
            .submit_feedback(with_key(vote(&before.images[1].image_id, "during")))
            .await
        {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                unavailable += 1;
            }
            Ok(_) => acked.push("during".into()),
        }
    }
    assert!(unavailable > 0, "feedback was refused while NATS was down");
    nats.run();
    let back = Instant::now();
    let mut recovered = None;
    while recovered.is_none() && back.elapsed() < Duration::from_secs(120) {
        if client
            .submit_feedback(with_key(vote(&before.images[2].image_id, "after")))
            .await
            .is_ok()
        {
            recovered = Some(back.elapsed());
            acked.push("after".into());
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let recovered = recovered.expect("feedback never worked again after NATS came back");
    println!(
        "{generated} generations served during the 10 s outage, {unavailable} feedback refused; \
         feedback OK again {recovered:?} after NATS restarted"
    );
    let after = generate(&channel, "after the outage").await;
    client
        .submit_feedback(with_key(best_of(&after.images[3].image_id)))
        .await
        .unwrap();
    // Every acknowledged vote reached the stream: this node replays it into its index.
    let stored = {
        let mut raters = std::collections::BTreeSet::new();
        for _ in 0..600 {
            raters = exported_raters(&channel).await;
            if acked.iter().all(|r| raters.contains(r)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        raters
    };
    let lost: Vec<_> = acked.iter().filter(|r| !stored.contains(*r)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    kill_9(node);
}

/// The raters of every vote in the node's export.
async fn exported_raters(channel: &Channel) -> std::collections::BTreeSet<String> {
    common::exported_votes(channel, &format!("Bearer {KEY}"))
        .await
        .into_iter()
        .map(|(_, rater)| rater)
        .collect()
}
