//! The `imagegen-server` binary as ops run it: SIGTERM drains an in-flight request and exits 0.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use imagegen_proto::v1 as pb;

mod common;
use common::{connect, spawn_server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_request_and_exits_zero() {
    let common::Spawned {
        mut child,
        grpc: addr,
        ..
    } = spawn_server(&["--ephemeral"]);
    let channel = connect(&addr).await;
    let mut client = pb::image_generator_client::ImageGeneratorClient::new(channel);
    let request = pb::GenerateRequest {
        prompt: "in flight at SIGTERM".into(),
        steps: Some(25),
        seed: Some(1),
        ..Default::default()
    };
    let in_flight = tokio::spawn(async move { client.generate(request).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes during the drain")
        .into_inner();
    assert_eq!(response.images.len(), 1);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// The server answers Generate whichever learning plugins are compiled in, and its training
/// surface says whether one runs: with the default `d3po` feature training is on; built with
/// `--no-default-features` it is off and `TriggerTraining` says so (FAILED_PRECONDITION).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_is_served_and_training_follows_the_compiled_plugins() {
    let common::Spawned {
        mut child,
        grpc: addr,
        ..
    } = spawn_server(&["--ephemeral"]);
    let channel = connect(&addr).await;
    let mut generator = pb::image_generator_client::ImageGeneratorClient::new(channel.clone());
    let response = generator
        .generate(pb::GenerateRequest {
            prompt: "a red circle".into(),
            steps: Some(2),
            seed: Some(3),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.images.len(), 1);
    assert!(!response.images[0].data.is_empty());

    let mut adapters = pb::adapters_client::AdaptersClient::new(channel);
    let status = adapters
        .get_training_status(pb::GetTrainingStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let trigger = adapters
        .trigger_training(pb::TriggerTrainingRequest {})
        .await;
    if cfg!(feature = "d3po") {
        assert!(status.enabled, "{status:?}");
        assert!(trigger.is_ok(), "{trigger:?}");
    } else {
        assert!(!status.enabled, "{status:?}");
        let err = trigger.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("no learning plugin"), "{err:?}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
