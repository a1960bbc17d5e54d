//! The built-in trained model through the real API: it draws the shapes and colours prompts
//! ask for far above chance, and a short scripted round of the demo
//! (generate, rate, train, swap, evaluate) moves the live adapter the rater's way.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use imagegen_client::demo::{DemoConfig, Taste, run, write_figures};
use imagegen_proto::v1 as pb;
use imagegen_server::builtin::held_out_prompts;
use imagegen_shapes::{evaluate, parse_prompt};
use imagegen_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_model_draws_prompts_and_the_demo_loop_runs() {
    // The default training settings: the scripted round below checks that they learn.
    let t = TestServer::start_builtin(|c| {
        c.plugins.d3po.min_pairs = 1_000_000; // rounds run only when the demo triggers them
    })
    .await
    .unwrap();

    // Held-out combinations of shape, colour and background. Shape and colour are both right 1
    // time in 24 by chance; 5 of 8 by luck has a chance of 7e-6 (82% were right
    // when measured, 8 of these 8).
    let mut client = t.generator();
    let prompts = held_out_prompts(5, 8, 64);
    let mut matched = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let r = client
            .generate(pb::GenerateRequest {
                prompt: prompt.clone(),
                seed: Some(i as u64),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.model_id, "builtin-shapes");
        let img = image::load_from_memory(&r.images[0].data)
            .unwrap()
            .to_rgb8();
        let seen = evaluate(img.as_raw(), 64);
        let asked = parse_prompt(prompt);
        matched += usize::from(
            seen.is_some_and(|s| Some(s.colour) == asked.colour && Some(s.shape) == asked.shape),
        );
    }
    eprintln!("built-in model over gRPC: {matched}/8 held-out prompts drawn as asked");
    assert!(matched >= 5, "{matched}/8 held-out prompts drawn as asked");

    // One short scripted round of the learning benchmark (50 labels of thumbs, comparisons and
    // best-of picks): the live adapter must move the held-out score the rater's way.
    let config = DemoConfig {
        rounds: 1,
        eval_images: 16,
        accuracy_prompts: 4,
        accuracy_steps: 10,
        round_timeout: Duration::from_secs(1800),
        ..DemoConfig::new(Taste::Brighter)
    };
    let report = run(t.channel.clone(), &config, &mut |line| eprintln!("{line}"))
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    let round = &report.rounds[1];
    assert_eq!(round.labels, 50);
    assert!(round.accuracy_live.is_some());
    assert!(
        round.live > round.base && round.t > 1.0,
        "the live adapter did not move the rater's way:\n{}",
        report.table()
    );
    assert!(report.rounds[1].published, "{}", report.table());
    assert!(!report.rounds[1].generation.is_empty());
    assert_eq!(report.images.len(), 2);
    assert!(report.images.iter().all(|row| row.len() == 8));
    let dir = tempfile::tempdir().unwrap();
    write_figures(&report, dir.path()).unwrap();
    for file in ["grid.png", "scores.png"] {
        assert!(image::open(dir.path().join(file)).is_ok(), "{file}");
    }
    eprintln!("{}", report.table());
}
