//! Choices that depend on the device, made in one place from it (the per-op choice of kernel is
//! `nn::cpu_kernel_for`, beside the kernels).

use candle_core::{DType, Device};

/// How a model on `device` batches its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePlan {
    /// Most rows (CFG halves count separately) per UNet call; larger batches run in chunks.
    /// 4 on the CPU, where small calls keep activations in cache; unlimited on a GPU, where a
    /// bigger batch fills more of the chip.
    pub micro_batch_rows: usize,
    /// Most images per VAE decode call: 2 on the CPU (a batch of 8 tiny-model images decodes
    /// in 170 ms this way against 310 ms at once), all of them on a GPU.
    pub vae_decode_images: usize,
}

impl DevicePlan {
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            Self {
                micro_batch_rows: 4,
                vae_decode_images: 2,
            }
        } else {
            Self {
                micro_batch_rows: usize::MAX,
                vae_decode_images: usize::MAX,
            }
        }
    }

    /// Why `dtype` cannot compute on `device`, if it cannot.
    pub fn unsupported_dtype(device: &Device, dtype: DType) -> Option<&'static str> {
        (dtype == DType::BF16 && device.is_cpu()).then_some(
            "bf16 compute is not supported on the CPU (no bf16 matmul there); use f32 or f16, \
             bf16 weight files load into either",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_batches_small_and_refuses_bf16() {
        let plan = DevicePlan::for_device(&Device::Cpu);
        assert_eq!((plan.micro_batch_rows, plan.vae_decode_images), (4, 2));
        assert!(DevicePlan::unsupported_dtype(&Device::Cpu, DType::BF16).is_some());
        assert!(DevicePlan::unsupported_dtype(&Device::Cpu, DType::F16).is_none());
    }
}
