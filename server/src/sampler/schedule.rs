//! The DDIM noise schedule, computed the way diffusers computes it.
//!
//! Betas and the cumulative product `alpha_bar` are computed in f32 (as diffusers does, so the
//! figures match real Stable Diffusion checkpoints to the last bit); the per-step constants
//! derived from them (ratios, square roots) are evaluated in f64 because `1 - a_t / a_prev`
//! loses precision near t = 0 in f32 (d3po.md, pitfalls).

use serde::Deserialize;

use super::error::{Result, SamplerError};

/// How the betas of the training schedule are spaced (`beta_schedule` in diffusers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas evenly spaced between `beta_start` and `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (Stable Diffusion 1.x and 2.x).
    ScaledLinear,
}

/// How the inference timesteps are picked from the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `t_j = ratio * (N - 1 - j) + steps_offset` with an integer ratio (SD default).
    Leading,
    /// Counted down from the last training step: `round(T - j * T / N) - 1`.
    Trailing,
    /// `round(linspace(0, T - 1, N))`, reversed.
    Linspace,
}

/// What the UNet predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise `eps` (SD 1.x, SD 2.x base).
    Epsilon,
    /// The velocity `v = sqrt(a) eps - sqrt(1 - a) x0` (SD 2.x 768-v).
    VPrediction,
}

/// The fields of diffusers' `scheduler/scheduler_config.json` that DDIM sampling depends on.
/// Unknown fields are ignored; missing ones take the Stable Diffusion 1.x values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Length of the training schedule (1000 for SD).
    pub num_train_timesteps: usize,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// Spacing of the betas.
    pub beta_schedule: BetaSchedule,
    /// Added to every inference timestep with leading spacing (1 for SD).
    pub steps_offset: usize,
    /// Whether the step past t = 0 uses `alpha_bar = 1` (true) or `alpha_bar_0` (false, SD).
    pub set_alpha_to_one: bool,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// What the model predicts.
    pub prediction_type: PredictionType,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            set_alpha_to_one: false,
            timestep_spacing: TimestepSpacing::Leading,
            prediction_type: PredictionType::Epsilon,
        }
    }
}

impl SchedulerConfig {
    /// Parses a diffusers `scheduler_config.json`, rejecting settings DDIM here cannot honour.
    pub fn from_json(text: &str) -> Result<Self> {
        // Options that change the sampler's math must be refused, not silently ignored.
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| SamplerError::InvalidSchedule(format!("not valid JSON: {e}")))?;
        for (key, harmless) in [
            ("rescale_betas_zero_snr", serde_json::Value::Bool(false)),
            ("thresholding", serde_json::Value::Bool(false)),
        ] {
            if let Some(v) = raw.get(key).filter(|v| **v != harmless) {
                return Err(SamplerError::InvalidSchedule(format!(
                    "`{key}` = {v} is not supported (only {harmless})"
                )));
            }
        }
        let config: Self = serde_json::from_value(raw)
            .map_err(|e| SamplerError::InvalidSchedule(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(SamplerError::InvalidSchedule(
                "num_train_timesteps must be at least 2".into(),
            ));
        }
        let ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
        if !ok(self.beta_start) || !ok(self.beta_end) {
            return Err(SamplerError::InvalidSchedule(format!(
                "betas must lie in (0, 1), got {}..{}",
                self.beta_start, self.beta_end
            )));
        }
        Ok(())
    }

    /// `alpha_bar_t` for every training timestep, in f32 exactly as diffusers computes it.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let (start, end) = match self.beta_schedule {
            BetaSchedule::Linear => (self.beta_start as f32, self.beta_end as f32),
            BetaSchedule::ScaledLinear => {
                (self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32)
            }
        };
        // torch.linspace in f32: the first half counts up from start, the second down from end.
        let step = (end - start) / (n - 1) as f32;
        let betas = (0..n).map(|i| {
            let v = if i < n / 2 {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            };
            match self.beta_schedule {
                BetaSchedule::Linear => v,
                BetaSchedule::ScaledLinear => v * v,
            }
        });
        // torch.cumprod on CPU accumulates in double and rounds each output to f32.
        let mut acc = 1.0f64;
        betas
            .map(|beta| {
                acc *= f64::from(1.0f32 - beta);
                acc as f32
            })
            .collect()
    }

    /// The inference timesteps for `num_steps` steps, highest first.
    pub fn timesteps(&self, num_steps: usize) -> Result<Vec<usize>> {
        let train = self.num_train_timesteps;
        if num_steps == 0 || num_steps > train {
            return Err(SamplerError::InvalidArgument {
                name: "steps",
                reason: format!("must be in 1..={train}, got {num_steps}"),
            });
        }
        let ts: Vec<usize> = match self.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = train / num_steps;
                (0..num_steps)
                    .rev()
                    .map(|j| j * ratio + self.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train as f64 / num_steps as f64;
                (0..num_steps)
                    .map(|j| (train as f64 - j as f64 * ratio).round() as usize - 1)
                    .collect()
            }
            TimestepSpacing::Linspace => {
                let last = (train - 1) as f64;
                (0..num_steps)
                    .rev()
                    .map(|j| {
                        let v = if num_steps == 1 {
                            0.0
                        } else {
                            last * j as f64 / (num_steps - 1) as f64
                        };
                        v.round() as usize
                    })
                    .collect()
            }
        };
        if let Some(&bad) = ts.iter().find(|&&t| t >= train) {
            return Err(SamplerError::InvalidSchedule(format!(
                "timestep {bad} falls outside the training range 0..{train} \
                 (steps_offset {} with {num_steps} steps)",
                self.steps_offset
            )));
        }
        Ok(ts)
    }
}

/// The constants of one DDIM step `t -> t_prev`.
///
/// With `mu = c_x * x_t + c_out * model_out` (model output after guidance) and
/// `x_{t-1} = mu + sigma * z`, this is the Gaussian policy D3PO trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConstants {
    /// Position in the chain: 0 is the first (noisiest) step.
    pub index: usize,
    /// The timestep the model is evaluated at.
    pub t: usize,
    /// The timestep this step lands on; 0 for the last step (which uses `alpha_bar_prev`).
    pub t_prev: usize,
    /// `alpha_bar_t`, from the f32 schedule.
    pub alpha_bar: f64,
    /// `alpha_bar` of the previous timestep (`alpha_bar_0`, or 1 with `set_alpha_to_one`, past 0).
    pub alpha_bar_prev: f64,
    /// `(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)`: the DDPM posterior variance.
    pub variance: f64,
}

impl StepConstants {
    /// The policy's standard deviation at `eta`.
    pub fn sigma(&self, eta: f64) -> f64 {
        eta * self.variance.sqrt()
    }

    /// `(c_x, c_out)` with `mu = c_x * x_t + c_out * model_out`, folding the DDIM update
    /// (`x0_hat`, no clipping) and, for v-prediction, the conversion of `v` to `eps`.
    pub fn mean_coefficients(&self, eta: f64, prediction: PredictionType) -> (f64, f64) {
        let (a, ap) = (self.alpha_bar, self.alpha_bar_prev);
        let sigma = self.sigma(eta);
        // mu = sqrt(ap) * x0_hat + sqrt(1 - ap - sigma^2) * eps, x0_hat = (x - sqrt(1-a) eps) / sqrt(a)
        let c_x = (ap / a).sqrt();
        let dir = (1.0 - ap - sigma * sigma).max(0.0).sqrt();
        let c_eps = dir - (ap * (1.0 - a) / a).sqrt();
        match prediction {
            PredictionType::Epsilon => (c_x, c_eps),
            // eps = sqrt(a) * v + sqrt(1 - a) * x_t
            PredictionType::VPrediction => (c_x + c_eps * (1.0 - a).sqrt(), c_eps * a.sqrt()),
        }
    }
}

/// A DDIM schedule for a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct DdimSchedule {
    prediction: PredictionType,
    steps: Vec<StepConstants>,
}

impl DdimSchedule {
    /// Builds the schedule of `num_steps` DDIM steps.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        config.validate()?;
        let alphas = config.alphas_cumprod();
        let final_alpha = if config.set_alpha_to_one {
            1.0
        } else {
            f64::from(alphas[0])
        };
        // diffusers always steps back by the integer ratio, whatever the spacing.
        let ratio = config.num_train_timesteps / num_steps.max(1);
        let steps = config
            .timesteps(num_steps)?
            .into_iter()
            .enumerate()
            .map(|(index, t)| {
                let alpha_bar = f64::from(alphas[t]);
                let (t_prev, alpha_bar_prev) = match t.checked_sub(ratio) {
                    Some(p) => (p, f64::from(alphas[p])),
                    None => (0, final_alpha),
                };
                let variance =
                    (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev);
                StepConstants {
                    index,
                    t,
                    t_prev,
                    alpha_bar,
                    alpha_bar_prev,
                    variance,
                }
            })
            .collect();
        Ok(Self {
            prediction: config.prediction_type,
            steps,
        })
    }

    /// The steps, noisiest first.
    pub fn steps(&self) -> &[StepConstants] {
        &self.steps
    }

    /// The step at chain position `index`.
    pub fn step(&self, index: usize) -> Result<&StepConstants> {
        self.steps
            .get(index)
            .ok_or_else(|| SamplerError::InvalidArgument {
                name: "step_index",
                reason: format!("must be below {}, got {index}", self.steps.len()),
            })
    }

    /// What the model predicts.
    pub fn prediction(&self) -> PredictionType {
        self.prediction
    }

    /// Number of inference steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the schedule has no steps (never true for a built schedule).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_spacing(spacing: TimestepSpacing, offset: usize) -> SchedulerConfig {
        SchedulerConfig {
            timestep_spacing: spacing,
            steps_offset: offset,
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn timestep_spacings_match_diffusers() {
        // DDIMScheduler(...).set_timesteps(10).timesteps for each spacing.
        let leading = with_spacing(TimestepSpacing::Leading, 1)
            .timesteps(10)
            .unwrap();
        assert_eq!(
            leading,
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        let trailing = with_spacing(TimestepSpacing::Trailing, 0)
            .timesteps(10)
            .unwrap();
        assert_eq!(
            trailing,
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        let linspace = with_spacing(TimestepSpacing::Linspace, 0)
            .timesteps(10)
            .unwrap();
        assert_eq!(
            linspace,
            vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
        // 1000 / 3 does not divide: leading keeps the integer ratio 333.
        assert_eq!(
            with_spacing(TimestepSpacing::Leading, 1)
                .timesteps(3)
                .unwrap(),
            vec![667, 334, 1]
        );
    }

    #[test]
    fn out_of_range_steps_and_settings_are_refused() {
        let config = SchedulerConfig::default();
        assert!(config.timesteps(0).is_err());
        assert!(config.timesteps(1001).is_err());
        let err = SchedulerConfig::from_json(r#"{"rescale_betas_zero_snr": true}"#).unwrap_err();
        assert!(err.to_string().contains("rescale_betas_zero_snr"), "{err}");
        let err =
            SchedulerConfig::from_json(r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap_err();
        assert!(err.to_string().contains("squaredcos_cap_v2"), "{err}");
        // steps_offset pushing the last timestep past the schedule.
        assert!(
            with_spacing(TimestepSpacing::Leading, 100)
                .timesteps(1)
                .is_ok()
        );
        assert!(
            with_spacing(TimestepSpacing::Leading, 1000)
                .timesteps(1)
                .is_err()
        );
    }

    #[test]
    fn config_reads_diffusers_json_and_ignores_unknown_keys() {
        let json = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null}"#;
        let config = SchedulerConfig::from_json(json).unwrap();
        assert_eq!(config.prediction_type, PredictionType::VPrediction);
        assert_eq!(
            config,
            SchedulerConfig {
                prediction_type: PredictionType::VPrediction,
                ..SchedulerConfig::default()
            }
        );
    }

    #[test]
    fn alpha_bar_of_the_first_and_last_training_step() {
        let a = SchedulerConfig::default().alphas_cumprod();
        // 1 - beta_0 = 1 - 0.00085; the rest of the grid is pinned by the reference vectors.
        // SD's schedule does not reach zero terminal SNR: sqrt(alpha_bar_999) is about 0.068.
        assert!((f64::from(a[0]) - 0.99915).abs() < 1e-7);
        assert!(
            (f64::from(a[999]).sqrt() - 0.068).abs() < 1e-3,
            "{}",
            a[999]
        );
        assert!(a.windows(2).all(|w| w[1] < w[0]), "alpha_bar decreases");
        let linear = SchedulerConfig {
            beta_schedule: BetaSchedule::Linear,
            beta_start: 0.0001,
            beta_end: 0.02,
            ..SchedulerConfig::default()
        };
        assert!((f64::from(linear.alphas_cumprod()[0]) - 0.9999).abs() < 1e-7);
    }

    #[test]
    fn v_prediction_coefficients_equal_converting_v_to_eps() {
        let schedule = DdimSchedule::new(&SchedulerConfig::default(), 20).unwrap();
        for step in schedule.steps() {
            let (x, v) = (0.7, -0.3);
            let a = step.alpha_bar;
            let eps = a.sqrt() * v + (1.0 - a).sqrt() * x;
            let (ex, ee) = step.mean_coefficients(0.5, PredictionType::Epsilon);
            let (vx, vv) = step.mean_coefficients(0.5, PredictionType::VPrediction);
            let via_eps = ex * x + ee * eps;
            let direct = vx * x + vv * v;
            assert!((via_eps - direct).abs() < 1e-12, "step {}", step.index);
        }
    }

    #[test]
    fn last_step_lands_on_alpha_bar_zero_or_one() {
        let sd = DdimSchedule::new(&SchedulerConfig::default(), 20).unwrap();
        let last = sd.step(19).unwrap();
        assert_eq!((last.t, last.t_prev), (1, 0));
        assert!((last.alpha_bar_prev - 0.99915).abs() < 1e-7);
        let one = SchedulerConfig {
            set_alpha_to_one: true,
            ..SchedulerConfig::default()
        };
        assert_eq!(
            DdimSchedule::new(&one, 20)
                .unwrap()
                .step(19)
                .unwrap()
                .alpha_bar_prev,
            1.0
        );
    }
}
