//! One D3PO training round's inner loop: per pair, a shuffled subset of time indices, gradients of
//! the clamped loss accumulated over them, global-norm clipping, one AdamW step (d3po.md §3).
//!
//! The model is abstracted as a [`StepPolicy`]: anything that can give, for stored transitions,
//! the differentiable log-ratio between the policy being trained and the frozen reference.

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{SeedableRng, rngs::StdRng};

use crate::{D3poError, D3poLossConfig, Result, d3po_loss};

/// Hyper-parameters of training (defaults from the reference implementation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// The loss's beta and clamp.
    pub loss: D3poLossConfig,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Fraction of a chain's time indices trained on per pair, in (0, 1].
    pub timestep_fraction: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: D3poLossConfig::default(),
            lr: 3e-5,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            timestep_fraction: 1.0,
        }
    }
}

impl TrainConfig {
    /// Checks every range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        let bad =
            |name: &'static str, reason: String| Err(D3poError::InvalidArgument { name, reason });
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        if !(self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0) {
            return bad(
                "timestep_fraction",
                format!("must be in (0, 1], got {}", self.timestep_fraction),
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return bad(
                "max_grad_norm",
                format!("must be positive, got {}", self.max_grad_norm),
            );
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(name, format!("must be in [0, 1), got {v}"));
            }
        }
        if !(self.weight_decay >= 0.0 && self.adam_eps > 0.0) {
            return bad(
                "weight_decay",
                "weight_decay must be >= 0 and adam_eps > 0".into(),
            );
        }
        Ok(())
    }
}

/// The model as D3PO sees it.
pub trait StepPolicy {
    /// A stored chain (a trajectory).
    type Item: ?Sized;

    /// Number of denoising steps of a chain.
    fn steps(&self, item: &Self::Item) -> usize;

    /// `delta = log pi_theta - log pi_ref` of the stored transition at each `(chain, step index)`,
    /// as a `[n]` tensor differentiable with respect to the trainable variables.
    fn log_ratios(&self, batch: &[(&Self::Item, usize)]) -> Result<Tensor>;
}

/// What training on one pair did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairOutcome {
    /// Mean loss over the time indices used.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Time indices used.
    pub steps: usize,
    /// Mean log-ratio of the winner's and of the loser's transitions (before the update).
    pub mean_delta: (f64, f64),
    /// Time indices left out because their loss or log-ratios were not finite.
    pub skipped_steps: usize,
    /// Whether the optimizer stepped: false when no time index was finite, or the accumulated
    /// gradient was not (the variables are then untouched).
    pub applied: bool,
}

/// Trains a set of variables with D3PO, one pair at a time.
pub struct D3poTrainer {
    config: TrainConfig,
    optimizer: AdamW,
    vars: Vec<Var>,
    rng: StdRng,
}

impl std::fmt::Debug for D3poTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("D3poTrainer")
            .field("config", &self.config)
            .field("vars", &self.vars.len())
            .finish()
    }
}

impl D3poTrainer {
    /// A trainer of `vars`; `seed` makes the time-index shuffles reproducible.
    pub fn new(vars: Vec<Var>, config: TrainConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let params = ParamsAdamW {
            lr: config.lr,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
        };
        let optimizer = AdamW::new(vars.clone(), params)?;
        Ok(Self {
            config,
            optimizer,
            vars,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// One update from the pair (`winner`, `loser`): both chains at the same shuffled time
    /// indices, `L_j / K` accumulated over `K = timestep_fraction * N` of them, the gradient
    /// clipped to `max_grad_norm`, one AdamW step. `between_steps` runs before every time index
    /// (the host pauses there while serving has work).
    pub fn train_pair<P: StepPolicy>(
        &mut self,
        policy: &P,
        winner: &P::Item,
        loser: &P::Item,
        between_steps: &mut dyn FnMut(),
    ) -> Result<PairOutcome> {
        let n = policy.steps(winner);
        if n == 0 || n != policy.steps(loser) {
            return Err(D3poError::InvalidArgument {
                name: "pair",
                reason: format!(
                    "chains of {n} and {} steps cannot be paired",
                    policy.steps(loser)
                ),
            });
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        let k = ((self.config.timestep_fraction * n as f64).round() as usize).clamp(1, n);
        let mut grads = None;
        let mut sums: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let (mut loss_sum, mut dw, mut dl) = (0.0, 0.0, 0.0);
        let mut skipped_steps = 0;
        for &j in &order[..k] {
            between_steps();
            let delta = policy.log_ratios(&[(winner, j), (loser, j)])?;
            let d: Vec<f64> = delta.to_dtype(candle_core::DType::F64)?.to_vec1()?;
            let loss = d3po_loss(
                &delta.narrow(0, 0, 1)?,
                &delta.narrow(0, 1, 1)?,
                &self.config.loss,
            )?;
            let loss = (loss.sum_all()? / k as f64)?;
            let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            // A non-finite step (a damaged chain) would turn every weight into NaN: leave it out.
            if !(loss_value.is_finite() && d.iter().all(|v| v.is_finite())) {
                skipped_steps += 1;
                continue;
            }
            loss_sum += loss_value;
            dw += d[0] / k as f64;
            dl += d[1] / k as f64;
            let store = loss.backward()?;
            for (sum, var) in sums.iter_mut().zip(&self.vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
            grads = Some(store);
        }
        let untouched = PairOutcome {
            loss: loss_sum,
            grad_norm: f64::NAN,
            steps: k - skipped_steps,
            mean_delta: (dw, dl),
            skipped_steps,
            applied: false,
        };
        let Some(mut store) = grads else {
            return Ok(untouched);
        };
        let mut norm_sq = 0.0;
        for g in sums.iter().flatten() {
            norm_sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = norm_sq.sqrt();
        if !grad_norm.is_finite() {
            return Ok(PairOutcome {
                grad_norm,
                ..untouched
            });
        }
        let scale = if grad_norm > self.config.max_grad_norm {
            self.config.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        for (sum, var) in sums.into_iter().zip(&self.vars) {
            match sum {
                Some(g) => {
                    store.insert(var.as_tensor(), (g * scale)?);
                }
                None => {
                    store.remove(var.as_tensor());
                }
            }
        }
        self.optimizer.step(&store)?;
        Ok(PairOutcome {
            grad_norm,
            applied: true,
            ..untouched
        })
    }
}

/// How often the implicit reward ranks the winner above the loser: the fraction of
/// `(reward_winner, reward_loser)` pairs with `reward_winner > reward_loser`, ties counting half.
pub fn ranking_accuracy(rewards: &[(f64, f64)]) -> f64 {
    if rewards.is_empty() {
        return 0.5;
    }
    let score: f64 = rewards
        .iter()
        .map(|(w, l)| {
            if w > l {
                1.0
            } else if w < l {
                0.0
            } else {
                0.5
            }
        })
        .sum();
    score / rewards.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Tensor, Var};

    #[test]
    fn ranking_accuracy_counts_ties_as_half() {
        assert_eq!(ranking_accuracy(&[]), 0.5);
        assert_eq!(
            ranking_accuracy(&[(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (2.0, 1.0)]),
            0.625
        );
    }

    /// A one-parameter policy whose log-ratio is `theta * x` per stored step; a chain is its
    /// per-step `x` values, and a NaN stands for a damaged step.
    struct Scalar {
        theta: Var,
    }

    impl StepPolicy for Scalar {
        type Item = [f64];

        fn steps(&self, item: &[f64]) -> usize {
            item.len()
        }

        fn log_ratios(&self, batch: &[(&[f64], usize)]) -> Result<Tensor> {
            let x: Vec<f64> = batch.iter().map(|(c, j)| c[*j]).collect();
            let x = Tensor::new(x.as_slice(), self.theta.device())?;
            Ok(x.broadcast_mul(self.theta.as_tensor())?)
        }
    }

    fn scalar_trainer() -> (Scalar, D3poTrainer) {
        let theta = Var::new(&[0.0f64], &candle_core::Device::Cpu).unwrap();
        let config = TrainConfig {
            lr: 0.1,
            ..TrainConfig::default()
        };
        let trainer = D3poTrainer::new(vec![theta.clone()], config, 1).unwrap();
        (Scalar { theta }, trainer)
    }

    fn theta(policy: &Scalar) -> f64 {
        policy.theta.as_tensor().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn non_finite_steps_are_left_out_and_never_reach_the_weights() {
        let (policy, mut trainer) = scalar_trainer();
        let winner = [1.0, f64::NAN, 1.0, 1.0];
        let loser = [-1.0, -1.0, -1.0, -1.0];
        let outcome = trainer
            .train_pair(&policy, &winner, &loser, &mut || {})
            .unwrap();
        assert_eq!((outcome.skipped_steps, outcome.steps), (1, 3));
        assert!(outcome.applied && outcome.loss.is_finite() && outcome.grad_norm.is_finite());
        // The winner's steps pull theta up (x = +1), and the NaN did not touch it.
        assert!(theta(&policy) > 0.0 && theta(&policy).is_finite());

        let before = theta(&policy);
        let poisoned = [f64::NAN; 4];
        let outcome = trainer
            .train_pair(&policy, &poisoned, &loser, &mut || {})
            .unwrap();
        assert_eq!((outcome.skipped_steps, outcome.applied), (4, false));
        assert_eq!(theta(&policy), before);
        let infinite = [f64::INFINITY; 4];
        let outcome = trainer
            .train_pair(&policy, &infinite, &loser, &mut || {})
            .unwrap();
        assert!(!outcome.applied);
        assert_eq!(theta(&policy), before);
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(TrainConfig::default().validate().is_ok());
        let bad = TrainConfig {
            timestep_fraction: 0.0,
            ..TrainConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("timestep_fraction")
        );
        let bad = TrainConfig {
            lr: -1.0,
            ..TrainConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("lr"));
    }
}
