//! Prompt accuracy: how often a model draws the shape and colour a held-out caption asks for,
//! read back by the shapes evaluator.

use imagegen_shapes as shapes;
use serde::Serialize;

use crate::model::ModelError;
use crate::pipeline::{AdapterChoice, DiffusionModel, SampleRequest};

/// How well a model draws what held-out captions ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EvalReport {
    /// Prompts generated.
    pub prompts: usize,
    /// Images whose largest blob has the asked shape and colour (the prompt accuracy;
    /// the background is reported on its own).
    pub correct: usize,
    /// Images with the right shape.
    pub shape_correct: usize,
    /// Images with the right shape colour.
    pub colour_correct: usize,
    /// Images with the right background, among prompts that name one.
    pub background_correct: usize,
    /// Prompts that name a background.
    pub with_background: usize,
}

impl EvalReport {
    /// Share of images that match their prompt.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.prompts.max(1) as f64
    }
}

/// Generates one image for each of `prompts` (`steps`-step sampling at the given guidance, eta 1,
/// seeded by `seed` and the prompt's index) and scores it with the evaluator.
pub fn evaluate(
    model: &DiffusionModel,
    prompts: &[String],
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    image_size: usize,
) -> Result<EvalReport, ModelError> {
    evaluate_with_eta(model, prompts, steps, guidance_scale, 1.0, seed, image_size)
}

/// [`evaluate`] with another DDIM eta (in (0, 1]).
pub fn evaluate_with_eta(
    model: &DiffusionModel,
    prompts: &[String],
    steps: usize,
    guidance_scale: f64,
    eta: f64,
    seed: u64,
    image_size: usize,
) -> Result<EvalReport, ModelError> {
    let mut report = EvalReport::default();
    let batch = 4;
    for (chunk_index, chunk) in prompts.chunks(batch).enumerate() {
        let requests: Vec<SampleRequest> = (0..chunk.len())
            .map(|i| SampleRequest {
                num_images: 1,
                seed: seed.wrapping_add((chunk_index * batch + i) as u64),
                steps,
                guidance_scale,
                eta,
                width: image_size,
                height: image_size,
                shared_noise: false,
            })
            .collect();
        let conditioning = chunk
            .iter()
            .map(|p| model.conditioning(p, ""))
            .collect::<Result<Vec<_>, _>>()?;
        let generations = model.generate(
            &requests,
            &conditioning,
            AdapterChoice::default(),
            &mut |_, _| true,
        )?;
        for (prompt, generation) in chunk.iter().zip(generations) {
            let Some(image) = generation.images.first() else {
                continue;
            };
            report.prompts += 1;
            let spec = shapes::parse_prompt(prompt);
            let seen = shapes::evaluate(&image.data, image_size);
            let shape_ok = seen.is_some_and(|s| Some(s.shape) == spec.shape);
            let colour_ok = seen.is_some_and(|s| Some(s.colour) == spec.colour);
            let background_ok =
                seen.is_some_and(|s| spec.background.is_none_or(|b| b == s.background));
            report.shape_correct += usize::from(shape_ok);
            report.colour_correct += usize::from(colour_ok);
            if spec.background.is_some() {
                report.with_background += 1;
                report.background_correct += usize::from(background_ok);
            }
            report.correct += usize::from(shape_ok && colour_ok);
        }
    }
    Ok(report)
}

/// `n` captions of held-out combinations (never seen in training), reproducible from `seed`.
pub fn held_out_prompts(seed: u64, n: usize, image_size: usize) -> Vec<String> {
    shapes::held_out_captions(seed, n, image_size)
}
