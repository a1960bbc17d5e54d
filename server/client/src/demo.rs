//! The scripted-user session behind `imagegen demo` and the learning benchmark: a user with a
//! taste teaches a running server through its public API. Each round it asks for groups of
//! images of prompts that leave its taste open, spends a fixed budget of labels on them (thumbs,
//! "A is better than B" and best-of picks in turn), triggers a D3PO round and waits for the new
//! adapter to go live. After every round live and base draw the same held-out prompts and seeds
//! (never rated), scored by the taste, with a paired t statistic; and the held-out captions of
//! the built-in model's prompt-accuracy figure, to show what the taste cost elsewhere.

use std::time::{Duration, Instant};

use image::RgbImage;
use imagegen_proto::v1 as pb;
use pb::adapters_client::AdaptersClient;
use pb::feedback_request::Feedback;
use pb::image_generator_client::ImageGeneratorClient;
use tonic::transport::Channel;

pub use crate::figures::write_figures;
pub use crate::tastes::Taste;
use crate::with_key;

/// How the scripted user rates one group of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackKind {
    /// Up on the better half, down on the worse half: one label per image.
    Thumbs,
    /// "The best is better than the worst": one label.
    Pairwise,
    /// The best of the group: one label.
    BestOf,
}

/// How the session runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The scripted user's taste.
    pub taste: Taste,
    /// Rounds of feedback and training.
    pub rounds: usize,
    /// Labels (feedback requests) the user spends per round.
    pub labels_per_round: usize,
    /// Images per request the user rates (2 or more).
    pub images_per_request: u32,
    /// The kinds of feedback, one per request in turn.
    pub kinds: Vec<FeedbackKind>,
    /// Held-out images scored per adapter (evaluation prompts, fixed seeds, never rated).
    pub eval_images: usize,
    /// Held-out captions of the prompt-accuracy figure per adapter (0: not measured).
    pub accuracy_prompts: usize,
    /// Denoising steps of every image the user rates and scores.
    pub steps: u32,
    /// Denoising steps of the prompt-accuracy images (the `evaluate` figure uses 20).
    pub accuracy_steps: u32,
    /// Seed of the user's requests (different seeds: a different user).
    pub seed: u64,
    /// API key, when the server requires one (the adapters calls need the admin role).
    pub api_key: Option<String>,
    /// Longest wait for one training round.
    pub round_timeout: Duration,
}

impl DemoConfig {
    /// A session for `taste` with the benchmark's settings.
    pub fn new(taste: Taste) -> Self {
        Self {
            taste,
            rounds: 4,
            labels_per_round: 50,
            images_per_request: 4,
            kinds: vec![
                FeedbackKind::Thumbs,
                FeedbackKind::Pairwise,
                FeedbackKind::BestOf,
            ],
            eval_images: 64,
            accuracy_prompts: 48,
            steps: 10,
            accuracy_steps: 20,
            seed: 1,
            api_key: None,
            round_timeout: Duration::from_secs(1800),
        }
    }
}

/// One row of the learning curve.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundScore {
    /// 0 = before any feedback.
    pub round: usize,
    /// Labels spent in all, up to this round.
    pub labels: usize,
    /// The live adapter after the round (empty = base).
    pub generation: String,
    /// Whether the round's adapter passed the gate and went live.
    pub published: bool,
    /// Why the round's adapter was refused (empty when published).
    pub reason: String,
    /// Mean taste score of the live adapter's held-out images.
    pub live: f64,
    /// Mean taste score of the base model's held-out images (the same prompts and seeds).
    pub base: f64,
    /// Paired t statistic of live - base over the held-out images.
    pub t: f64,
    /// Prompt accuracy with the live adapter (`None`: not measured).
    pub accuracy_live: Option<f64>,
    /// Prompt accuracy of the base model.
    pub accuracy_base: Option<f64>,
    /// Seconds from the round's last label to its adapter being live (or refused).
    pub round_seconds: f64,
    /// The live adapter's drift from the base model as its round measured it (KL per step and
    /// latent element, nats; `None`: base or not measured).
    pub drift: Option<f64>,
}

/// What the session produced.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The taste taught.
    pub taste: Taste,
    /// One row per round, round 0 (base) first.
    pub rounds: Vec<RoundScore>,
    /// The first held-out images of every round (row 0 = base), PNG bytes.
    pub images: Vec<Vec<Vec<u8>>>,
    /// The prompt of each column of `images`.
    pub columns: Vec<String>,
}

/// Held-out images kept per round for the grid.
const GRID_COLUMNS: usize = 8;

impl DemoReport {
    /// The learning curve as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| taste | round | labels | adapter | live/base score | paired t | prompt accuracy live/base | drift | round time |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rounds {
            let adapter = match (r.round, r.published) {
                (0, _) => "base".to_string(),
                (_, true) => r.generation.chars().take(12).collect(),
                (_, false) => format!("refused: {}", without_parentheses(&r.reason)),
            };
            let accuracy = match (r.accuracy_live, r.accuracy_base) {
                (Some(l), Some(b)) => format!("{:.1}% / {:.1}%", 100.0 * l, 100.0 * b),
                _ => "-".into(),
            };
            let drift = r.drift.map_or_else(|| "-".into(), |d| format!("{d:.4}"));
            let time = if r.round == 0 {
                "-".into()
            } else {
                format!("{:.0} s", r.round_seconds)
            };
            out.push_str(&format!(
                "| {} | {} | {} | {adapter} | {:.4} / {:.4} ({:+.1}%) | {:.2} | {accuracy} | {drift} | {time} |\n",
                self.taste.name(),
                r.round,
                r.labels,
                r.live,
                r.base,
                100.0 * (r.live / r.base.max(1e-12) - 1.0),
                r.t,
            ));
        }
        out
    }
}

/// `reason` without its parenthesised explanations (the table's cell; the log has them whole).
fn without_parentheses(reason: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::with_capacity(reason.len());
    for c in reason.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The paired t statistic of `after - before` (0 for fewer than two pairs or no difference).
pub fn paired_t(before: &[f64], after: &[f64]) -> f64 {
    let diffs: Vec<f64> = before.iter().zip(after).map(|(b, a)| a - b).collect();
    let n = diffs.len() as f64;
    if diffs.len() < 2 {
        return 0.0;
    }
    let mean = diffs.iter().sum::<f64>() / n;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
    if var == 0.0 {
        return if mean == 0.0 {
            0.0
        } else {
            mean.signum() * f64::INFINITY
        };
    }
    mean / (var / n).sqrt()
}

fn decode(png: &[u8]) -> Result<RgbImage, tonic::Status> {
    image::load_from_memory(png)
        .map(|i| i.to_rgb8())
        .map_err(|e| tonic::Status::internal(format!("the server sent an unreadable image: {e}")))
}

/// One image's score under the taste.
fn score(taste: Taste, png: &[u8]) -> Result<f64, tonic::Status> {
    let rgb = decode(png)?;
    Ok(taste.score(rgb.as_raw(), rgb.width() as usize))
}

/// Runs the session against the server behind `channel`. `log` receives one line per event.
pub async fn run(
    channel: Channel,
    config: &DemoConfig,
    log: &mut dyn FnMut(&str),
) -> Result<DemoReport, tonic::Status> {
    if config.images_per_request < 2 || config.kinds.is_empty() {
        return Err(tonic::Status::invalid_argument(
            "the scripted user needs at least 2 images per request and one kind of feedback",
        ));
    }
    let generator = ImageGeneratorClient::new(channel.clone());
    let mut adapters = AdaptersClient::new(channel);
    let key = &config.api_key;
    let taste = config.taste;
    let eval_prompts = taste.evaluation_prompts();
    let eval: Vec<(String, u64)> = (0..config.eval_images)
        .map(|i| {
            let prompt = eval_prompts[i % eval_prompts.len()].clone();
            (prompt, 900_000 + config.seed * 1_000 + i as u64)
        })
        .collect();
    let captions = imagegen_shapes::held_out_captions(4242, config.accuracy_prompts, 64);

    let (base_scores, base_images) = taste_scores(&generator, config, &eval, "base").await?;
    let base = mean(&base_scores);
    let accuracy_base = prompt_accuracy(&generator, config, &captions, "base").await?;
    log(&format!(
        "{}: base score {base:.4}, prompt accuracy {}",
        taste.name(),
        percent(accuracy_base)
    ));
    let mut report = DemoReport {
        taste,
        rounds: vec![RoundScore {
            round: 0,
            labels: 0,
            generation: String::new(),
            published: true,
            reason: String::new(),
            live: base,
            base,
            t: 0.0,
            accuracy_live: accuracy_base,
            accuracy_base,
            round_seconds: 0.0,
            drift: None,
        }],
        images: vec![base_images],
        columns: eval
            .iter()
            .take(GRID_COLUMNS)
            .map(|(p, _)| p.clone())
            .collect(),
    };
    let prompts = taste.training_prompts();
    let mut labels = 0;
    let mut request = 0usize;
    for round in 1..=config.rounds {
        let started = Instant::now();
        let mut spent = 0;
        while spent < config.labels_per_round {
            let prompt = &prompts[(request * 7 + round) % prompts.len()];
            let seed = config.seed * 1_000_000 + (request as u64) * 100;
            let kind = config.kinds[request % config.kinds.len()];
            request += 1;
            let r = generate(
                &generator,
                config,
                prompt,
                seed,
                config.images_per_request,
                "",
            )
            .await?;
            let scores = r
                .images
                .iter()
                .map(|i| score(taste, &i.data))
                .collect::<Result<Vec<_>, _>>()?;
            let budget = config.labels_per_round - spent;
            for (n, feedback) in rate(kind, &r.images, &scores, budget)
                .into_iter()
                .enumerate()
            {
                let (image, feedback) = feedback;
                let request = pb::FeedbackRequest {
                    image_id: image.image_id.clone(),
                    feedback_token: image.feedback_token.clone(),
                    feedback: Some(feedback),
                    rater_id: format!("scripted-{}", config.seed),
                    idempotency_key: format!("{}-{n}", image.image_id),
                };
                let mut client = generator.clone();
                client.submit_feedback(with_key(request, key)?).await?;
                spent += 1;
            }
        }
        labels += spent;
        let rated = started.elapsed().as_secs_f64();
        let last_label = Instant::now();
        let (before, status) = train_round(&mut adapters, key, config.round_timeout)
            .await
            .map_err(|e| {
                tonic::Status::new(e.code(), format!("training round {round}: {}", e.message()))
            })?;
        let round_seconds = last_label.elapsed().as_secs_f64();
        let published = status.rounds_published > before.rounds_published;
        let listing = adapters
            .list_adapters(with_key(pb::ListAdaptersRequest {}, key)?)
            .await?
            .into_inner();
        let drift = listing
            .adapters
            .iter()
            .find(|a| a.generation == listing.live)
            .and_then(|a| a.stats.as_ref())
            .and_then(|s| s.drift);
        let live_generation = listing.live;
        let (live_scores, images) = taste_scores(&generator, config, &eval, "").await?;
        let accuracy_live = prompt_accuracy(&generator, config, &captions, "").await?;
        let row = RoundScore {
            round,
            labels,
            generation: live_generation,
            published,
            reason: if published {
                String::new()
            } else {
                status.last_reason.clone()
            },
            live: mean(&live_scores),
            base,
            t: paired_t(&base_scores, &live_scores),
            accuracy_live,
            accuracy_base,
            round_seconds,
            drift,
        };
        log(&format!(
            "{} round {round}: {spent} labels in {rated:.0} s; {} in {round_seconds:.0} s; live {:.4} vs base {base:.4} (t {:.2}), prompt accuracy {} vs {}",
            taste.name(),
            if published {
                format!("published {}", row.generation)
            } else {
                format!("refused ({})", row.reason)
            },
            row.live,
            row.t,
            percent(accuracy_live),
            percent(accuracy_base),
        ));
        report.rounds.push(row);
        report.images.push(images);
    }
    Ok(report)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// The feedback the user gives on one group, at most `budget` labels: `(image, feedback)`.
/// Nothing when the taste cannot tell the images apart.
fn rate<'a>(
    kind: FeedbackKind,
    images: &'a [pb::GeneratedImage],
    scores: &[f64],
    budget: usize,
) -> Vec<(&'a pb::GeneratedImage, Feedback)> {
    let mut order: Vec<usize> = (0..images.len().min(scores.len())).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (Some(&best), Some(&worst)) = (order.first(), order.last()) else {
        return Vec::new();
    };
    if scores[best] == scores[worst] || budget == 0 {
        return Vec::new();
    }
    let pairwise = || {
        vec![(
            &images[best],
            Feedback::PreferredOver(images[worst].image_id.clone()),
        )]
    };
    match kind {
        FeedbackKind::Pairwise => pairwise(),
        // A tie at the top would make the pick arbitrary.
        FeedbackKind::BestOf if scores[order[1]] < scores[best] => {
            vec![(&images[best], Feedback::BestOf(pb::BestOf {}))]
        }
        FeedbackKind::BestOf => pairwise(),
        FeedbackKind::Thumbs if budget < 2 => pairwise(),
        FeedbackKind::Thumbs => {
            let n = order.len();
            let median = (scores[order[(n - 1) / 2]] + scores[order[n / 2]]) / 2.0;
            // Outermost first (best, worst, second best, ...): a short budget still says most.
            (0..n)
                .map(|k| {
                    if k % 2 == 0 {
                        order[k / 2]
                    } else {
                        order[n - 1 - k / 2]
                    }
                })
                .filter(|&i| scores[i] != median)
                .map(|i| {
                    let vote = if scores[i] > median {
                        pb::Vote::Up
                    } else {
                        pb::Vote::Down
                    };
                    (&images[i], Feedback::Vote(vote as i32))
                })
                .take(budget)
                .collect()
        }
    }
}

async fn generate(
    client: &ImageGeneratorClient<Channel>,
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
        .clone()
        .generate(with_key(request, &config.api_key)?)
        .await
        .map(|r| r.into_inner())
}

/// One image of each `(prompt, seed)` under `adapter` ("base" or "" for live), four requests
/// at a time so the server can batch them, in order.
async fn one_image_each(
    client: &ImageGeneratorClient<Channel>,
    config: &DemoConfig,
    items: &[(String, u64)],
    steps: u32,
    adapter: &str,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(4) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (prompt, seed)) in chunk.iter().enumerate() {
            let request = pb::GenerateRequest {
                prompt: prompt.clone(),
                num_images: Some(1),
                seed: Some(*seed),
                steps: Some(steps),
                adapter: adapter.to_string(),
                ..Default::default()
            };
            let request = with_key(request, &config.api_key)?;
            let mut client = client.clone();
            tasks.spawn(async move { (i, client.generate(request).await) });
        }
        let mut images = vec![Vec::new(); chunk.len()];
        while let Some(done) = tasks.join_next().await {
            let (i, response) =
                done.map_err(|e| tonic::Status::internal(format!("a request task failed: {e}")))?;
            let image = response?.into_inner().images.into_iter().next();
            images[i] = image
                .ok_or_else(|| tonic::Status::internal("the server returned no image"))?
                .data;
        }
        out.extend(images);
    }
    Ok(out)
}

/// Taste scores of one image per held-out `(prompt, seed)`, and the first images for the grid.
async fn taste_scores(
    client: &ImageGeneratorClient<Channel>,
    config: &DemoConfig,
    eval: &[(String, u64)],
    adapter: &str,
) -> Result<(Vec<f64>, Vec<Vec<u8>>), tonic::Status> {
    let images = one_image_each(client, config, eval, config.steps, adapter).await?;
    let scores = images
        .iter()
        .map(|png| score(config.taste, png))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((scores, images.into_iter().take(GRID_COLUMNS).collect()))
}

/// The share of `captions` drawn with the asked shape and colour (`None` when there are none).
async fn prompt_accuracy(
    client: &ImageGeneratorClient<Channel>,
    config: &DemoConfig,
    captions: &[String],
    adapter: &str,
) -> Result<Option<f64>, tonic::Status> {
    if captions.is_empty() {
        return Ok(None);
    }
    let items: Vec<(String, u64)> = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), 7_000 + i as u64))
        .collect();
    let images = one_image_each(client, config, &items, config.accuracy_steps, adapter).await?;
    let mut correct = 0;
    for (caption, png) in captions.iter().zip(&images) {
        let rgb = decode(png)?;
        correct += usize::from(imagegen_shapes::draws_prompt(
            caption,
            rgb.as_raw(),
            rgb.width() as usize,
        ));
    }
    Ok(Some(correct as f64 / captions.len() as f64))
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
    fn paired_t_matches_a_hand_computation() {
        // Differences 1, 2, 3: mean 2, sample sd 1, t = 2 / (1 / sqrt 3) = 3.4641.
        let t = paired_t(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]);
        assert!((t - 2.0 * 3f64.sqrt()).abs() < 1e-12, "{t}");
        assert_eq!(paired_t(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert_eq!(paired_t(&[1.0, 2.0], &[2.0, 3.0]), f64::INFINITY);
        assert_eq!(paired_t(&[1.0], &[5.0]), 0.0);
    }

    #[test]
    fn table_cells_drop_parenthesised_explanations() {
        assert_eq!(
            without_parentheses("drift 0.14 (mean KL (per step) on 16 chains) exceeds 0.1"),
            "drift 0.14 exceeds 0.1"
        );
        assert_eq!(without_parentheses("plain"), "plain");
    }

    fn images(n: usize) -> Vec<pb::GeneratedImage> {
        (0..n)
            .map(|i| pb::GeneratedImage {
                image_id: format!("img{i}"),
                ..Default::default()
            })
            .collect()
    }

    fn described(feedback: &[(&pb::GeneratedImage, Feedback)]) -> Vec<String> {
        feedback
            .iter()
            .map(|(image, f)| match f {
                Feedback::Vote(v) if *v == pb::Vote::Up as i32 => format!("{} up", image.image_id),
                Feedback::Vote(_) => format!("{} down", image.image_id),
                Feedback::PreferredOver(other) => format!("{} > {other}", image.image_id),
                Feedback::BestOf(_) => format!("{} best", image.image_id),
            })
            .collect()
    }

    #[test]
    fn the_scripted_user_states_what_its_scores_say_within_its_budget() {
        let group = images(4);
        let scores = [0.2, 0.9, 0.1, 0.5];
        let rated = |kind, budget| described(&rate(kind, &group, &scores, budget));
        assert_eq!(rated(FeedbackKind::Pairwise, 9), ["img1 > img2"]);
        assert_eq!(rated(FeedbackKind::BestOf, 9), ["img1 best"]);
        // Median 0.35: the outermost first.
        assert_eq!(
            rated(FeedbackKind::Thumbs, 9),
            ["img1 up", "img2 down", "img3 up", "img0 down"]
        );
        assert_eq!(rated(FeedbackKind::Thumbs, 2), ["img1 up", "img2 down"]);
        // One label left: a thumb alone makes no pair, a comparison does.
        assert_eq!(rated(FeedbackKind::Thumbs, 1), ["img1 > img2"]);
        assert!(rated(FeedbackKind::Pairwise, 0).is_empty());
        // A tie at the top: no arbitrary best-of pick.
        let tied = [0.9, 0.9, 0.1, 0.5];
        assert_eq!(
            described(&rate(FeedbackKind::BestOf, &group, &tied, 9)),
            ["img0 > img2"]
        );
        // Nothing to tell apart: nothing said.
        assert!(rate(FeedbackKind::Thumbs, &group, &[0.3; 4], 9).is_empty());
    }

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
            taste: Taste::LargerShapes,
            rounds: (0..3)
                .map(|round| RoundScore {
                    round,
                    labels: 50 * round,
                    generation: format!("g{round}"),
                    published: true,
                    reason: String::new(),
                    live: 0.1 + 0.05 * round as f64,
                    base: 0.1,
                    t: 2.0 * round as f64,
                    accuracy_live: Some(0.8),
                    accuracy_base: Some(0.8),
                    round_seconds: 30.0,
                    drift: Some(0.0123),
                })
                .collect(),
            images: vec![vec![png(10), png(20)]; 3],
            columns: vec!["a red circle".into(), "a blue square".into()],
        };
        let dir = tempfile::tempdir().unwrap();
        write_figures(&report, dir.path()).unwrap();
        let grid = image::open(dir.path().join("grid.png")).unwrap().to_rgb8();
        // Row labels 72 px, a 14 px header of column prompts, 64 px cells with 4 px gutters.
        assert_eq!(
            (grid.width(), grid.height()),
            (72 + 2 * 68 + 4, 14 + 3 * 68 + 4)
        );
        // Labels are drawn in ink on the label column and the header.
        let inked = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1).any(|x| (y0..y1).any(|y| *grid.get_pixel(x, y) == Rgb([60, 60, 60])))
        };
        assert!(inked(0, 72, 14, 14 + 68), "row label");
        assert!(inked(76, 140, 0, 14), "column label");
        let plot = image::open(dir.path().join("scores.png"))
            .unwrap()
            .to_rgb8();
        // The live series (blue) and the base series (grey) are drawn, and the title in ink.
        assert!(plot.pixels().any(|p| *p == Rgb([30, 90, 220])));
        assert!(plot.pixels().any(|p| *p == Rgb([150, 150, 150])));
        assert!((0..600).any(|x| (8..22).any(|y| *plot.get_pixel(x, y) == Rgb([60, 60, 60]))));
        let table = report.table();
        assert!(
            table.contains("| larger shapes | 2 | 100 | g2 | 0.2000 / 0.1000 (+100.0%) | 4.00 | 80.0% / 80.0% | 0.0123 | 30 s |"),
            "{table}"
        );
    }
}
