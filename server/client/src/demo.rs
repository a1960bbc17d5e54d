//! `imagegen demo`: a scripted user teaches a running server its taste. Each round generates
//! pairs of images, says which of each pair it prefers, triggers a D3PO round and waits for the
//! new adapter to go live; then base and live draw the same evaluation prompts and seeds, and
//! the user's preference score of both is recorded. The results are a score table, an image
//! grid (base, then live after every round) and a plot of the scores, both PNG.

use std::time::{Duration, Instant};

use image::RgbImage;
use imagegen_proto::v1 as pb;
use pb::adapters_client::AdaptersClient;
use pb::feedback_request::Feedback;
use pb::image_generator_client::ImageGeneratorClient;
use tonic::transport::Channel;

pub use crate::tastes::Taste;

pub use crate::figures::write_figures;
use crate::with_key;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The scripted user's taste.
    pub taste: Taste,
    /// Rounds of feedback and training.
    pub rounds: usize,
    /// Image pairs rated per round.
    pub pairs_per_round: usize,
    /// Evaluation images per adapter (fixed prompts and seeds, never rated).
    pub eval_images: usize,
    /// Denoising steps of every image.
    pub steps: u32,
    /// API key, when the server requires one (the adapters calls need the admin role).
    pub api_key: Option<String>,
    /// Longest wait for one training round.
    pub round_timeout: Duration,
}

/// One row of the score table.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundScore {
    /// 0 = before any feedback.
    pub round: usize,
    /// The live adapter after the round (empty = base).
    pub generation: String,
    /// Whether the round's adapter passed the gate and went live.
    pub published: bool,
    /// Mean score of the live adapter's evaluation images.
    pub live: f64,
    /// Mean score of the base model's evaluation images.
    pub base: f64,
}

/// What the demo produced.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// One row per round, round 0 first.
    pub rounds: Vec<RoundScore>,
    /// Evaluation images per round (row 0 = base), PNG bytes.
    pub images: Vec<Vec<Vec<u8>>>,
}

impl DemoReport {
    /// The score table as text.
    pub fn table(&self) -> String {
        let mut out = String::from("round  adapter           live    base    live-base\n");
        for r in &self.rounds {
            let generation = if r.generation.is_empty() {
                "base".to_string()
            } else {
                r.generation.chars().take(12).collect()
            };
            out.push_str(&format!(
                "{:>5}  {:<12}{}  {:.4}  {:.4}  {:+.4}\n",
                r.round,
                generation,
                if r.round == 0 || r.published {
                    "     "
                } else {
                    " (rej)"
                },
                r.live,
                r.base,
                r.live - r.base
            ));
        }
        out
    }
}

fn decode(png: &[u8]) -> Result<RgbImage, tonic::Status> {
    image::load_from_memory(png)
        .map(|i| i.to_rgb8())
        .map_err(|e| tonic::Status::internal(format!("the server sent an unreadable image: {e}")))
}

/// Runs the demo against the server behind `channel`. `log` receives one line per event.
pub async fn run(
    channel: Channel,
    config: &DemoConfig,
    log: &mut dyn FnMut(&str),
) -> Result<DemoReport, tonic::Status> {
    let mut generator = ImageGeneratorClient::new(channel.clone());
    let mut adapters = AdaptersClient::new(channel);
    let key = &config.api_key;
    let taste = config.taste;
    let prompts = taste.prompts();
    let eval: Vec<(String, u64)> = (0..config.eval_images)
        .map(|i| {
            (
                prompts[(i * 7 + 3) % prompts.len()].clone(),
                900_000 + i as u64,
            )
        })
        .collect();

    let (base, base_images) = evaluate(&mut generator, config, &eval, "base").await?;
    log(&format!("round 0: base score {base:.4}"));
    let mut report = DemoReport {
        rounds: vec![RoundScore {
            round: 0,
            generation: String::new(),
            published: true,
            live: base,
            base,
        }],
        images: vec![base_images],
    };
    for round in 1..=config.rounds {
        let started = Instant::now();
        let mut rated = 0;
        for i in 0..config.pairs_per_round {
            let prompt = &prompts[(round * 31 + i * 5) % prompts.len()];
            let seed = (round * 10_000 + i) as u64;
            let r = generate(&mut generator, config, prompt, seed, 2, "").await?;
            let [a, b] = r.images.as_slice() else {
                return Err(tonic::Status::internal(
                    "asked for 2 images, got another count",
                ));
            };
            let (sa, sb) = (decode(&a.data)?, decode(&b.data)?);
            let (score_a, score_b) = (
                taste.score(sa.as_raw(), sa.width() as usize),
                taste.score(sb.as_raw(), sb.width() as usize),
            );
            if score_a == score_b {
                continue; // no preference, no pair
            }
            let (winner, loser) = if score_a > score_b { (a, b) } else { (b, a) };
            let request = pb::FeedbackRequest {
                image_id: winner.image_id.clone(),
                feedback_token: winner.feedback_token.clone(),
                feedback: Some(Feedback::PreferredOver(loser.image_id.clone())),
                rater_id: "demo".into(),
                idempotency_key: format!("demo-{round}-{i}-{}", r.group_id),
            };
            generator.submit_feedback(with_key(request, key)?).await?;
            rated += 1;
        }
        log(&format!(
            "round {round}: rated {rated} pairs in {:.0} s; training",
            started.elapsed().as_secs_f64()
        ));
        let (before, status) = train_round(&mut adapters, key, config.round_timeout)
            .await
            .map_err(|e| {
                tonic::Status::new(e.code(), format!("training round {round}: {}", e.message()))
            })?;
        let published = status.rounds_published > before.rounds_published;
        let live_generation = adapters
            .list_adapters(with_key(pb::ListAdaptersRequest {}, key)?)
            .await?
            .into_inner()
            .live;
        let (live, images) = evaluate(&mut generator, config, &eval, "").await?;
        log(&format!(
            "round {round}: {} ({}), live score {live:.4} vs base {base:.4}, {:.0} s",
            if published { "published" } else { "rejected" },
            if published {
                live_generation.clone()
            } else {
                status.last_reason.clone()
            },
            started.elapsed().as_secs_f64()
        ));
        report.rounds.push(RoundScore {
            round,
            generation: live_generation,
            published,
            live,
            base,
        });
        report.images.push(images);
    }
    Ok(report)
}

async fn generate(
    client: &mut ImageGeneratorClient<Channel>,
    config: &DemoConfig,
    prompt: &str,
    seed: u64,
    num_images: u32,
    adapter: &str,
) -> Result<pb::GenerateResponse, tonic::Status> {
    let request = pb::GenerateRequest {
        prompt: prompt.to_string(),
        num_images: Some(num_images),
        seed: Some(seed),
        steps: Some(config.steps),
        adapter: adapter.to_string(),
        ..Default::default()
    };
    client
        .generate(with_key(request, &config.api_key)?)
        .await
        .map(|r| r.into_inner())
}

/// Mean score of one image per evaluation prompt and seed, and the images.
async fn evaluate(
    client: &mut ImageGeneratorClient<Channel>,
    config: &DemoConfig,
    eval: &[(String, u64)],
    adapter: &str,
) -> Result<(f64, Vec<Vec<u8>>), tonic::Status> {
    let mut total = 0.0;
    let mut images = Vec::new();
    for (prompt, seed) in eval {
        let r = generate(client, config, prompt, *seed, 1, adapter).await?;
        let Some(image) = r.images.into_iter().next() else {
            return Err(tonic::Status::internal("the server returned no image"));
        };
        let rgb = decode(&image.data)?;
        total += config.taste.score(rgb.as_raw(), rgb.width() as usize);
        images.push(image.data);
    }
    Ok((total / eval.len().max(1) as f64, images))
}

/// Triggers a training round and waits until it is published or rejected; returns the trainer's
/// status before and after. `DEADLINE_EXCEEDED` when no round finishes within `timeout`.
pub async fn train_round(
    adapters: &mut AdaptersClient<Channel>,
    key: &Option<String>,
    timeout: Duration,
) -> Result<(pb::TrainingStatus, pb::TrainingStatus), tonic::Status> {
    let finished = |s: &pb::TrainingStatus| s.rounds_published + s.rounds_rejected;
    let before = adapters
        .get_training_status(with_key(pb::GetTrainingStatusRequest {}, key)?)
        .await?
        .into_inner();
    adapters
        .trigger_training(with_key(pb::TriggerTrainingRequest {}, key)?)
        .await?;
    let deadline = Instant::now() + timeout;
    loop {
        let s = adapters
            .get_training_status(with_key(pb::GetTrainingStatusRequest {}, key)?)
            .await?
            .into_inner();
        if finished(&s) > finished(&before) {
            return Ok((before, s));
        }
        if Instant::now() > deadline {
            return Err(tonic::Status::deadline_exceeded(format!(
                "no training round finished within {timeout:?}: {s:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn figures_are_written() {
        let png = |c| {
            let mut bytes = Vec::new();
            RgbImage::from_pixel(64, 64, Rgb([c, 0, 0]))
                .write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )
                .unwrap();
            bytes
        };
        let report = DemoReport {
            rounds: (0..3)
                .map(|round| RoundScore {
                    round,
                    generation: format!("g{round}"),
                    published: true,
                    live: 0.1 + 0.05 * round as f64,
                    base: 0.1,
                })
                .collect(),
            images: vec![vec![png(10), png(20)]; 3],
        };
        let dir = tempfile::tempdir().unwrap();
        write_figures(&report, dir.path()).unwrap();
        let grid = image::open(dir.path().join("grid.png")).unwrap().to_rgb8();
        assert_eq!((grid.width(), grid.height()), (20 + 2 * 68 + 4, 3 * 68 + 4));
        let plot = image::open(dir.path().join("scores.png"))
            .unwrap()
            .to_rgb8();
        // The live series (blue) is drawn.
        assert!(plot.pixels().any(|p| *p == Rgb([30, 90, 220])));
        assert!(report.table().contains("+0.1000"));
    }
}
