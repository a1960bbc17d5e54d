//! An `AutoencoderKL` whose weights are written by hand rather than trained: its encoder is exact
//! `f` x `f` average pooling and its decoder exact `f`x nearest-neighbour upsampling (`f` a power
//! of two), both of RGB in [-1, 1]. The embedded model diffuses in this "latent" space, which is
//! simply the image at `1/f` resolution, so it needs no learned autoencoder yet loads through the
//! standard pipeline layout (here and in diffusers).
//!
//! How an identity passes through the VAE's nonlinear layers:
//! - every resnet's `conv2` and every attention's output projection are zero, so those blocks
//!   reduce to their skip connection;
//! - `conv_in` writes each colour `v` into a group of four channels `(v, -v, K, -K)`: the group's
//!   mean is exactly 0 and its variance `(mean(v^2) + K^2) / 2`, so the final group norm divides
//!   by `K / sqrt(2)` to within `mean(v^2) / (2 K^2)` (5e-7 for K = 1000), and its affine weight
//!   multiplies that back;
//! - the norm's bias shifts `v` to `v + 16`, where SiLU is the identity to 2e-6, and `conv_out`
//!   subtracts the 16 again.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::model::seeded::SeededWeights;
use crate::model::vae::{VaeConfig, VaeDecoder};
use crate::pipeline::save::full_autoencoder;

/// The constant channel pair that pins the group norms' scale.
const PIN: f32 = 1000.0;
/// Where SiLU is linear enough to carry values in [-1, 1] unchanged.
const SHIFT: f32 = 16.0;
/// Channels per colour inside the VAE: `(v, -v, PIN, -PIN)`.
const PER_COLOUR: usize = 4;

/// The configuration for a `factor` of 2, 4 or 8: one level more than the factor's power of two,
/// 3 latent channels, 12 internal channels in 3 groups.
pub fn pixel_vae_config(factor: usize) -> VaeConfig {
    VaeConfig {
        in_channels: 3,
        out_channels: 3,
        block_out_channels: vec![3 * PER_COLOUR; 1 + factor.trailing_zeros() as usize],
        layers_per_block: 1,
        latent_channels: 3,
        norm_num_groups: 3,
        scaling_factor: 1.0,
        use_post_quant_conv: true,
        sample_size: 64,
    }
}

/// Every tensor of the autoencoder (encoder and decoder), under diffusers' keys.
pub fn pixel_vae_weights(factor: usize) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let config = pixel_vae_config(factor);
    // Record every key and shape the two implementations ask for, then overwrite the values.
    let shapes = SeededWeights::new(0);
    full_autoencoder(&config, shapes.var_builder(DType::F32, &Device::Cpu))?;
    VaeDecoder::new(&config, shapes.var_builder(DType::F32, &Device::Cpu))?;
    let mut out = BTreeMap::new();
    for (key, tensor) in shapes.tensors() {
        let values = weight_values(&key, tensor.dims());
        out.insert(key, Tensor::from_vec(values, tensor.dims(), &Device::Cpu)?);
    }
    Ok(out)
}

/// The values of one weight: zero unless the construction above needs it.
fn weight_values(key: &str, dims: &[usize]) -> Vec<f32> {
    let mut v = vec![0.0f32; dims.iter().product()];
    // Conv weights `[out, in, k, k]`: set `(o, i)` at the kernel's tap `(y, x)`.
    let mut set = |o: usize, i: usize, y: usize, x: usize, value: f32| {
        let (cin, k) = (dims[1], dims[2]);
        v[((o * cin + i) * k + y) * k + x] = value;
    };
    let colours = 0..3;
    match key {
        "encoder.conv_in.weight" | "decoder.conv_in.weight" => {
            for c in colours {
                set(PER_COLOUR * c, c, 1, 1, 1.0);
                set(PER_COLOUR * c + 1, c, 1, 1, -1.0);
            }
        }
        "encoder.conv_in.bias" | "decoder.conv_in.bias" => {
            for c in colours {
                v[PER_COLOUR * c + 2] = PIN;
                v[PER_COLOUR * c + 3] = -PIN;
            }
        }
        // Stride 2 over the right/bottom-padded input: taps (0..2, 0..2) cover one 2x2 cell.
        k if k.starts_with("encoder.down_blocks.")
            && k.ends_with(".downsamplers.0.conv.weight") =>
        {
            for o in 0..dims[0] {
                for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    set(o, o, y, x, 0.25);
                }
            }
        }
        k if k.starts_with("decoder.up_blocks.") && k.ends_with(".upsamplers.0.conv.weight") => {
            for o in 0..dims[0] {
                set(o, o, 1, 1, 1.0);
            }
        }
        "encoder.conv_norm_out.weight" | "decoder.conv_norm_out.weight" => {
            for c in colours {
                v[PER_COLOUR * c] = PIN / std::f32::consts::SQRT_2;
            }
        }
        "encoder.conv_norm_out.bias" | "decoder.conv_norm_out.bias" => {
            for c in colours {
                v[PER_COLOUR * c] = SHIFT;
            }
        }
        "encoder.conv_out.weight" | "decoder.conv_out.weight" => {
            for c in colours {
                set(c, PER_COLOUR * c, 1, 1, 1.0);
            }
        }
        // The encoder's mean channels, then its log-variance channels (a near-zero variance).
        "encoder.conv_out.bias" => {
            for (i, x) in v.iter_mut().enumerate() {
                *x = if i < 3 { -SHIFT } else { -30.0 };
            }
        }
        "decoder.conv_out.bias" => v.fill(-SHIFT),
        "quant_conv.weight" | "post_quant_conv.weight" => {
            for o in 0..dims[0] {
                set(o, o, 0, 0, 1.0);
            }
        }
        // Unused group norms keep unit scale so nothing divides by an all-zero weight later.
        k if k.ends_with("norm1.weight")
            || k.ends_with("norm2.weight")
            || k.ends_with("group_norm.weight") =>
        {
            v.fill(1.0)
        }
        _ => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;

    fn image(side: usize) -> Tensor {
        // A smooth ramp plus a hard edge, in [-1, 1].
        let data: Vec<f32> = (0..3 * side * side)
            .map(|i| {
                let (c, p) = (i / (side * side), i % (side * side));
                let (y, x) = (p / side, p % side);
                let ramp = (x as f32 / side as f32) * 1.6 - 0.8;
                if y > side / 2 {
                    -ramp
                } else {
                    ramp * (c as f32 - 1.0)
                }
            })
            .collect();
        Tensor::from_vec(data, (1, 3, side, side), &Device::Cpu).unwrap()
    }

    /// `x` [1, c, h, w] -> [1, c, h / f, w / f] by means of f x f cells.
    fn pool(x: &Tensor, f: usize) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        x.reshape((b, c, h / f, f, w / f, f))
            .unwrap()
            .mean(5)
            .unwrap()
            .mean(3)
            .unwrap()
    }

    /// `x` [1, c, h, w] -> [1, c, h f, w f], each value repeated in an f x f cell.
    fn upsample(x: &Tensor, f: usize) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        x.reshape((b, c, h, 1, w, 1))
            .unwrap()
            .broadcast_as((b, c, h, f, w, f))
            .unwrap()
            .reshape((b, c, h * f, w * f))
            .unwrap()
    }

    fn weights(factor: usize) -> VarBuilder<'static> {
        VarBuilder::from_tensors(
            pixel_vae_weights(factor).unwrap().into_iter().collect(),
            DType::F32,
            &Device::Cpu,
        )
    }

    #[test]
    fn decoder_is_nearest_neighbour_upsampling() {
        for factor in [2, 4] {
            let config = pixel_vae_config(factor);
            assert_eq!(config.scale_factor(), factor);
            let decoder = VaeDecoder::new(&config, weights(factor)).unwrap();
            let latent = image(8);
            let decoded = decoder.decode(&latent).unwrap(); // [1, 8f, 8f, 3]
            let expected = upsample(&latent, factor).permute((0, 2, 3, 1)).unwrap();
            let err = crate::model::nn::max_abs_diff(&decoded, &expected);
            assert!(err < 1e-4, "factor {factor}: decoder differs by {err}");
        }
    }

    #[test]
    fn candle_transformers_autoencoder_pools_and_upsamples() {
        for factor in [2, 4] {
            let vae = full_autoencoder(&pixel_vae_config(factor), weights(factor)).unwrap();
            let img = image(16);
            let latent = vae.encode(&img).unwrap().sample().unwrap();
            let pooled = pool(&img, factor);
            let err = crate::model::nn::max_abs_diff(&latent, &pooled);
            assert!(
                err < 1e-4,
                "factor {factor}: encoder differs from pooling by {err}"
            );
            let back = vae.decode(&pooled).unwrap();
            let err = crate::model::nn::max_abs_diff(&back, &upsample(&pooled, factor));
            assert!(
                err < 1e-4,
                "factor {factor}: decoder differs from upsampling by {err}"
            );
        }
    }
}
