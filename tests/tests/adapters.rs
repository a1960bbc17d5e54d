//! Adapters end to end: training rounds from feedback, the gate, CAS activation, rollback,
//! export/import, persistence across restarts, and generation during swaps.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use imagegen_client::demo::train_round;
use imagegen_proto::v1 as pb;
use imagegen_tests::TestServer;
use pb::feedback_request::Feedback;
use tonic::Code;

fn request(prompt: &str, seed: u64, n: u32, adapter: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        seed: Some(seed),
        steps: Some(4),
        num_images: Some(n),
        adapter: adapter.into(),
        ..Default::default()
    }
}

/// Generates `groups` pairs of images and prefers the first of each; returns the group ids.
async fn rate(t: &TestServer, groups: u64) -> Vec<String> {
    let mut client = t.generator();
    let mut ids = Vec::new();
    for g in 0..groups {
        let r = client
            .generate(request("a small red circle", 100 + g, 2, ""))
            .await
            .unwrap()
            .into_inner();
        let (a, b) = (&r.images[0], &r.images[1]);
        client
            .submit_feedback(pb::FeedbackRequest {
                image_id: a.image_id.clone(),
                feedback_token: a.feedback_token.clone(),
                feedback: Some(Feedback::PreferredOver(b.image_id.clone())),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(r.group_id);
    }
    ids
}

/// Triggers a round and waits until it has been published or rejected.
async fn train(t: &TestServer) -> pb::TrainingStatus {
    let (_, after) = train_round(&mut t.adapters(), &None, Duration::from_secs(120))
        .await
        .unwrap();
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_publishes_an_adapter_that_serves_and_can_be_rolled_back_and_moved() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_path_buf();
    let t = TestServer::start(|c| {
        c.data_dir = Some(data_dir.clone());
        c.plugins.d3po.lr = 1e-3;
        // The random tiny model drifts far on two pairs; the guard has its own test.
        c.plugins.d3po.max_drift = 0.0;
    })
    .await
    .unwrap();
    let groups = rate(&t, 2).await;
    let status = train(&t).await;
    assert_eq!(status.rounds_published, 1, "{status:?}");
    let mut adapters = t.adapters();
    let list = adapters
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.adapters.len(), 1);
    let info = &list.adapters[0];
    assert_eq!(list.live, info.generation);
    assert!(info.live && info.parent.is_empty() && info.origin == "trained");
    assert_eq!(info.stats.as_ref().unwrap().pairs, 2);
    // The drift from the base model is measured and recorded even with the guard off.
    let drift = info.stats.as_ref().unwrap().drift.unwrap();
    assert!(drift > 0.0 && drift.is_finite(), "{drift}");
    let mut learned = info.learned_from.clone();
    learned.sort();
    let mut expected = groups.clone();
    expected.sort();
    assert_eq!(
        learned, expected,
        "the generation records the feedback it learned from"
    );
    assert_eq!(
        t.metric(&format!(
            "imagegen_adapter_live_info{{generation=\"{}\"}}",
            info.generation
        ))
        .await
        .unwrap(),
        Some(1.0)
    );
    assert_eq!(
        t.metric("imagegen_d3po_rounds_total{result=\"published\"}")
            .await
            .unwrap(),
        Some(1.0)
    );

    // New generations use the live adapter; `base` and an explicit id select.
    let mut client = t.generator();
    let live = client
        .generate(request("after training", 1, 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.adapter_generation, info.generation);
    let base = client
        .generate(request("after training", 1, 1, "base"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(base.adapter_generation, "");
    assert_ne!(
        live.images[0].data, base.images[0].data,
        "the adapter changes the image"
    );
    let pinned = client
        .generate(request("after training", 1, 1, &info.generation))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pinned.images[0].data, live.images[0].data);
    let err = client
        .generate(request("x", 1, 1, "0000000000000000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Compare-and-swap: the wrong expectation is ABORTED; the right one swaps.
    let err = adapters
        .activate_adapter(pb::ActivateAdapterRequest {
            generation: String::new(),
            expected_live: "feedbeeffeedbeef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let swapped = adapters
        .activate_adapter(pb::ActivateAdapterRequest {
            generation: String::new(),
            expected_live: info.generation.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (swapped.previous.as_str(), swapped.live.as_str()),
        (info.generation.as_str(), "")
    );
    let back = adapters
        .rollback_adapter(pb::RollbackAdapterRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        back.live, info.generation,
        "rollback undoes the manual switch to base"
    );

    // Export, then import into another server: the same generation id.
    let mut stream = adapters
        .export_adapter(pb::ExportAdapterRequest {
            generation: info.generation.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    while let Some(chunk) = stream.message().await.unwrap() {
        files.entry(chunk.file).or_default().extend(chunk.data);
    }
    let config: serde_json::Value = serde_json::from_slice(&files["adapter_config.json"]).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    // PEFT's layout for `PeftModel.from_pretrained`, diffusers' for `load_lora_weights`.
    for (file, prefix) in [
        ("adapter_model.safetensors", "base_model.model."),
        ("pytorch_lora_weights.safetensors", "unet."),
    ] {
        let tensors = safetensors::SafeTensors::deserialize(&files[file]).unwrap();
        assert!(!tensors.names().is_empty());
        assert!(tensors.names().iter().all(|n| n.starts_with(prefix)
            && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    }
    let other = TestServer::start(|c| c.plugins.d3po.enabled = false)
        .await
        .unwrap();
    let imported = other
        .adapters()
        .import_adapter(pb::ImportAdapterRequest {
            adapter_model_safetensors: files["adapter_model.safetensors"].clone(),
            adapter_config_json: files["adapter_config.json"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.generation, info.generation);
    assert!(!imported.live);
    // The diffusers file imports as the same generation too.
    let again = other
        .adapters()
        .import_adapter(pb::ImportAdapterRequest {
            adapter_model_safetensors: files["pytorch_lora_weights.safetensors"].clone(),
            adapter_config_json: files["adapter_config.json"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.generation, info.generation);
    let err = other
        .adapters()
        .import_adapter(pb::ImportAdapterRequest {
            adapter_model_safetensors: b"junk".to_vec(),
            adapter_config_json: files["adapter_config.json"].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A restart on the same data directory restores the live adapter and the history.
    t.server.stop();
    t.server.wait().await.unwrap();
    let restarted = TestServer::start(|c| c.data_dir = Some(data_dir.clone()))
        .await
        .unwrap();
    let info2 = restarted
        .generator()
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info2.live_adapter, info.generation);
    let again = restarted
        .generator()
        .generate(request("after training", 1, 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.images[0].data, live.images[0].data,
        "the restored adapter draws the same image"
    );
}

/// Rates `groups`, runs one round and checks the gate refused it for `reason`, leaving no
/// generation and nothing live.
async fn assert_one_round_refused(t: &TestServer, groups: u64, reason: &str) {
    rate(t, groups).await;
    let status = train(t).await;
    assert_eq!(
        (status.rounds_published, status.rounds_rejected),
        (0, 1),
        "{status:?}"
    );
    assert!(
        status.last_reason.contains(reason),
        "{}",
        status.last_reason
    );
    let list = t
        .adapters()
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.live.is_empty() && list.adapters.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_adapter_never_goes_live() {
    // An impossible margin: the gate must refuse whatever the round produces.
    let t = TestServer::start(|c| {
        c.plugins.d3po.gate_margin = 2.0;
        c.plugins.d3po.lr = 1e-3;
    })
    .await
    .unwrap();
    assert_one_round_refused(&t, 2, "held-out accuracy").await;
    let r = t
        .generator()
        .generate(request("x", 1, 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.adapter_generation, "");
    assert_eq!(
        t.metric("imagegen_d3po_rounds_total{result=\"rejected\"}")
            .await
            .unwrap(),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drift_guard_refuses_an_adapter_that_moved_beyond_its_budget() {
    // Any trained adapter differs from the base model by more than 1e-12 nats per element.
    let t = TestServer::start(|c| {
        c.plugins.d3po.max_drift = 1e-12;
        c.plugins.d3po.lr = 1e-3;
    })
    .await
    .unwrap();
    assert_one_round_refused(&t, 3, "exceeds --d3po-max-drift").await;
    let drift = t.metric("imagegen_d3po_drift").await.unwrap().unwrap();
    assert!(drift > 1e-12, "{drift}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_during_swaps_sees_no_error() {
    let t = TestServer::start(|c| {
        c.plugins.d3po.lr = 1e-3;
        c.plugins.d3po.max_drift = 0.0; // every round must publish
    })
    .await
    .unwrap();
    rate(&t, 2).await;
    assert_eq!(train(&t).await.rounds_published, 1);
    let live = t
        .adapters()
        .list_adapters(pb::ListAdaptersRequest {})
        .await
        .unwrap()
        .into_inner()
        .live;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let mut client = t.generator();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = client
                        .generate(request("during swaps", w, 1, ""))
                        .await
                        .expect("no request fails because of a swap");
                    assert_eq!(r.into_inner().images.len(), 1);
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut adapters = t.adapters();
    let mut current = live.clone();
    for i in 0..20 {
        let next = if i % 2 == 0 {
            String::new()
        } else {
            live.clone()
        };
        adapters
            .activate_adapter(pb::ActivateAdapterRequest {
                generation: next.clone(),
                expected_live: current.clone(),
            })
            .await
            .unwrap();
        current = next;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(total >= 3, "requests ran during the swaps ({total})");
    assert_eq!(
        t.metric("imagegen_adapter_swaps_total").await.unwrap(),
        Some(21.0)
    );
}
