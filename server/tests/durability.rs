//! Acknowledged means durable: the binary, killed with SIGKILL in the middle of things, comes
//! back with everything it acknowledged (the embedded learning store in `--data-dir`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Spawned, connect, metric, spawn_server};
use imagegen_proto::v1 as pb;
use pb::adapters_client::AdaptersClient;
use pb::image_generator_client::ImageGeneratorClient;
use tonic::transport::Channel;

const KEY: &str = "sk-durability-test-key";

fn with_key<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    request
}

fn server(dir: &std::path::Path, extra: &[&str]) -> Spawned {
    let keys = format!("generate,feedback,admin {KEY}");
    let mut args = vec!["--data-dir", dir.to_str().unwrap(), "--api-keys", &keys];
    args.extend_from_slice(extra);
    spawn_server(&args)
}

fn kill_9(mut s: Spawned) {
    s.child.kill().unwrap(); // SIGKILL: no drain, no destructor runs
    s.child.wait().unwrap();
}

async fn generate(channel: &Channel, prompt: &str, images: u32) -> pb::GenerateResponse {
    ImageGeneratorClient::new(channel.clone())
        .generate(with_key(pb::GenerateRequest {
            prompt: prompt.into(),
            num_images: Some(images),
            steps: Some(4),
            seed: Some(11),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
}

fn vote(image_id: &str, rater: &str) -> pb::FeedbackRequest {
    pb::FeedbackRequest {
        image_id: image_id.into(),
        rater_id: rater.into(),
        idempotency_key: rater.into(),
        feedback: Some(pb::feedback_request::Feedback::Vote(pb::Vote::Up as i32)),
        ..Default::default()
    }
}

async fn exported_votes(channel: &Channel) -> BTreeSet<(String, String)> {
    common::exported_votes(channel, &format!("Bearer {KEY}")).await
}

/// SIGKILL right after Generate returned, then during a burst of feedback: after each restart
/// the image can be rated with its token, every acknowledged vote is there, a refused one is
/// not, and a retry of an acknowledged one is answered as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_feedback_and_generations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--d3po-enabled", "false"];
    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    let first = generate(&channel, "a red circle on blue", 2).await;
    kill_9(s);

    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    let image = &first.images[0];
    let by_token = ImageGeneratorClient::new(channel.clone())
        .submit_feedback(pb::FeedbackRequest {
            image_id: image.image_id.clone(),
            feedback_token: image.feedback_token.clone(),
            feedback: Some(pb::feedback_request::Feedback::BestOf(pb::BestOf {})),
            ..Default::default()
        })
        .await;
    assert!(
        by_token.is_ok(),
        "a token from before the crash: {by_token:?}"
    );
    let second = generate(&channel, "a green square on white", 2).await;
    let images: Vec<String> = first
        .images
        .iter()
        .chain(&second.images)
        .map(|i| i.image_id.clone())
        .collect();

    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut burst = Vec::new();
    for task in 0..4 {
        let (channel, acked, images) = (channel.clone(), acked.clone(), images.clone());
        burst.push(tokio::spawn(async move {
            let mut client = ImageGeneratorClient::new(channel);
            for n in 0.. {
                let image = &images[n % images.len()];
                let rater = format!("t{task}-{n}");
                match client.submit_feedback(with_key(vote(image, &rater))).await {
                    Ok(_) => acked.lock().unwrap().push((image.clone(), rater)),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // One refused vote in the middle of the burst: it must never appear.
    let refused = ImageGeneratorClient::new(channel.clone())
        .submit_feedback(with_key(vote("no-such-image", "refused-rater")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    while acked.lock().unwrap().len() < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_9(s);
    for task in burst {
        task.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    let stored = exported_votes(&channel).await;
    let missing: Vec<_> = acked.iter().filter(|v| !stored.contains(*v)).collect();
    println!(
        "acknowledged {} votes before SIGKILL; {} stored after restart",
        acked.len(),
        stored.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(!stored.iter().any(|(_, r)| r == "refused-rater"));
    let (image, rater) = &acked[0];
    let retry = ImageGeneratorClient::new(channel.clone())
        .submit_feedback(with_key(vote(image, rater)))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate, "the idempotency key survived the crash");
    kill_9(s);
}

async fn status(channel: &Channel) -> pb::TrainingStatus {
    AdaptersClient::new(channel.clone())
        .get_training_status(with_key(pb::GetTrainingStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
}

/// Triggers a round and waits for it to end; returns the status after it.
async fn finish_round(channel: &Channel) -> pb::TrainingStatus {
    let before = status(channel).await;
    AdaptersClient::new(channel.clone())
        .trigger_training(with_key(pb::TriggerTrainingRequest {}))
        .await
        .unwrap();
    for _ in 0..6000 {
        let now = status(channel).await;
        let ended = now.rounds_published + now.rounds_rejected
            > before.rounds_published + before.rounds_rejected
            || (now.state == "waiting" && now.last_reason != before.last_reason);
        if ended {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the round never ended");
}

async fn live(channel: &Channel) -> String {
    ImageGeneratorClient::new(channel.clone())
        .get_info(with_key(pb::GetInfoRequest {}))
        .await
        .unwrap()
        .into_inner()
        .live_adapter
}

/// SIGKILL during a training round: the next round trains exactly those pairs, once. SIGKILL
/// during a burst of swaps: live is one of the two generations, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_or_a_swap_killed_midway_leaves_learning_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
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
    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    let mut client = ImageGeneratorClient::new(channel.clone());
    for g in 0..4 {
        let response = generate(&channel, &format!("a blue triangle, take {g}"), 4).await;
        let best = &response.images[g % 4];
        client
            .submit_feedback(with_key(pb::FeedbackRequest {
                image_id: best.image_id.clone(),
                rater_id: "alice".into(),
                feedback: Some(pb::feedback_request::Feedback::BestOf(pb::BestOf {})),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    // 4 best-of picks in groups of 4: 12 pairs.
    AdaptersClient::new(channel.clone())
        .trigger_training(with_key(pb::TriggerTrainingRequest {}))
        .await
        .unwrap();
    let mut seen_training = false;
    for _ in 0..2000 {
        let st = status(&channel).await;
        if st.state == "training" {
            seen_training = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_training, "the round never reached training");
    kill_9(s);

    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    assert_eq!(
        live(&channel).await,
        "",
        "the killed round published nothing"
    );
    let after = finish_round(&channel).await;
    assert_eq!(after.rounds_published, 1, "{after:?}");
    let used = metric(&s.metrics, "imagegen_d3po_pairs_used_total").await;
    assert_eq!(used, Some(12.0), "the killed round's pairs, each once");
    let again = finish_round(&channel).await;
    assert!(
        again.last_reason.starts_with("0 new preference pairs"),
        "{again:?}"
    );
    let generation = live(&channel).await;
    assert!(!generation.is_empty());

    // Swap back and forth until killed.
    let swapper = {
        let channel = channel.clone();
        let generation = generation.clone();
        tokio::spawn(async move {
            let mut adapters = AdaptersClient::new(channel);
            let mut current = generation.clone();
            for n in 0..10_000 {
                let next = if n % 2 == 0 {
                    String::new()
                } else {
                    generation.clone()
                };
                let request = pb::ActivateAdapterRequest {
                    generation: next.clone(),
                    expected_live: current.clone(),
                };
                if adapters.activate_adapter(with_key(request)).await.is_err() {
                    return n;
                }
                current = next;
            }
            10_000
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill_9(s);
    let swaps = swapper.await.unwrap();
    assert!(swaps > 2, "only {swaps} swaps before the kill");

    let s = server(dir.path(), &args);
    let channel = connect(&s.grpc).await;
    let live_now = live(&channel).await;
    assert!(
        live_now.is_empty() || live_now == generation,
        "live is `{live_now}`"
    );
    let served = generate(&channel, "after the torn swap", 1).await;
    assert_eq!(served.adapter_generation, live_now);
    println!("{swaps} swaps before SIGKILL; live after restart: `{live_now}`");
    kill_9(s);
}
