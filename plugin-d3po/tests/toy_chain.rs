//! D3PO learns on a toy chain: a Gaussian policy `x_{t-1} = 0.9 x_t + theta + sigma z` whose
//! preferred trajectories are those ending higher. Over rounds (reference = the round's start),
//! theta must move up, and freshly sampled chains must end higher.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::D;
use candle_core::{DType, Device, Tensor, Var};
use plugin_d3po::{D3poTrainer, GroupFeedback, StepPolicy, TrainConfig, build_pairs};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

const DIM: usize = 16;
const STEPS: usize = 10;
const SIGMA: f64 = 0.5;

/// A sampled chain: `STEPS + 1` states, `x_T` first.
struct Chain {
    states: Vec<Tensor>,
}

impl Chain {
    fn end_value(&self) -> f64 {
        self.states[STEPS]
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

struct Toy {
    theta: Var,
    reference: Tensor,
}

impl Toy {
    fn mean(x: &Tensor, theta: &Tensor) -> Tensor {
        ((x * 0.9).unwrap().broadcast_add(theta)).unwrap()
    }

    fn sample(&self, x_t: &Tensor, rng: &mut StdRng) -> Chain {
        let mut states = vec![x_t.clone()];
        for _ in 0..STEPS {
            let z: Vec<f64> = (0..DIM).map(|_| StandardNormal.sample(rng)).collect();
            let z = Tensor::from_vec(z, DIM, &Device::Cpu).unwrap();
            let mu = Self::mean(states.last().unwrap(), &self.theta.as_tensor().detach());
            states.push((mu + (z * SIGMA).unwrap()).unwrap());
        }
        Chain { states }
    }
}

impl StepPolicy for Toy {
    type Item = Chain;

    fn steps(&self, item: &Chain) -> usize {
        item.states.len() - 1
    }

    fn log_ratios(&self, batch: &[(&Chain, usize)]) -> plugin_d3po::Result<Tensor> {
        let x_t = Tensor::stack(
            &batch
                .iter()
                .map(|(c, j)| c.states[*j].clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let x_prev = Tensor::stack(
            &batch
                .iter()
                .map(|(c, j)| c.states[j + 1].clone())
                .collect::<Vec<_>>(),
            0,
        )?;
        let mu = Self::mean(&x_t, self.theta.as_tensor());
        let mu_ref = Self::mean(&x_t, &self.reference);
        // The Gaussian log-ratio of the two means on the stored step, averaged over elements
        // (the host's sampler computes the same for the real model).
        let diff = ((&x_prev - &mu_ref)?.sqr()? - (&x_prev - &mu)?.sqr()?)?;
        Ok((diff.mean(D::Minus1)? / (2.0 * SIGMA * SIGMA))?)
    }
}

#[test]
fn the_policy_moves_toward_preferred_trajectories_over_rounds() {
    let mut rng = StdRng::seed_from_u64(0);
    let theta = Var::zeros(DIM, DType::F64, &Device::Cpu).unwrap();
    let mut toy = Toy {
        theta: theta.clone(),
        reference: theta.as_tensor().copy().unwrap(),
    };
    let config = TrainConfig {
        lr: 0.02,
        weight_decay: 0.0,
        ..TrainConfig::default()
    };
    let mut trainer = D3poTrainer::new(vec![theta.clone()], config, 7).unwrap();
    let theta_mean = |t: &Var| {
        t.as_tensor()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mean_end = |toy: &Toy, rng: &mut StdRng| {
        let x_t = Tensor::zeros(DIM, DType::F64, &Device::Cpu).unwrap();
        (0..64)
            .map(|_| toy.sample(&x_t, rng).end_value())
            .sum::<f64>()
            / 64.0
    };
    let start_end = mean_end(&toy, &mut rng);
    let mut history = vec![theta_mean(&theta)];
    for round in 0..5 {
        // The reference is the policy the round starts from.
        toy.reference = theta.as_tensor().copy().unwrap().detach();
        for group in 0..8 {
            let x_t: Vec<f64> = (0..DIM).map(|_| StandardNormal.sample(&mut rng)).collect();
            let x_t = Tensor::from_vec(x_t, DIM, &Device::Cpu).unwrap();
            // A group of two chains from the same x_T; the scripted rater prefers the higher end.
            let chains = [toy.sample(&x_t, &mut rng), toy.sample(&x_t, &mut rng)];
            let ids = ["0", "1"];
            let better = if chains[0].end_value() > chains[1].end_value() {
                0
            } else {
                1
            };
            let feedback = GroupFeedback {
                images: ids.iter().map(|s| s.to_string()).collect(),
                comparisons: vec![(ids[better].into(), ids[1 - better].into(), "rater".into())],
                ..Default::default()
            };
            let pairs = build_pairs(&feedback);
            assert_eq!(pairs.len(), 1);
            let w = &chains[pairs[0].winner.parse::<usize>().unwrap()];
            let l = &chains[pairs[0].loser.parse::<usize>().unwrap()];
            let outcome = trainer.train_pair(&toy, w, l, &mut || {}).unwrap();
            if round == 0 && group == 0 {
                // The policy equals the reference before the first update: delta is exactly 0
                // and the loss is ln 2.
                assert_eq!(outcome.mean_delta, (0.0, 0.0));
                assert!(
                    (outcome.loss - std::f64::consts::LN_2).abs() < 1e-12,
                    "{}",
                    outcome.loss
                );
            }
            assert!(outcome.loss.is_finite() && outcome.grad_norm.is_finite());
        }
        history.push(theta_mean(&theta));
    }
    let end = mean_end(&toy, &mut rng);
    eprintln!("theta per round {history:?}; mean final value {start_end:.3} -> {end:.3}");
    // theta climbs round after round (allowing one stalled round), and chains end higher.
    let rises = history.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(rises >= 4, "theta per round: {history:?}");
    assert!(
        history[5] > history[0] + 0.1,
        "theta per round: {history:?}"
    );
    assert!(
        end > start_end + 0.5,
        "mean final value {start_end} -> {end}"
    );
}
