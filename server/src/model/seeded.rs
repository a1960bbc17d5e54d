//! Deterministic random weights for models built from code (tests, benches, the tiny model).
//!
//! A [`VarBuilder`] backend that draws every tensor from a host RNG seeded by the global seed and
//! the tensor's name, honouring the init hint each layer asks for, and remembers what it made so
//! the result can be written out as a diffusers checkpoint. The same seed and architecture give
//! bit-identical weights on every machine (candle's own RNG cannot be seeded on CPU).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

/// Weights drawn on demand and remembered by name.
#[derive(Debug, Clone, Default)]
pub struct SeededWeights {
    seed: u64,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl SeededWeights {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            made: Arc::default(),
        }
    }

    /// A builder that draws from this generator in `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Everything drawn so far, by full name, in f32.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.made.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Draws `n` values for `name` according to `init`.
    fn draw(&self, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(name));
        let n = shape.elem_count();
        let fan_in = FanInOut::FanIn.for_shape(shape).max(1) as f64;
        let normal = |rng: &mut StdRng, mean: f64, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    (mean
                        + std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng))
                        as f32
                })
                .collect()
        };
        let uniform = |rng: &mut StdRng, lo: f64, up: f64| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..=up) as f32).collect()
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                non_linearity,
                ..
            } => {
                let gain = match non_linearity {
                    NonLinearity::ReLU => 2f64.sqrt(),
                    _ => 1.0,
                };
                let std = gain / fan_in.sqrt();
                match dist {
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                }
            }
        }
    }
}

/// FNV-1a: a stable (cross-platform, cross-version) hash of a tensor name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl SimpleBackend for SeededWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut made = self
            .made
            .lock()
            .map_err(|_| candle_core::Error::msg("weight generator poisoned"))?;
        if let Some(t) = made.get(name) {
            if t.shape() != &shape {
                candle_core::bail!("{name} requested as {shape:?} and as {:?}", t.shape());
            }
            return t.to_device(dev)?.to_dtype(dtype);
        }
        let values = self.draw(name, &shape, init);
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
        made.insert(name.to_string(), t.clone());
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let made = self
            .made
            .lock()
            .map_err(|_| candle_core::Error::msg("weight generator poisoned"))?;
        match made.get(name) {
            Some(t) => t.to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("{name} has no shape yet: request it with a shape first"),
        }
    }

    /// Every name "exists", so layers that probe for a key layout pick the current diffusers one.
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
