//! One DDIM step as a Gaussian policy: its mean, its log-probability and the log-ratio of two
//! policies on the same stored transition. Every function works on a batch whose items may sit
//! at different timesteps, so the per-item constants come as slices.

use candle_core::{D, Tensor};

use super::error::{Result, SamplerError};

/// `ln sqrt(2 pi)`.
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

/// A `[B, 1, 1, ...]` tensor of per-item values, to broadcast against a `[B, ...]` batch.
pub(crate) fn per_item(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let batch = like.dim(0)?;
    if values.len() != batch {
        return Err(SamplerError::InvalidArgument {
            name: "per-item constants",
            reason: format!("{} values for a batch of {batch}", values.len()),
        });
    }
    let mut shape = vec![1usize; like.rank()];
    shape[0] = batch;
    let t = Tensor::from_vec(values.to_vec(), batch, like.device())?;
    Ok(t.to_dtype(like.dtype())?.reshape(shape)?)
}

/// The policy mean `mu = c_x * x_t + c_out * model_out` with one `(c_x, c_out)` per item
/// (see [`crate::StepConstants::mean_coefficients`]); `model_out` is the guided prediction.
pub fn step_mean(x_t: &Tensor, model_out: &Tensor, coefficients: &[(f64, f64)]) -> Result<Tensor> {
    let (c_x, c_out): (Vec<f64>, Vec<f64>) = coefficients.iter().copied().unzip();
    let scaled_x = x_t.broadcast_mul(&per_item(&c_x, x_t)?)?;
    let scaled_out = model_out.broadcast_mul(&per_item(&c_out, model_out)?)?;
    Ok((scaled_x + scaled_out)?)
}

/// Mean over every non-batch element: `[B, ...] -> [B]`.
fn mean_per_item(t: &Tensor) -> Result<Tensor> {
    let batch = t.dim(0)?;
    Ok(t.reshape((batch, ()))?.mean(D::Minus1)?)
}

fn inverse_two_variances(sigmas: &[f64]) -> Result<Vec<f64>> {
    sigmas
        .iter()
        .map(|&s| {
            if s.is_finite() && s > 0.0 {
                Ok(1.0 / (2.0 * s * s))
            } else {
                Err(SamplerError::InvalidArgument {
                    name: "sigma",
                    reason: format!("must be finite and positive (eta > 0), got {s}"),
                })
            }
        })
        .collect()
}

/// `log pi(x_prev | x_t)` for each item: the **mean** over latent elements of the Gaussian
/// log-density `-(x_prev - mu)^2 / (2 sigma^2) - ln sigma - ln sqrt(2 pi)`. Returns `[B]`.
pub fn log_prob(x_prev: &Tensor, mu: &Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let inv = inverse_two_variances(sigmas)?;
    let sq = mean_per_item(&(x_prev - mu)?.sqr()?)?;
    let scale = Tensor::from_vec(
        inv.iter().map(|v| -v).collect::<Vec<_>>(),
        sq.dim(0)?,
        sq.device(),
    )?
    .to_dtype(sq.dtype())?;
    let offset: Vec<f64> = sigmas.iter().map(|s| -s.ln() - LN_SQRT_2PI).collect();
    let offset = Tensor::from_vec(offset, sq.dim(0)?, sq.device())?.to_dtype(sq.dtype())?;
    Ok(((sq * scale)? + offset)?)
}

/// `KL(pi_theta || pi_ref)` of each item's step, per latent element: the two Gaussians share
/// sigma, so it is `mean[(mu_theta - mu_ref)^2] / (2 sigma^2)`. Returns `[B]`.
pub fn kl_divergence(mu_policy: &Tensor, mu_ref: &Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let inv = inverse_two_variances(sigmas)?;
    let per = mean_per_item(&(mu_policy - mu_ref)?.sqr()?)?;
    let scale = Tensor::from_vec(inv, per.dim(0)?, per.device())?.to_dtype(per.dtype())?;
    Ok((per * scale)?)
}

/// `delta = log pi_theta(x_prev | x_t) - log pi_ref(x_prev | x_t)` for each item, computed as
/// `mean[(x_prev - mu_ref)^2 - (x_prev - mu_theta)^2] / (2 sigma^2)`: no `ln sigma` terms to
/// cancel, and exactly 0 when the two means are equal. Gradients flow through both means.
pub fn log_ratio(
    x_prev: &Tensor,
    mu_policy: &Tensor,
    mu_ref: &Tensor,
    sigmas: &[f64],
) -> Result<Tensor> {
    let inv = inverse_two_variances(sigmas)?;
    let diff = ((x_prev - mu_ref)?.sqr()? - (x_prev - mu_policy)?.sqr()?)?;
    let per = mean_per_item(&diff)?;
    let scale = Tensor::from_vec(inv, per.dim(0)?, per.device())?.to_dtype(per.dtype())?;
    Ok((per * scale)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn kl_divergence_per_element_matches_a_hand_computation() -> candle_core::Result<()> {
        // Item 0: every element 1 apart at sigma 0.5 -> 1 / (2 * 0.25) = 2.
        // Item 1: one of four elements 2 apart at sigma 1 -> mean 1 / 2 = 0.5.
        let mu_p = Tensor::from_vec(vec![1f32, 1., 1., 1., 0., 0., 2., 0.], (2, 4), &Device::Cpu)?;
        let mu_r = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let kl = kl_divergence(&mu_p, &mu_r, &[0.5, 1.0])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_vec1::<f32>()?;
        assert_eq!(kl, vec![2.0, 0.5]);
        let same = kl_divergence(&mu_p, &mu_p, &[0.5, 1.0])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_vec1::<f32>()?;
        assert_eq!(same, vec![0.0, 0.0]);
        assert!(kl_divergence(&mu_p, &mu_r, &[0.0, 1.0]).is_err());
        Ok(())
    }
}
