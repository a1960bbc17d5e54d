//! Running the `imagegen-server` binary as ops do: a child process on ephemeral ports, its
//! addresses read from its log.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A server process and where it listens.
pub struct Spawned {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
}

/// Starts the server with `args` on ephemeral ports; returns once it serves.
pub fn spawn_server(args: &[&str]) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagegen-server"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let field = |line: &str, name: &str| {
        line.split(&format!("{name}=")[..])
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    };
    let (grpc, metrics) = loop {
        let line = lines
            .next()
            .expect("the server exited before serving")
            .unwrap();
        let plain = strip_ansi(&line);
        if let (Some(g), Some(m)) = (field(&plain, "grpc_addr"), field(&plain, "metrics_addr")) {
            break (g, m);
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Spawned {
        child,
        grpc,
        metrics,
    }
}

/// `(image, rater)` of every vote in the server's trajectory export, read with `authorization`
/// (`Bearer <admin key>`).
pub async fn exported_votes(
    channel: &tonic::transport::Channel,
    authorization: &str,
) -> std::collections::BTreeSet<(String, String)> {
    use imagegen_proto::v1 as pb;
    let mut request = tonic::Request::new(pb::ExportRequest {
        include_unlabelled: true,
    });
    request
        .metadata_mut()
        .insert("authorization", authorization.parse().unwrap());
    let mut stream = pb::admin_client::AdminClient::new(channel.clone())
        .export_trajectories(request)
        .await
        .unwrap()
        .into_inner();
    let mut metadata = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        if chunk.file == "metadata.json" {
            metadata.extend(chunk.data);
        }
    }
    let doc: serde_json::Value = serde_json::from_slice(&metadata).unwrap();
    let mut out = std::collections::BTreeSet::new();
    for group in doc["groups"].as_array().unwrap() {
        for image in group["images"].as_array().unwrap() {
            let id = image["image_id"].as_str().unwrap();
            for rater in image["feedback"]["votes"].as_object().unwrap().keys() {
                out.insert((id.to_string(), rater.clone()));
            }
        }
    }
    out
}

/// A channel to `addr`.
pub async fn connect(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The value of one series on `/metrics` (`name{labels}` as printed).
pub async fn metric(addr: &str, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.trim().parse().ok())
    })
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
