//! Learning benchmark: scripted users teach the built-in model their taste through the public
//! gRPC API, on a server with the default training settings; prints figures, asserts nothing.
//!
//! One fresh server per taste (brighter, larger shapes, warm colours). Each round the user spends
//! `BENCH_LEARN_LABELS` labels (thumbs, "A is better than B" and best-of picks in turn, on groups
//! of 4 images) and triggers a D3PO round; after it, live and base draw the same held-out
//! prompts and seeds (never rated): the taste's score of both, the paired t statistic, the
//! built-in model's held-out prompt accuracy with either (the `evaluate` figure's captions) and
//! the time from the round's last label to its adapter going live.
//!
//! `BENCH_LEARN_TASTES=brighter,larger,warm`, `BENCH_LEARN_ROUNDS=4`, `BENCH_LEARN_LABELS=50`;
//! `BENCH_LEARN_OUT=dir` writes each taste's grid and plot there. Training settings other than
//! the defaults come from the usual `IMAGEGEN_D3PO_*` variables.

use std::time::Duration;

use imagegen_client::demo::{DemoConfig, Taste, run, write_figures};
use imagegen_server::config::ServeConfig;
use imagegen_tests::TestServer;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Rounds run when the user triggers them, never on the timer; everything else is the defaults
/// (or the `IMAGEGEN_D3PO_*` environment).
fn configure(config: &mut ServeConfig) {
    config.plugins.d3po.interval_secs = 1_000_000;
    config.plugins.d3po.min_pairs = 1_000_000;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tastes = std::env::var("BENCH_LEARN_TASTES").unwrap_or("brighter,larger,warm".into());
    let out = std::env::var("BENCH_LEARN_OUT").ok();
    let mut tables = String::new();
    for name in tastes.split(',') {
        let taste = match name.trim() {
            "brighter" => Taste::Brighter,
            "larger" => Taste::LargerShapes,
            "warm" => Taste::WarmColours,
            other => anyhow::bail!("unknown taste {other:?}: brighter, larger or warm"),
        };
        let mut settings = ServeConfig::defaults()?;
        configure(&mut settings);
        eprintln!("{}: {:?}", taste.name(), settings.plugins.d3po);
        let server = TestServer::start_builtin(configure).await?;
        let config = DemoConfig {
            rounds: env_or("BENCH_LEARN_ROUNDS", 4),
            labels_per_round: env_or("BENCH_LEARN_LABELS", 50),
            round_timeout: Duration::from_secs(1800),
            ..DemoConfig::new(taste)
        };
        let report = run(server.channel.clone(), &config, &mut |line| {
            eprintln!("{line}")
        })
        .await?;
        if let Some(dir) = &out {
            let dir = std::path::Path::new(dir).join(name.trim());
            write_figures(&report, &dir)?;
            std::fs::write(dir.join("scores.md"), report.table())?;
        }
        let table = report.table();
        println!("{table}");
        tables.push_str(&table);
    }
    println!(
        "\nlearning benchmark (built-in model, {}):\n{tables}",
        cpu()
    );
    Ok(())
}

/// The CPU's model name and vector extensions (figures mean nothing without them).
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let extensions: Vec<&str> = ["avx512f", "avx2", "fma"]
        .into_iter()
        .filter(|f| flags.split(' ').any(|x| x == *f))
        .collect();
    format!(
        "{}, {} threads, {}",
        field("model name"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        extensions.join(" + ")
    )
}
