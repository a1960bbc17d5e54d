//! The reference vectors of `d3po-vectors.json` (diffusers' DDIM scheduler in float64), copied
//! from `../shared/docs` into `tests/data` so a bare clone can run them: the schedule, the step
//! log-probabilities and the log-ratios delta, which the sampler owns. The loss on those deltas
//! is checked against the same file in `plugin-d3po/tests/loss_vectors.rs`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::{DType, Device, Tensor};
use imagegen_server::sampler::{
    DdimSchedule, PredictionType, SchedulerConfig, log_prob, log_ratio, step_mean,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    guidance: f64,
    eta: f64,
    schedule: Vec<ScheduleRow>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct ScheduleRow {
    index: usize,
    t: usize,
    t_prev: usize,
    alpha_bar: f64,
    alpha_bar_prev: f64,
    sigma: f64,
}

#[derive(Deserialize)]
struct Case {
    step_index: usize,
    t: usize,
    perturbation: f64,
    logp_policy: Vec<f64>,
    logp_ref: Vec<f64>,
    delta: Vec<f64>,
}

fn vectors() -> Vectors {
    let text = include_str!("data/d3po-vectors.json");
    serde_json::from_str(text).expect("vectors parse")
}

fn assert_rel(actual: f64, expected: f64, rel: f64, what: &str) {
    let err = (actual - expected).abs();
    let tol = rel * expected.abs().max(1e-12);
    assert!(
        err <= tol,
        "{what}: got {actual}, want {expected} (err {err:e} > {tol:e})"
    );
}

#[test]
fn schedule_matches_diffusers() {
    let v = vectors();
    let schedule = DdimSchedule::new(&SchedulerConfig::default(), v.schedule.len()).unwrap();
    assert_eq!(schedule.len(), 20);
    for row in &v.schedule {
        let step = schedule.step(row.index).unwrap();
        assert_eq!(
            (step.t, step.t_prev),
            (row.t, row.t_prev),
            "timesteps at {}",
            row.index
        );
        assert_rel(step.alpha_bar, row.alpha_bar, 1e-6, "alpha_bar");
        assert_rel(
            step.alpha_bar_prev,
            row.alpha_bar_prev,
            1e-6,
            "alpha_bar_prev",
        );
        assert_rel(step.sigma(v.eta), row.sigma, 1e-6, "sigma");
    }
}

/// The inputs the vector file describes: image `i` of a pair, flat index `k` of a `(1,4,2,2)`
/// latent, `o = 16 i`.
struct CaseInputs {
    x_t: Tensor,
    eps_policy: Tensor,
    eps_ref: Tensor,
    x_prev: Tensor,
}

fn case_inputs(p: f64, coeffs: (f64, f64), sigma: f64, guidance: f64) -> CaseInputs {
    let dev = Device::Cpu;
    let mk = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f64> = (0..32).map(|k| f(k as f64)).collect();
        Tensor::from_vec(v, (2, 4, 2, 2), &dev).unwrap()
    };
    let x_t = mk(&|k| (0.37 * k + 0.1).sin());
    let uncond = |k: f64| 0.3 * (0.23 * k).cos();
    let cond = |k: f64| uncond(k) + 0.2 * (0.5 * k + 0.2).sin();
    let guide = |u: f64, c: f64| u + guidance * (c - u);
    let eps_policy = mk(&|k| guide(uncond(k), cond(k)));
    let eps_ref = mk(&|k| {
        guide(
            uncond(k) + p * (0.13 * k).sin(),
            cond(k) - p * (0.29 * k).cos(),
        )
    });
    let mu_ref = step_mean(&x_t, &eps_ref, &[coeffs; 2]).unwrap();
    let x_prev = (mu_ref + mk(&|k| sigma * (0.71 * k + 0.3).cos())).unwrap();
    CaseInputs {
        x_t,
        eps_policy,
        eps_ref,
        x_prev,
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn log_probs_and_deltas_match_reference() {
    let v = vectors();
    let schedule = DdimSchedule::new(&SchedulerConfig::default(), 20).unwrap();
    for case in &v.cases {
        let step = schedule.step(case.step_index).unwrap();
        assert_eq!(step.t, case.t);
        let coeffs = step.mean_coefficients(v.eta, PredictionType::Epsilon);
        let sigma = step.sigma(v.eta);
        let inputs = case_inputs(case.perturbation, coeffs, sigma, v.guidance);
        let mu_policy = step_mean(&inputs.x_t, &inputs.eps_policy, &[coeffs; 2]).unwrap();
        let mu_ref = step_mean(&inputs.x_t, &inputs.eps_ref, &[coeffs; 2]).unwrap();
        let sigmas = [sigma; 2];
        let lp_policy = to_vec(&log_prob(&inputs.x_prev, &mu_policy, &sigmas).unwrap());
        let lp_ref = to_vec(&log_prob(&inputs.x_prev, &mu_ref, &sigmas).unwrap());
        for i in 0..2 {
            assert_rel(lp_policy[i], case.logp_policy[i], 1e-4, "logp_policy");
            assert_rel(lp_ref[i], case.logp_ref[i], 1e-4, "logp_ref");
        }

        let delta = to_vec(&log_ratio(&inputs.x_prev, &mu_policy, &mu_ref, &sigmas).unwrap());
        for (got, want) in delta.iter().zip(&case.delta) {
            assert_rel(*got, *want, 1e-4, "delta");
        }
    }
}

#[test]
fn delta_is_exactly_zero_when_policy_equals_reference() {
    let v = vectors();
    let schedule = DdimSchedule::new(&SchedulerConfig::default(), 20).unwrap();
    for step in schedule.steps() {
        let coeffs = step.mean_coefficients(v.eta, PredictionType::Epsilon);
        let sigma = step.sigma(v.eta);
        for dtype in [DType::F32, DType::F64] {
            let inputs = case_inputs(0.0, coeffs, sigma, v.guidance);
            let x_t = inputs.x_t.to_dtype(dtype).unwrap();
            let eps = inputs.eps_policy.to_dtype(dtype).unwrap();
            let x_prev = inputs.x_prev.to_dtype(dtype).unwrap();
            let mu_a = step_mean(&x_t, &eps, &[coeffs; 2]).unwrap();
            let mu_b = step_mean(&x_t, &eps, &[coeffs; 2]).unwrap();
            let delta = to_vec(&log_ratio(&x_prev, &mu_a, &mu_b, &[sigma; 2]).unwrap());
            assert_eq!(delta, vec![0.0, 0.0], "step {} ({dtype:?})", step.index);
        }
    }
}
