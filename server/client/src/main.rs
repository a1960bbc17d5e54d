//! `imagegen`: command-line client of the image-generation server.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use imagegen_client::with_key;
use imagegen_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use pb::adapters_client::AdaptersClient;
use pb::admin_client::AdminClient;
use pb::image_generator_client::ImageGeneratorClient;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "imagegen", version, about = "Client of the imagegen server")]
struct Cli {
    /// Server address.
    #[arg(
        long,
        env = "IMAGEGEN_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// API key, when the server requires one.
    #[arg(long, env = "IMAGEGEN_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Png,
    Jpeg,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images and write them to files (with a progress bar).
    Generate {
        /// What to draw.
        prompt: String,
        /// What to avoid.
        #[arg(long, default_value = "")]
        negative: String,
        /// Number of images.
        #[arg(short = 'n', long)]
        num_images: Option<u32>,
        /// Seed (random when absent; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Start every image from the same initial noise (variations of one layout) instead of
        /// image i from seed + i.
        #[arg(long)]
        shared_noise: bool,
        /// Denoising steps.
        #[arg(long)]
        steps: Option<u32>,
        /// Guidance scale.
        #[arg(long)]
        guidance: Option<f32>,
        /// Width in pixels.
        #[arg(long)]
        width: Option<u32>,
        /// Height in pixels.
        #[arg(long)]
        height: Option<u32>,
        /// DDIM eta in (0, 1].
        #[arg(long)]
        eta: Option<f32>,
        /// Adapter: empty = live, `base`, or a generation id.
        #[arg(long, default_value = "")]
        adapter: String,
        /// Image format.
        #[arg(long, value_enum, default_value = "png")]
        format: Format,
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Rate an image.
    Feedback {
        /// The image.
        image_id: String,
        /// Its feedback token (printed by `generate`).
        #[arg(long)]
        token: String,
        /// Thumbs up.
        #[arg(long, group = "kind")]
        up: bool,
        /// Thumbs down.
        #[arg(long, group = "kind")]
        down: bool,
        /// The image is better than this other image of its group.
        #[arg(long, group = "kind")]
        better_than: Option<String>,
        /// The image is the best of its group.
        #[arg(long, group = "kind")]
        best: bool,
        /// Who rates.
        #[arg(long, default_value = "")]
        rater: String,
        /// Makes retries count once.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Export the trajectory buffer and its feedback (needs the admin role with keys).
    Export {
        /// Output directory (gets trajectories.safetensors and metadata.json).
        #[arg(long, default_value = "export")]
        out: PathBuf,
        /// Include trajectories nobody rated.
        #[arg(long)]
        all: bool,
    },
    /// Show the model, defaults and limits.
    Info,
    /// Manage adapter generations and training (admin role with keys).
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// Teach the server a scripted user's taste: rounds of generate, feedback (thumbs, pairwise,
    /// best-of in turn), train, swap; prints the learning curve (live against base on held-out
    /// prompts and seeds, paired t, prompt accuracy) and writes grid.png, scores.png and
    /// scores.md per taste (admin role with keys).
    Demo {
        /// What the scripted user prefers (several: one session each, in turn).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            env = "IMAGEGEN_DEMO_TASTE",
            default_value = "larger"
        )]
        taste: Vec<DemoTaste>,
        /// Rounds of feedback and training.
        #[arg(long, env = "IMAGEGEN_DEMO_ROUNDS", default_value_t = 4)]
        rounds: usize,
        /// Labels (feedback requests) per round.
        #[arg(long, env = "IMAGEGEN_DEMO_LABELS", default_value_t = 50)]
        labels: usize,
        /// Images per request the user rates.
        #[arg(long, env = "IMAGEGEN_DEMO_IMAGES", default_value_t = 4)]
        images: u32,
        /// Held-out images scored per round (evaluation prompts and seeds, never rated).
        #[arg(long, env = "IMAGEGEN_DEMO_EVAL_IMAGES", default_value_t = 64)]
        eval_images: usize,
        /// Held-out captions of the prompt-accuracy figure per round (0: skip).
        #[arg(long, env = "IMAGEGEN_DEMO_ACCURACY_PROMPTS", default_value_t = 48)]
        accuracy_prompts: usize,
        /// Denoising steps per rated and scored image.
        #[arg(long, env = "IMAGEGEN_DEMO_STEPS", default_value_t = 10)]
        steps: u32,
        /// Longest wait for one training round, in seconds.
        #[arg(long, env = "IMAGEGEN_DEMO_ROUND_TIMEOUT", default_value_t = 1800)]
        round_timeout: u64,
        /// Output directory (one folder per taste).
        #[arg(long, env = "IMAGEGEN_DEMO_OUT", default_value = "demo")]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DemoTaste {
    /// Prefers lighter pictures.
    Brighter,
    /// Prefers shapes that fill more of the picture.
    Larger,
    /// Prefers red, orange and yellow.
    Warm,
}

#[derive(Debug, Subcommand)]
enum AdaptersCommand {
    /// List every generation; `*` marks the live one.
    List,
    /// Show one generation.
    Get {
        /// Generation id.
        generation: String,
    },
    /// Make a generation live (`base` for none), if EXPECTED is what is live now.
    Activate {
        /// Generation id, or `base`.
        generation: String,
        /// The generation you believe is live (`base` for none).
        #[arg(long)]
        expected: String,
    },
    /// Put the previous live generation back.
    Rollback,
    /// Start a training round now.
    Train,
    /// Show the trainer's state.
    Status,
    /// Write a generation as PEFT files (loadable with diffusers' `load_lora_weights`).
    Export {
        /// Generation id.
        generation: String,
        /// Output directory.
        #[arg(long, default_value = "adapter")]
        out: PathBuf,
    },
    /// Add a generation from a PEFT folder (adapter_model.safetensors, adapter_config.json), a
    /// diffusers folder (pytorch_lora_weights.safetensors) or a single .safetensors file.
    Import {
        /// The folder or file.
        dir: PathBuf,
    },
}

async fn adapters(
    channel: Channel,
    key: &Option<String>,
    command: AdaptersCommand,
) -> anyhow::Result<()> {
    let mut client = AdaptersClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let base = |id: &str| {
        if id == "base" {
            String::new()
        } else {
            id.to_string()
        }
    };
    let show = |a: &pb::AdapterInfo| {
        let stats = a
            .stats
            .as_ref()
            .map(|s| {
                format!(
                    "{} pairs, loss {:.4}, held-out {:.2} (parent {:.2})",
                    s.pairs, s.mean_loss, s.heldout_accuracy, s.parent_heldout_accuracy
                )
            })
            .unwrap_or_default();
        println!(
            "{} {}  parent {}  {}  rank {} alpha {}  {}",
            if a.live { "*" } else { " " },
            a.generation,
            or_base(&a.parent),
            a.origin,
            a.rank,
            a.alpha,
            stats
        );
    };
    match command {
        AdaptersCommand::List => {
            let list = client
                .list_adapters(with_key(pb::ListAdaptersRequest {}, key)?)
                .await?
                .into_inner();
            println!("live: {}", or_base(&list.live));
            list.adapters.iter().for_each(show);
        }
        AdaptersCommand::Get { generation } => show(
            &client
                .get_adapter(with_key(pb::GetAdapterRequest { generation }, key)?)
                .await?
                .into_inner(),
        ),
        AdaptersCommand::Activate {
            generation,
            expected,
        } => {
            let r = pb::ActivateAdapterRequest {
                generation: base(&generation),
                expected_live: base(&expected),
            };
            let r = client
                .activate_adapter(with_key(r, key)?)
                .await?
                .into_inner();
            println!("live: {} (was {})", or_base(&r.live), or_base(&r.previous));
        }
        AdaptersCommand::Rollback => {
            let r = client
                .rollback_adapter(with_key(pb::RollbackAdapterRequest {}, key)?)
                .await?
                .into_inner();
            println!("live: {} (was {})", or_base(&r.live), or_base(&r.previous));
        }
        AdaptersCommand::Train => println!(
            "{:#?}",
            client
                .trigger_training(with_key(pb::TriggerTrainingRequest {}, key)?)
                .await?
                .into_inner()
        ),
        AdaptersCommand::Status => println!(
            "{:#?}",
            client
                .get_training_status(with_key(pb::GetTrainingStatusRequest {}, key)?)
                .await?
                .into_inner()
        ),
        AdaptersCommand::Export { generation, out } => {
            let mut stream = client
                .export_adapter(with_key(pb::ExportAdapterRequest { generation }, key)?)
                .await?
                .into_inner();
            save_files(&mut stream, &out).await?;
        }
        AdaptersCommand::Import { dir } => {
            let request = import_request(&dir)?;
            show(
                &client
                    .import_adapter(with_key(request, key)?)
                    .await?
                    .into_inner(),
            );
        }
    }
    Ok(())
}

/// An adapter generation for display: empty means the base model.
fn or_base(generation: &str) -> &str {
    if generation.is_empty() {
        "base"
    } else {
        generation
    }
}

/// Writes a stream of file chunks into `out` (file names must be plain names).
async fn save_files(
    stream: &mut tonic::Streaming<pb::ExportChunk>,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    while let Some(chunk) = stream.message().await? {
        if chunk.file.contains(['/', '\\']) || chunk.file.starts_with('.') {
            bail!("the server sent an unsafe file name `{}`", chunk.file);
        }
        files
            .entry(chunk.file)
            .or_default()
            .extend_from_slice(&chunk.data);
    }
    for (name, bytes) in files {
        let path = out.join(&name);
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let channel = Channel::from_shared(cli.addr.clone())
        .context("--addr must be a URL such as http://127.0.0.1:50051")?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cli.addr))?;
    let key = cli.api_key.clone();
    match cli.command {
        Command::Generate {
            prompt,
            negative,
            num_images,
            seed,
            shared_noise,
            steps,
            guidance,
            width,
            height,
            eta,
            adapter,
            format,
            out,
        } => {
            let request = pb::GenerateRequest {
                prompt,
                negative_prompt: negative,
                num_images,
                seed,
                steps,
                guidance_scale: guidance,
                width,
                height,
                eta,
                adapter,
                format: match format {
                    Format::Png => pb::ImageFormat::Png,
                    Format::Jpeg => pb::ImageFormat::Jpeg,
                } as i32,
                request_id: String::new(),
                shared_initial_noise: shared_noise,
            };
            let mut client =
                ImageGeneratorClient::new(channel).max_decoding_message_size(256 << 20);
            let mut stream = client
                .generate_stream(with_key(request, &key)?)
                .await?
                .into_inner();
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} denoising [{bar:30}] {pos}/{len} steps {elapsed}",
                )?
                .progress_chars("=> "),
            );
            let mut result = None;
            while let Some(event) = stream.message().await? {
                match event.event {
                    Some(pb::generate_event::Event::Progress(p)) => {
                        bar.set_length(u64::from(p.total_steps));
                        bar.set_position(u64::from(p.step));
                    }
                    Some(pb::generate_event::Event::Result(r)) => result = Some(r),
                    None => {}
                }
            }
            bar.finish_and_clear();
            let Some(result) = result else {
                bail!("the stream ended without a result")
            };
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            println!(
                "group {}  seed {}  model {}  adapter {}",
                result.group_id,
                result.seed,
                result.model_id,
                or_base(&result.adapter_generation)
            );
            for image in &result.images {
                let ext = if image.mime_type == "image/jpeg" {
                    "jpg"
                } else {
                    "png"
                };
                let path = out.join(format!("{}.{ext}", image.image_id));
                std::fs::write(&path, &image.data)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!(
                    "{}  {}x{}  token {}",
                    path.display(),
                    image.width,
                    image.height,
                    image.feedback_token
                );
            }
            if let Some(t) = result.timings {
                println!(
                    "queue {:.2}s  denoise {:.2}s  decode {:.2}s",
                    t.queue_seconds, t.denoise_seconds, t.decode_seconds
                );
            }
        }
        Command::Feedback {
            image_id,
            token,
            up,
            down,
            better_than,
            best,
            rater,
            idempotency_key,
        } => {
            use pb::feedback_request::Feedback;
            let feedback = match (up, down, better_than, best) {
                (true, ..) => Feedback::Vote(pb::Vote::Up as i32),
                (_, true, ..) => Feedback::Vote(pb::Vote::Down as i32),
                (_, _, Some(other), _) => Feedback::PreferredOver(other),
                (.., true) => Feedback::BestOf(pb::BestOf {}),
                _ => bail!("say what you think: --up, --down, --better-than OTHER or --best"),
            };
            let request = pb::FeedbackRequest {
                image_id,
                feedback_token: token,
                feedback: Some(feedback),
                rater_id: rater,
                idempotency_key,
            };
            let response = ImageGeneratorClient::new(channel)
                .submit_feedback(with_key(request, &key)?)
                .await?
                .into_inner();
            println!(
                "recorded {} for group {}{}",
                response.feedback_id,
                response.group_id,
                if response.duplicate {
                    " (duplicate)"
                } else {
                    ""
                }
            );
        }
        Command::Export { out, all } => {
            let mut client = AdminClient::new(channel);
            let mut stream = client
                .export_trajectories(with_key(
                    pb::ExportRequest {
                        include_unlabelled: all,
                    },
                    &key,
                )?)
                .await?
                .into_inner();
            save_files(&mut stream, &out).await?;
        }
        Command::Adapters(command) => adapters(channel, &key, command).await?,
        Command::Demo {
            taste,
            rounds,
            labels,
            images,
            eval_images,
            accuracy_prompts,
            steps,
            round_timeout,
            out,
        } => {
            use imagegen_client::demo::{DemoConfig, Taste, run, write_figures};
            let mut tables = String::new();
            for taste in taste {
                let (taste, folder) = match taste {
                    DemoTaste::Brighter => (Taste::Brighter, "brighter"),
                    DemoTaste::Larger => (Taste::LargerShapes, "larger"),
                    DemoTaste::Warm => (Taste::WarmColours, "warm"),
                };
                let config = DemoConfig {
                    rounds,
                    labels_per_round: labels,
                    images_per_request: images,
                    eval_images,
                    accuracy_prompts,
                    steps,
                    api_key: key.clone(),
                    round_timeout: std::time::Duration::from_secs(round_timeout),
                    ..DemoConfig::new(taste)
                };
                let report = run(channel.clone(), &config, &mut |line| println!("{line}")).await?;
                let dir = out.join(folder);
                write_figures(&report, &dir)
                    .with_context(|| format!("writing {}", dir.display()))?;
                let table = report.table();
                std::fs::write(dir.join("scores.md"), &table)
                    .with_context(|| format!("writing {}", dir.display()))?;
                println!(
                    "wrote {0}/grid.png (rows: base, then live after each round), {0}/scores.png, {0}/scores.md",
                    dir.display()
                );
                tables.push_str(&table);
            }
            println!("\n{tables}");
        }
        Command::Info => {
            let info = ImageGeneratorClient::new(channel)
                .get_info(with_key(pb::GetInfoRequest {}, &key)?)
                .await?
                .into_inner();
            println!("{info:#?}");
        }
    }
    Ok(())
}

/// The files an import sends: a PEFT folder (`adapter_model.safetensors` and
/// `adapter_config.json`), a diffusers folder (`pytorch_lora_weights.safetensors`, settings in
/// its header) or a single `.safetensors` file (the server reads its header or its shapes).
fn import_request(path: &std::path::Path) -> anyhow::Result<pb::ImportAdapterRequest> {
    let read =
        |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    if path.is_file() {
        return Ok(pb::ImportAdapterRequest {
            adapter_model_safetensors: read(path)?,
            adapter_config_json: Vec::new(),
        });
    }
    let config = path.join("adapter_config.json");
    let peft = path.join("adapter_model.safetensors");
    let diffusers = path.join("pytorch_lora_weights.safetensors");
    if config.is_file() && peft.is_file() {
        return Ok(pb::ImportAdapterRequest {
            adapter_model_safetensors: read(&peft)?,
            adapter_config_json: read(&config)?,
        });
    }
    if diffusers.is_file() {
        return Ok(pb::ImportAdapterRequest {
            adapter_model_safetensors: read(&diffusers)?,
            adapter_config_json: Vec::new(),
        });
    }
    bail!(
        "{} holds neither adapter_model.safetensors + adapter_config.json (PEFT) nor \
         pytorch_lora_weights.safetensors (diffusers)",
        path.display()
    )
}
