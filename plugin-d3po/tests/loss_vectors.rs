//! The loss half of the reference vectors in `d3po-vectors.json` (diffusers' DDIM scheduler in
//! float64, copied from `../shared/docs` into `tests/data`): from each case's reference deltas,
//! the clamped loss, its logit z and its gradient with respect to delta. The schedule, log-probs
//! and deltas themselves belong to the host's sampler and are checked there
//! (`server/tests/sampler_vectors.rs`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use candle_core::{DType, Device, Tensor, Var};
use plugin_d3po::{D3poLossConfig, d3po_loss};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    beta: f64,
    clamp_eps: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    delta: Vec<f64>,
    z: f64,
    loss: f64,
    dloss_ddelta: Vec<f64>,
}

fn assert_rel(actual: f64, expected: f64, rel: f64, what: &str) {
    let err = (actual - expected).abs();
    let tol = rel * expected.abs().max(1e-12);
    assert!(
        err <= tol,
        "{what}: got {actual}, want {expected} (err {err:e} > {tol:e})"
    );
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn loss_and_its_gradient_match_reference() {
    let v: Vectors =
        serde_json::from_str(include_str!("data/d3po-vectors.json")).expect("vectors parse");
    let config = D3poLossConfig {
        beta: v.beta,
        clamp_eps: v.clamp_eps,
    };
    assert!(!v.cases.is_empty());
    for case in &v.cases {
        let delta =
            Var::from_tensor(&Tensor::new(case.delta.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let d_w = delta.as_tensor().narrow(0, 0, 1).unwrap();
        let d_l = delta.as_tensor().narrow(0, 1, 1).unwrap();
        let loss = d3po_loss(&d_w, &d_l, &config).unwrap();
        let loss_value = to_vec(&loss)[0];
        assert_rel(loss_value, case.loss, 1e-4, "loss");
        // z = beta * (r_w - r_l) is the logit of the winner: loss = ln(1 + e^-z).
        assert_rel((-case.z).exp().ln_1p(), loss_value, 1e-4, "z");
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let g = to_vec(grads.get(delta.as_tensor()).unwrap());
        for (got, want) in g.iter().zip(&case.dloss_ddelta) {
            if *want == 0.0 {
                assert_eq!(*got, 0.0, "gradient outside the clamp must be exactly zero");
            } else {
                assert_rel(*got, *want, 1e-4, "dloss/ddelta");
            }
        }
    }
}
