//! End-to-end tests through the real gRPC API on 127.0.0.1:0 with the built-in (tiny) model.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use imagegen_proto::v1 as pb;
use imagegen_tests::TestServer;
use pb::feedback_request::Feedback;
use tonic::Code;

fn request(prompt: &str, seed: u64, steps: u32, num_images: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        seed: Some(seed),
        steps: Some(steps),
        num_images: Some(num_images),
        ..Default::default()
    }
}

/// The API key of the tests that run with authentication on.
const KEY: &str = "rater-key-0123456789";

/// `message` with `KEY` as its bearer token.
fn keyed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {KEY}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn feedback(
    image: &pb::GeneratedImage,
    kind: Feedback,
    rater: &str,
    key: &str,
) -> pb::FeedbackRequest {
    pb::FeedbackRequest {
        image_id: image.image_id.clone(),
        feedback_token: image.feedback_token.clone(),
        feedback: Some(kind),
        rater_id: rater.into(),
        idempotency_key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_returns_decodable_images_of_the_requested_size_and_format() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let info = client
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let defaults = info.defaults.unwrap();
    assert_eq!(
        (defaults.width, defaults.steps, defaults.eta),
        (64, 20, 1.0)
    );

    let response = client
        .generate(request("a small red circle on a blue background", 1, 3, 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.images.len(), 2);
    assert_eq!(response.seed, 1);
    assert_eq!(response.model_id, "tiny");
    assert!(!response.group_id.is_empty());
    for image in &response.images {
        assert_eq!(image.mime_type, "image/png");
        let decoded = image::load_from_memory(&image.data).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
        assert_eq!((image.width, image.height), (64, 64));
        assert!(!image.feedback_token.is_empty());
    }
    let timings = response.timings.unwrap();
    assert!(timings.denoise_seconds > 0.0 && timings.total_seconds >= timings.denoise_seconds);

    // Another size, JPEG.
    let mut wide = request("a yellow square", 2, 2, 1);
    wide.width = Some(128);
    wide.height = Some(32);
    wide.format = pb::ImageFormat::Jpeg as i32;
    let response = client.generate(wide).await.unwrap().into_inner();
    let image = &response.images[0];
    assert_eq!(image.mime_type, "image/jpeg");
    let decoded = image::load_from_memory(&image.data).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (128, 32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_identical_bytes() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let a = client
        .generate(request("a green triangle", 77, 3, 1))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .generate(request("a green triangle", 77, 3, 1))
        .await
        .unwrap()
        .into_inner();
    let c = client
        .generate(request("a green triangle", 78, 3, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.images[0].data, b.images[0].data);
    assert_ne!(a.images[0].data, c.images[0].data);
    assert_ne!(a.images[0].image_id, b.images[0].image_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_yields_one_progress_event_per_step_then_the_result() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut stream = t
        .generator()
        .generate_stream(request("a purple circle", 3, 5, 1))
        .await
        .unwrap()
        .into_inner();
    let mut steps = Vec::new();
    let mut result = None;
    while let Some(event) = stream.message().await.unwrap() {
        match event.event.unwrap() {
            pb::generate_event::Event::Progress(p) => {
                assert!(result.is_none(), "progress after the result");
                assert_eq!(p.total_steps, 5);
                steps.push(p.step);
            }
            pb::generate_event::Event::Result(r) => result = Some(r),
        }
    }
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(result.unwrap().images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_reaches_the_buffer_and_the_export() {
    // Named raters are trusted from a caller with the feedback role (an API key), not from
    // feedback-token holders.
    let t = TestServer::start(|c| c.api_keys = Some(format!("generate,feedback,admin {KEY}")))
        .await
        .unwrap();
    let mut client = t.generator();
    let group = client
        .generate(keyed(request(
            "a small blue square on a white background",
            5,
            2,
            3,
        )))
        .await
        .unwrap()
        .into_inner();
    let [a, b, c] = [&group.images[0], &group.images[1], &group.images[2]];

    let up = client
        .submit_feedback(keyed(feedback(
            a,
            Feedback::Vote(pb::Vote::Up as i32),
            "alice",
            "k1",
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.group_id, group.group_id);
    assert!(!up.duplicate);
    // A retry with the same idempotency key returns the first answer and counts once.
    let again = client
        .submit_feedback(keyed(feedback(
            a,
            Feedback::Vote(pb::Vote::Up as i32),
            "alice",
            "k1",
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.feedback_id, up.feedback_id);
    client
        .submit_feedback(keyed(feedback(
            b,
            Feedback::Vote(pb::Vote::Down as i32),
            "alice",
            "",
        )))
        .await
        .unwrap();
    client
        .submit_feedback(keyed(feedback(
            c,
            Feedback::PreferredOver(b.image_id.clone()),
            "bob",
            "",
        )))
        .await
        .unwrap();
    client
        .submit_feedback(keyed(feedback(
            a,
            Feedback::BestOf(pb::BestOf {}),
            "carol",
            "",
        )))
        .await
        .unwrap();
    assert_eq!(
        t.metric("imagegen_feedback_total{kind=\"vote_up\"}")
            .await
            .unwrap(),
        Some(1.0)
    );
    assert_eq!(
        t.metric("imagegen_feedback_total{kind=\"preference\"}")
            .await
            .unwrap(),
        Some(1.0)
    );

    // An unlabelled group stays out of the default export.
    client
        .generate(keyed(request("nobody rates this", 6, 2, 1)))
        .await
        .unwrap();

    let mut stream = t
        .admin()
        .export_trajectories(keyed(pb::ExportRequest {
            include_unlabelled: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    while let Some(chunk) = stream.message().await.unwrap() {
        files.entry(chunk.file).or_default().extend(chunk.data);
    }
    let metadata: serde_json::Value = serde_json::from_slice(&files["metadata.json"]).unwrap();
    let groups = metadata["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "only the labelled group");
    let g = &groups[0];
    assert_eq!(g["group_id"], group.group_id.as_str());
    assert_eq!(g["prompt"], "a small blue square on a white background");
    assert_eq!(g["comparisons"][0]["winner"], c.image_id.as_str());
    assert_eq!(g["comparisons"][0]["loser"], b.image_id.as_str());
    assert_eq!(g["best_of"]["carol"], a.image_id.as_str());
    let images = g["images"].as_array().unwrap();
    let first = images
        .iter()
        .find(|i| i["image_id"] == a.image_id.as_str())
        .unwrap();
    assert_eq!(first["feedback"]["votes"]["alice"], "up");
    assert_eq!(first["seed"], 5);
    assert_eq!(first["eta"], 1.0);

    let tensors =
        safetensors::SafeTensors::deserialize(&files["trajectories.safetensors"]).unwrap();
    let latents = tensors.tensor(first["latents"].as_str().unwrap()).unwrap();
    assert_eq!(latents.shape(), &[3, 4, 32, 32], "[steps + 1, C, H, W]");
    assert_eq!(latents.dtype(), safetensors::Dtype::F32);
    assert_eq!(
        tensors
            .tensor(first["log_probs"].as_str().unwrap())
            .unwrap()
            .shape(),
        &[2]
    );
    assert_eq!(
        tensors
            .tensor(first["prompt_embeddings"].as_str().unwrap())
            .unwrap()
            .shape(),
        &[77, 32]
    );

    // Including unlabelled groups exports both.
    let mut stream = t
        .admin()
        .export_trajectories(keyed(pb::ExportRequest {
            include_unlabelled: true,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut meta = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        if chunk.file == "metadata.json" {
            meta.extend(chunk.data);
        }
    }
    let metadata: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(metadata["groups"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_errors_say_what_is_wrong() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let one = client
        .generate(request("one", 1, 2, 2))
        .await
        .unwrap()
        .into_inner();
    let other = client
        .generate(request("other", 2, 2, 1))
        .await
        .unwrap()
        .into_inner();
    let a = &one.images[0];

    let mut wrong = feedback(a, Feedback::Vote(pb::Vote::Up as i32), "", "");
    wrong.feedback_token = one.images[1].feedback_token.clone();
    let err = client.submit_feedback(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let mut unknown = feedback(a, Feedback::Vote(pb::Vote::Up as i32), "", "");
    unknown.image_id = "0123".into();
    assert_eq!(
        client.submit_feedback(unknown).await.unwrap_err().code(),
        Code::PermissionDenied,
        "a token binds its image"
    );

    let err = client
        .submit_feedback(feedback(
            a,
            Feedback::PreferredOver(other.images[0].image_id.clone()),
            "",
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("different groups"),
        "{}",
        err.message()
    );
    let err = client
        .submit_feedback(feedback(
            a,
            Feedback::PreferredOver("feedbeef".into()),
            "",
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("feedbeef"), "{}", err.message());
    let err = client
        .submit_feedback(feedback(a, Feedback::Vote(0), "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut none = feedback(a, Feedback::Vote(1), "", "");
    none.feedback = None;
    assert_eq!(
        client.submit_feedback(none).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_images_are_not_found_by_name() {
    // A 2-step trajectory holds 3 latents of 4x32x32 f32 (49 kB) and two 77x32 embeddings
    // (20 kB): room for one, so the second request evicts the first.
    let t = TestServer::start(|c| c.trajectory_buffer_bytes = 100_000)
        .await
        .unwrap();
    let mut client = t.generator();
    let first = client
        .generate(request("first", 1, 2, 1))
        .await
        .unwrap()
        .into_inner();
    client.generate(request("second", 2, 2, 1)).await.unwrap();
    let err = client
        .submit_feedback(feedback(&first.images[0], Feedback::Vote(1), "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains(&first.images[0].image_id) && err.message().contains("evicted"),
        "{}",
        err.message()
    );
    assert_eq!(
        t.metric("imagegen_trajectory_evictions_total")
            .await
            .unwrap(),
        Some(1.0)
    );
    assert_eq!(
        t.metric("imagegen_trajectory_buffer_entries")
            .await
            .unwrap(),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_invalid_argument_naming_the_field() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let base = || request("ok", 1, 2, 1);
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                prompt: String::new(),
                ..base()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                prompt: "   ".into(),
                ..base()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                prompt: "x".repeat(2001),
                ..base()
            },
            "prompt",
        ),
        (
            pb::GenerateRequest {
                steps: Some(0),
                ..base()
            },
            "steps",
        ),
        (
            pb::GenerateRequest {
                steps: Some(101),
                ..base()
            },
            "steps",
        ),
        (
            pb::GenerateRequest {
                width: Some(65),
                ..base()
            },
            "width",
        ),
        (
            pb::GenerateRequest {
                height: Some(4096),
                ..base()
            },
            "height",
        ),
        (
            pb::GenerateRequest {
                num_images: Some(0),
                ..base()
            },
            "num_images",
        ),
        (
            pb::GenerateRequest {
                num_images: Some(9),
                ..base()
            },
            "num_images",
        ),
        (
            pb::GenerateRequest {
                guidance_scale: Some(f32::NAN),
                ..base()
            },
            "guidance_scale",
        ),
        (
            pb::GenerateRequest {
                guidance_scale: Some(-1.0),
                ..base()
            },
            "guidance_scale",
        ),
        (
            pb::GenerateRequest {
                eta: Some(0.0),
                ..base()
            },
            "eta",
        ),
        (
            pb::GenerateRequest {
                eta: Some(1.5),
                ..base()
            },
            "eta",
        ),
        // Finite but poisonous: the chain's latents or log-probs would not be finite, and a
        // preference on it would turn a training round's weights into NaN.
        (
            pb::GenerateRequest {
                guidance_scale: Some(3e38),
                ..base()
            },
            "guidance_scale",
        ),
        (
            pb::GenerateRequest {
                eta: Some(1e-30),
                ..base()
            },
            "eta",
        ),
        (
            pb::GenerateRequest {
                adapter: "no-such-adapter".into(),
                ..base()
            },
            "adapter",
        ),
        (
            pb::GenerateRequest {
                format: 9,
                ..base()
            },
            "format",
        ),
    ];
    for (req, field) in cases {
        let err = client.generate(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
        let err = client.generate_stream(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "stream {field}");
    }
    // The server is unharmed.
    client.generate(base()).await.unwrap();
    assert_eq!(
        t.metric("imagegen_requests_total{code=\"INVALID_ARGUMENT\",rpc=\"Generate\"}")
            .await
            .unwrap(),
        Some(17.0)
    );
    let limits = client
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .limits
        .unwrap();
    assert_eq!((limits.max_guidance_scale, limits.min_eta), (50.0, 0.01));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted() {
    let t = TestServer::start(|c| c.max_queue = 1).await.unwrap();
    let mut slow = t.generator();
    let running = tokio::spawn(async move { slow.generate(request("slow", 1, 30, 1)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let err = t
        .generator()
        .generate(request("rejected", 2, 2, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    running.await.unwrap().unwrap();
    // Capacity is back once the first request finished.
    t.generator()
        .generate(request("accepted", 3, 2, 1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_requests_share_a_batch() {
    let t = TestServer::start(|c| {
        c.max_batch = 4;
        c.batch_wait_ms = 500;
    })
    .await
    .unwrap();
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let mut client = t.generator();
            tokio::spawn(async move { client.generate(request("together", i, 2, 1)).await })
        })
        .collect();
    let mut sizes = Vec::new();
    for call in calls {
        sizes.push(call.await.unwrap().unwrap().into_inner().batch_size);
    }
    assert_eq!(
        sizes,
        vec![3, 3, 3],
        "three single-image requests in one batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_work() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut stream = t
        .generator()
        .generate_stream(request("abandoned", 1, 50, 1))
        .await
        .unwrap()
        .into_inner();
    // Wait for the first step, then hang up.
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::generate_event::Event::Progress(_))
    ));
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if t.metric("imagegen_requests_cancelled_total").await.unwrap() == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned generation kept running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // It stopped early: nothing was generated, and the server still serves.
    assert_eq!(
        t.metric("imagegen_images_generated_total").await.unwrap(),
        Some(0.0)
    );
    t.generator()
        .generate(request("next", 2, 2, 1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_rpc_but_health_and_feedback_tokens() {
    let t = TestServer::start(|c| {
        c.api_keys = Some("generate app-key-0123456789;admin admin-key-0123456789".into());
    })
    .await
    .unwrap();
    let with = |key: &str, msg: pb::GenerateRequest| {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let mut client = t.generator();
    assert_eq!(
        client
            .generate(request("x", 1, 2, 1))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        client
            .generate(with("wrong-key-0123456789", request("x", 1, 2, 1)))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        client
            .generate(with("admin-key-0123456789", request("x", 1, 2, 1)))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let ok = client
        .generate(with("app-key-0123456789", request("x", 1, 2, 1)))
        .await
        .unwrap()
        .into_inner();
    // The feedback token alone is enough to rate the image...
    client
        .submit_feedback(feedback(&ok.images[0], Feedback::Vote(1), "", ""))
        .await
        .unwrap();
    // ...but a presented key must carry the feedback role.
    let mut r = tonic::Request::new(feedback(&ok.images[0], Feedback::Vote(1), "", ""));
    r.metadata_mut().insert(
        "authorization",
        "Bearer app-key-0123456789".parse().unwrap(),
    );
    assert_eq!(
        client.submit_feedback(r).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Export needs admin.
    assert_eq!(
        t.admin()
            .export_trajectories(pb::ExportRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut r = tonic::Request::new(pb::ExportRequest::default());
    r.metadata_mut().insert(
        "authorization",
        "Bearer admin-key-0123456789".parse().unwrap(),
    );
    t.admin().export_trajectories(r).await.unwrap();
    // Health needs no key.
    let mut health = tonic_health_client(&t);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

fn tonic_health_client(
    t: &TestServer,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(t.channel.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_draining_and_in_flight_work_finishes() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut health = tonic_health_client(&t);
    let service = "imagegen.v1.ImageGenerator".to_string();
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut slow = t.generator();
    let in_flight =
        tokio::spawn(async move { slow.generate(request("in flight", 1, 20, 1)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    t.server.stop();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let draining = health
        .check(tonic_health::pb::HealthCheckRequest { service })
        .await;
    if let Ok(r) = draining {
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        );
    }
    let done = in_flight.await.unwrap().unwrap().into_inner();
    assert_eq!(
        done.images.len(),
        1,
        "the in-flight request completed during the drain"
    );
    t.server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape_names_every_series_and_passes_promtool() {
    let t = TestServer::start(|_| {}).await.unwrap();
    t.generator()
        .generate(request("metrics", 1, 2, 1))
        .await
        .unwrap();
    let text = t.scrape().await.unwrap();
    for name in [
        "imagegen_requests_total",
        "imagegen_request_duration_seconds_bucket",
        "imagegen_queue_depth",
        "imagegen_batch_size_bucket",
        "imagegen_images_generated_total",
        "imagegen_denoise_step_duration_seconds_bucket",
        "imagegen_trajectory_buffer_bytes",
        "imagegen_trajectory_buffer_entries",
        "imagegen_trajectory_evictions_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert_eq!(
        t.metric("imagegen_images_generated_total").await.unwrap(),
        Some(1.0)
    );
    assert_eq!(t.metric("imagegen_queue_depth").await.unwrap(), Some(0.0));
    assert_eq!(
        t.metric("imagegen_denoise_step_duration_seconds_count")
            .await
            .unwrap(),
        Some(2.0)
    );
    // promtool (Debian package `prometheus`, installed by scripts/test.sh) lints the exposition.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) if std::env::var("CI").is_err() => {
            eprintln!("promtool not installed: lint skipped (scripts/test.sh installs it)")
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_cancels_the_work() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut r = tonic::Request::new(request("too slow for its deadline", 1, 60, 1));
    r.set_timeout(std::time::Duration::from_millis(400));
    let err = t.generator().generate(r).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.metric("imagegen_requests_cancelled_total").await.unwrap() != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired generation kept running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        t.metric("imagegen_images_generated_total").await.unwrap(),
        Some(0.0)
    );
}

/// The whole export of a server's labelled groups, as its metadata document.
async fn exported_groups(t: &TestServer) -> Vec<serde_json::Value> {
    let mut stream = t
        .admin()
        .export_trajectories(pb::ExportRequest {
            include_unlabelled: false,
        })
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
    doc["groups"].as_array().unwrap().clone()
}

/// One token holder is one rater: replaying an image's token with made-up rater ids does not
/// add voters (before, 400 replays counted as 400 raters and outvoted everybody).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_feedback_token_counts_as_one_rater() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let group = client
        .generate(request("replayed", 8, 2, 2))
        .await
        .unwrap()
        .into_inner();
    let (a, b) = (&group.images[0], &group.images[1]);
    for i in 0..20 {
        let rater = format!("sock-puppet-{i}");
        client
            .submit_feedback(feedback(a, Feedback::Vote(pb::Vote::Up as i32), &rater, ""))
            .await
            .unwrap();
    }
    client
        .submit_feedback(feedback(
            a,
            Feedback::PreferredOver(b.image_id.clone()),
            "x",
            "",
        ))
        .await
        .unwrap();
    client
        .submit_feedback(feedback(
            b,
            Feedback::PreferredOver(a.image_id.clone()),
            "y",
            "",
        ))
        .await
        .unwrap();
    let groups = exported_groups(&t).await;
    let g = &groups[0];
    let image_a = g["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_id"] == a.image_id.as_str())
        .unwrap();
    let votes = image_a["feedback"]["votes"].as_object().unwrap();
    assert_eq!(votes.len(), 1, "{votes:?}");
    let rater = format!("token:{}", group.group_id);
    assert_eq!(votes[&rater], "up");
    // The token holder changed their mind: the later comparison replaced the earlier one.
    let comparisons = g["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 1, "{comparisons:?}");
    assert_eq!(comparisons[0]["winner"], b.image_id.as_str());
}

/// Idempotency keys are scoped to the caller and image, bound to the request, and atomic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_scoped_bound_and_atomic() {
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = t.generator();
    let first = client
        .generate(request("first", 9, 2, 2))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .generate(request("second", 10, 2, 1))
        .await
        .unwrap()
        .into_inner();
    let up = |image| feedback(image, Feedback::Vote(pb::Vote::Up as i32), "", "shared-key");
    let on_first = client
        .submit_feedback(up(&first.images[0]))
        .await
        .unwrap()
        .into_inner();
    // The same key on another image is another request (before: `duplicate` with the first
    // image's group id, and the vote silently dropped).
    let on_second = client
        .submit_feedback(up(&second.images[0]))
        .await
        .unwrap()
        .into_inner();
    assert!(!on_second.duplicate);
    assert_eq!(on_second.group_id, second.group_id);
    assert_ne!(on_second.feedback_id, on_first.feedback_id);
    // The same key and image with a different body is refused, as payment APIs do.
    let down = feedback(
        &first.images[0],
        Feedback::Vote(pb::Vote::Down as i32),
        "",
        "shared-key",
    );
    let err = client.submit_feedback(down).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("idempotency_key"), "{err:?}");

    // Concurrent retries of one new request apply once.
    let image = first.images[1].clone();
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let mut c = t.generator();
            let r = feedback(&image, Feedback::Vote(pb::Vote::Up as i32), "", "retried");
            tokio::spawn(async move { c.submit_feedback(r).await.unwrap().into_inner() })
        })
        .collect();
    let mut answers = Vec::new();
    for r in retries {
        answers.push(r.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(
        answers
            .iter()
            .all(|a| a.feedback_id == answers[0].feedback_id)
    );
    assert_eq!(
        t.metric("imagegen_feedback_total{kind=\"vote_up\"}")
            .await
            .unwrap(),
        Some(3.0)
    );
}

/// Both reflection versions are served: grpcio-reflection, older grpcurl and several GUI clients
/// speak only `v1alpha`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_in_v1_and_v1alpha() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let t = TestServer::start(|_| {}).await.unwrap();
    let mut client = ServerReflectionClient::new(t.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected answer {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"imagegen.v1.ImageGenerator"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

/// The Adapters service checks the admin key on the headers, before it reads the body, and
/// refuses imports over `--max-import-bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_unauthenticated_imports_are_refused_before_decoding() {
    let t = TestServer::start(|c| {
        c.api_keys = Some(format!("admin {KEY}"));
        c.max_import_bytes = 1 << 20;
    })
    .await
    .unwrap();
    let big = pb::ImportAdapterRequest {
        adapter_model_safetensors: vec![0u8; 4 << 20],
        adapter_config_json: b"{}".to_vec(),
    };
    let err = t.adapters().import_adapter(big.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = t.adapters().import_adapter(keyed(big)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err:?}"
    );
    // Within the limit, with the key, the body reaches the handler (and is judged on content).
    let small = pb::ImportAdapterRequest {
        adapter_model_safetensors: b"not safetensors".to_vec(),
        adapter_config_json: b"{}".to_vec(),
    };
    let err = t.adapters().import_adapter(keyed(small)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}
