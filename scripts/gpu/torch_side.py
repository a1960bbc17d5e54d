"""The GPU check's PyTorch side: the same workloads as `tests/benches/gpu_check.rs`, through
diffusers (eager, random weights from fixed seeds), on the same device in the same run.

  python3 torch_side.py --device cuda --size sd15     (scripts/gpu-check.sh)
  python3 torch_side.py --device cpu --size tiny      (its --cpu dry run)

Prints progress on stderr and one JSON object as the last stdout line:
  unet_fwd {"<dtype>_b<n>_ms"}, generate {"<dtype>_<px>px_20steps_ms"},
  train {"d3po_step_ms", "peak_mem_mib"}.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=32,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=2,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=2,
    latent_channels=4,
    sample_size=64,
)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, projection_dim=768, vocab_size=49408)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                 num_attention_heads=4, projection_dim=32, vocab_size=1000,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, runs):
    fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 1)


def unet(size, dtype, device):
    torch.manual_seed(0)
    return UNet2DConditionModel(**(SD15_UNET if size == "sd15" else TINY_UNET)).to(device, dtype).eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--only", default="unet,generate,train")
    args = parser.parse_args()
    device = torch.device(args.device)
    only = set(args.only.split(","))
    sd15 = args.size == "sd15"
    latent, pixels = (64, 512) if sd15 else (32, 64)
    dtypes = {"f16": torch.float16, "bf16": torch.bfloat16} if device.type == "cuda" else {"f32": torch.float32}
    if device.type == "cpu":
        torch.set_num_threads(2)
    out = {"torch": torch.__version__, "device": args.device, "size": args.size}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(0)

    if "unet" in only:
        res = {}
        for name, dtype in dtypes.items():
            model = unet(args.size, dtype, device)
            ctx_dim = model.config.cross_attention_dim
            for batch in (1, 2, 4, 8):
                g = torch.Generator().manual_seed(1)
                x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
                ctx = torch.randn(batch, 77, ctx_dim, generator=g).to(device, dtype)
                with torch.inference_mode():
                    res[f"{name}_b{batch}_ms"] = median_ms(lambda: model(x, 500, ctx).sample, device, 5)
                log(f"torch UNet forward {name} batch {batch}: {res[f'{name}_b{batch}_ms']} ms")
            del model
        out["unet_fwd"] = res

    if "generate" in only:
        res = {}
        for name, dtype in dtypes.items():
            model = unet(args.size, dtype, device)
            torch.manual_seed(1)
            vae = AutoencoderKL(**(SD15_VAE if sd15 else TINY_VAE)).to(device, dtype).eval()
            torch.manual_seed(2)
            text = CLIPTextModel(CLIPTextConfig(**(SD15_CLIP if sd15 else TINY_CLIP))).to(device, dtype).eval()
            scheduler = DDIMScheduler(**SCHEDULER)
            ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3)).to(device)

            def generate():
                # What StableDiffusionPipeline does, without its tokenizer (random weights).
                with torch.inference_mode():
                    ctx = text(ids)[0]
                    scheduler.set_timesteps(20)
                    g = torch.Generator().manual_seed(7)
                    x = torch.randn(1, 4, latent, latent, generator=g).to(device, dtype)
                    for t in scheduler.timesteps:
                        eps = model(torch.cat([x, x]), t, ctx).sample
                        uncond, cond = eps.chunk(2)
                        eps = uncond + 5.0 * (cond - uncond)
                        x = scheduler.step(eps, t, x, eta=1.0).prev_sample
                    img = vae.decode(x / 0.18215).sample
                    return ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

            res[f"{name}_{pixels}px_20steps_ms"] = median_ms(generate, device, 3)
            log(f"torch {pixels} px 20 steps CFG {name}: {res[f'{name}_{pixels}px_20steps_ms']} ms")
            del model, vae, text
        out["generate"] = res

    if "train" in only:
        from peft import LoraConfig

        model = unet(args.size, torch.float32, device)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        ctx_dim = model.config.cross_attention_dim
        g = torch.Generator().manual_seed(4)
        # One pair (2 images) with CFG: 4 rows, at one time index.
        x = torch.randn(4, 4, latent, latent, generator=g).to(device)
        ctx = torch.randn(4, 77, ctx_dim, generator=g).to(device)

        def step():
            with torch.no_grad():
                model.disable_adapters()
                ref = model(x, 500, ctx).sample
                model.enable_adapters()
            eps = model(x, 500, ctx).sample
            loss = ((eps - ref) ** 2).mean()
            loss.backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, device, 3)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["train"] = {"d3po_step_ms": ms, "peak_mem_mib": round(peak, 1), "latent": latent}
        log(f"torch D3PO-shaped LoRA step at {latent}x{latent}: {ms} ms, peak {peak:.0f} MiB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
