//! The built-in trained model through the real API: it draws the shapes and colours prompts
//! ask for far above chance, and the demo loop (generate, rate, train, swap, evaluate) runs
//! against it.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use imagegen_client::demo::{DemoConfig, Taste, run, write_figures};
use imagegen_proto::v1 as pb;
use imagegen_server::builtin::held_out_prompts;
use imagegen_shapes::{evaluate, parse_prompt};
use imagegen_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_model_draws_prompts_and_the_demo_loop_runs() {
    let t = TestServer::start_builtin(|c| {
        c.plugins.d3po.lr = 1e-3;
        c.plugins.d3po.min_pairs = 1_000_000; // rounds run only when the demo triggers them
        c.plugins.d3po.heldout_fraction = 0.0;
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

    let config = DemoConfig {
        rounds: 1,
        labels_per_round: 6,
        eval_images: 3,
        accuracy_prompts: 4,
        steps: 4,
        accuracy_steps: 4,
        round_timeout: Duration::from_secs(600),
        ..DemoConfig::new(Taste::LargerShapes)
    };
    let report = run(t.channel.clone(), &config, &mut |line| eprintln!("{line}"))
        .await
        .unwrap();
    assert_eq!(report.rounds.len(), 2);
    assert_eq!(report.rounds[1].labels, 6);
    assert!(report.rounds[1].accuracy_live.is_some());
    assert!(report.rounds[1].published, "{}", report.table());
    assert!(!report.rounds[1].generation.is_empty());
    assert_eq!(report.images.len(), 2);
    assert!(report.images.iter().all(|row| row.len() == 3));
    let dir = tempfile::tempdir().unwrap();
    write_figures(&report, dir.path()).unwrap();
    for file in ["grid.png", "scores.png"] {
        assert!(image::open(dir.path().join(file)).is_ok(), "{file}");
    }
    eprintln!("{}", report.table());
}
