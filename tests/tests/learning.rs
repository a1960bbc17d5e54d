//! D3PO learns a scripted user's taste end to end through the gRPC API: the rater prefers
//! brighter images; after a few rounds of generate, feedback, train, swap, the live adapter draws
//! brighter images than the base model on fixed seeds it never trained on.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use imagegen_client::demo::train_round;
use imagegen_proto::v1 as pb;
use imagegen_tests::TestServer;
use pb::feedback_request::Feedback;

const STEPS: u32 = 4;

fn brightness(png: &[u8]) -> f64 {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    img.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / img.as_raw().len() as f64
}

async fn mean_brightness(t: &TestServer, adapter: &str, seeds: std::ops::Range<u64>) -> f64 {
    let mut client = t.generator();
    let mut total = 0.0;
    let n = seeds.end - seeds.start;
    for seed in seeds {
        let r = pb::GenerateRequest {
            prompt: "a shape".into(),
            seed: Some(seed),
            steps: Some(STEPS),
            adapter: adapter.into(),
            ..Default::default()
        };
        total += brightness(&client.generate(r).await.unwrap().into_inner().images[0].data);
    }
    total / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_beats_base_for_a_rater_who_prefers_brighter_images() {
    let t = TestServer::start(|c| {
        c.plugins.d3po.lr = std::env::var("LEARN_LR")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1e-3);
        c.plugins.d3po.min_pairs = 1_000_000; // rounds run only when triggered
        c.plugins.d3po.heldout_fraction = 0.0;
        // The random tiny model drifts far beyond the built-in model's budget in a round.
        c.plugins.d3po.max_drift = 0.0;
        // Every time index, as when the figures below were measured: with half of them (the
        // default, chosen on the built-in model) this random tiny model's 4-step chains moved
        // the wrong way in one run (live 81.0 vs base 102.6), an open question.
        c.plugins.d3po.timestep_fraction = 1.0;
    })
    .await
    .unwrap();
    let rounds: u64 = std::env::var("LEARN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let groups: u64 = std::env::var("LEARN_GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let evaluation = 10_000..10_008;
    let base_before = mean_brightness(&t, "base", evaluation.clone()).await;
    let mut client = t.generator();
    let mut adapters = t.adapters();
    for round in 0..rounds {
        for g in 0..groups {
            let r = pb::GenerateRequest {
                prompt: "a shape".into(),
                seed: Some(round * 1000 + g),
                steps: Some(STEPS),
                num_images: Some(2),
                ..Default::default()
            };
            let r = client.generate(r).await.unwrap().into_inner();
            let (a, b) = (&r.images[0], &r.images[1]);
            let (winner, loser) = if brightness(&a.data) >= brightness(&b.data) {
                (a, b)
            } else {
                (b, a)
            };
            client
                .submit_feedback(pb::FeedbackRequest {
                    image_id: winner.image_id.clone(),
                    feedback_token: winner.feedback_token.clone(),
                    feedback: Some(Feedback::PreferredOver(loser.image_id.clone())),
                    rater_id: "scripted".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let (_, s) = train_round(&mut adapters, &None, Duration::from_secs(300))
            .await
            .unwrap_or_else(|e| panic!("round {round} did not finish: {e}"));
        assert_eq!(s.rounds_published, round + 1, "round {round}: {s:?}");
        let live = mean_brightness(&t, "", evaluation.clone()).await;
        eprintln!("round {round}: live brightness {live:.2} (base {base_before:.2})");
    }
    let base = mean_brightness(&t, "base", evaluation.clone()).await;
    let live = mean_brightness(&t, "", evaluation).await;
    eprintln!("base {base:.2} live {live:.2}");
    assert_eq!(base, base_before, "the base model is untouched");
    // Measured: 102.6 -> 123.0, 108.6, 118.3, 132.4 over four rounds (lr 1e-3, 12 pairs each).
    assert!(
        live > base + 10.0,
        "live {live:.2} should be brighter than base {base:.2} by at least 10 grey levels"
    );
}
