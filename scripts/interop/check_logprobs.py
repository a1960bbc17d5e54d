#!/usr/bin/env python3
"""Recomputes, with diffusers' UNet and the LoRA loaded by diffusers, every step log-probability
the server recorded for images it drew with that adapter, and compares them.

    python3 scripts/interop/check_logprobs.py MODEL_DIR LORA_SOURCE EXPORT_DIR

EXPORT_DIR is an `imagegen export --all` of images generated with the imported adapter. The
step is the one the server's sampler takes (d3po.md section 1): the DDIM schedule of the model's
scheduler config, classifier-free guidance on the exported prompt embeddings, the mean
`sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps` and the Gaussian log-density averaged over
elements. Prints one JSON line; exits non-zero when a log-prob differs by more than 2e-3.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

TOLERANCE = 2e-3


def main(model_dir, source, export_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sys.path.insert(0, os.path.dirname(__file__))
    from check_export import source_unet

    unet = source_unet(model_dir, source).double().eval()
    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).unet
    base = base.double().eval()
    scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    alphas = scheduler.alphas_cumprod.double()
    final = alphas[0] if not scheduler.config.set_alpha_to_one else torch.tensor(1.0)
    meta = json.load(open(f"{export_dir}/metadata.json"))
    tensors = load_file(f"{export_dir}/trajectories.safetensors")
    worst, checked, base_gap = 0.0, 0, 0.0
    for group in meta["groups"]:
        for image in group["images"]:
            latents = tensors[image["latents"]].double()
            recorded = tensors[image["log_probs"]].double()
            context = torch.stack([tensors[image["negative_embeddings"]],
                                   tensors[image["prompt_embeddings"]]]).double()
            steps = image["steps"]
            scheduler.set_timesteps(steps)
            ratio = scheduler.config.num_train_timesteps // steps
            g, eta = image["guidance_scale"], image["eta"]
            for j, t in enumerate(image["timesteps"]):
                x_t, x_prev = latents[j:j + 1], latents[j + 1:j + 2]
                def log_prob(model):
                    with torch.no_grad():
                        out = model(torch.cat([x_t, x_t]), t, encoder_hidden_states=context).sample
                    eps = out[0:1] + g * (out[1:2] - out[0:1])
                    a_t = alphas[t]
                    prev = t - ratio
                    a_prev = alphas[prev] if prev >= 0 else final
                    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
                    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                    mu = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
                    return ((-(x_prev - mu) ** 2 / (2 * sigma ** 2)).mean() - math.log(sigma)
                            - 0.5 * math.log(2 * math.pi)).item()
                worst = max(worst, abs(log_prob(unet) - recorded[j].item()))
                base_gap = max(base_gap, abs(log_prob(base) - recorded[j].item()))
                checked += 1
    # The check is sharp only if the adapter moves the log-probs by more than the tolerance.
    ok = checked > 0 and worst <= TOLERANCE < base_gap
    print(json.dumps({"log_probs": checked, "max_abs_diff": worst, "tolerance": TOLERANCE,
                      "max_abs_diff_without_the_lora": base_gap, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
