//! The `imagegen-server` binary as ops run it: SIGTERM drains an in-flight request and exits 0.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use imagegen_proto::v1 as pb;

/// Starts the server on ephemeral ports and reads the gRPC address from its log.
fn spawn_server() -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagegen-server"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server exited before serving")
            .unwrap();
        let plain: String = strip_ansi(&line);
        if let Some(rest) = plain.split("grpc_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

async fn connect(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_request_and_exits_zero() {
    let (mut child, addr) = spawn_server();
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
    let (mut child, addr) = spawn_server();
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
