#!/usr/bin/env python3
"""Writes one LoRA for MODEL_DIR's UNet in each format people publish, into OUT_DIR:

    diffusers/pytorch_lora_weights.safetensors   StableDiffusionPipeline.save_lora_weights
    peft/{adapter_model.safetensors, adapter_config.json}   PeftModel.save_pretrained
    kohya.safetensors                            lora_unet_* lora_down / lora_up / alpha

All three hold the same random A and B (B non-zero, so an update is visible) on to_q, to_k,
to_v and to_out.0, rank 4, alpha 8 (scale 2).

    python3 scripts/interop/make_loras.py MODEL_DIR OUT_DIR
"""
import os
import sys

import torch
from safetensors.torch import save_file


def main(model_dir, out):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights="gaussian")
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    state = get_peft_model_state_dict(pipe.unet)
    os.makedirs(f"{out}/diffusers", exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        f"{out}/diffusers", unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict()
    )
    # PEFT's own save of the wrapped UNet.
    from peft import PeftModel, get_peft_model
    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).unet
    wrapped = get_peft_model(base, config)
    wrapped.load_state_dict(
        {f"base_model.model.{k.replace('.weight', '.default.weight')}": v for k, v in state.items()},
        strict=False,
    )
    wrapped.save_pretrained(f"{out}/peft")
    # kohya: module path with '_' and lora_down / lora_up / alpha.
    kohya = {}
    for key, v in state.items():
        module, part = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        part = "lora_down.weight" if part.startswith("A") else "lora_up.weight"
        kohya[f"{name}.{part}"] = v.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(kohya, f"{out}/kohya.safetensors")
    print(f"wrote {len(state) // 2} projections in three formats to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
