#!/usr/bin/env python3
"""Loads an adapter exported by imagegen (`imagegen adapters export GEN --out DIR`) into the
tools people use, and checks that each applies the same update as the server.

    python3 scripts/interop/check_export.py MODEL_DIR EXPORT_DIR [SOURCE]

MODEL_DIR is the diffusers pipeline the server served (e.g. `imagegen-server make-tiny-model`),
EXPORT_DIR the export. Checks, for diffusers' `load_lora_weights` and PEFT's
`PeftModel.from_pretrained`: every exported tensor is loaded (no missing or unexpected keys, no
warnings), and every adapted projection's effective update equals `B A * alpha / r` from the
files. With SOURCE (the file or folder the server imported), also that the export applies the
update diffusers or PEFT compute from SOURCE. Prints one JSON line; exits non-zero on a mismatch.
"""
import json
import logging
import sys
import warnings

import torch
from safetensors.torch import load_file


def expected_updates(export_dir):
    config = json.load(open(f"{export_dir}/adapter_config.json"))
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(f"{export_dir}/adapter_model.safetensors")
    updates = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            updates[path] = (b.double() @ a.double()) * scale
    return updates


def effective_update(module, adapter):
    a = module.lora_A[adapter].weight.double()
    b = module.lora_B[adapter].weight.double()
    return (b @ a) * module.scaling[adapter]


def compare(unet, updates, adapter):
    worst, seen = 0.0, 0
    modules = dict(unet.named_modules())
    for path, want in updates.items():
        got = effective_update(modules[path], adapter)
        worst = max(worst, (got - want).abs().max().item())
        seen += 1
    return worst, seen


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def source_unet(model_dir, source):
    """The tiny UNet with SOURCE loaded the way its own tool loads it."""
    import os
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "adapter_config.json")):
        return PeftModel.from_pretrained(pipe.unet, source).base_model.model
    if os.path.isdir(source):
        pipe.load_lora_weights(source)
    else:
        pipe.load_lora_weights(os.path.dirname(source), weight_name=os.path.basename(source))
    return pipe.unet


def main(model_dir, export_dir, source=None):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from peft import PeftModel

    captured = Captured()
    dlogging.get_logger("diffusers").addHandler(captured)
    logging.getLogger("peft").addHandler(captured)
    updates = expected_updates(export_dir)
    report = {"projections": len(updates)}
    ok = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        pipe.load_lora_weights(export_dir, adapter_name="imagegen")
    # diffusers says "No LoRA keys associated to CLIPTextModel" for every UNet-only LoRA, its
    # own `save_lora_weights` output included: not a defect of the file.
    lora_warnings = [m for m in captured.records + [str(w.message) for w in caught]
                     if ("lora" in m.lower() or "key" in m.lower() or "adapter" in m.lower())
                     and "associated to CLIPTextModel" not in m]
    worst, seen = compare(pipe.unet, updates, "imagegen")
    report["diffusers"] = {"loaded": seen, "max_abs_diff": worst, "warnings": lora_warnings}
    ok &= seen == len(updates) and worst < 1e-6 and not lora_warnings

    captured.records.clear()
    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None).unet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_unet = PeftModel.from_pretrained(base, export_dir, adapter_name="imagegen")
    peft_warnings = [m for m in captured.records + [str(w.message) for w in caught]
                     if "missing" in m.lower() or "unexpected" in m.lower()]
    worst, seen = compare(peft_unet.base_model.model, updates, "imagegen")
    report["peft"] = {"loaded": seen, "max_abs_diff": worst, "warnings": peft_warnings}
    ok &= seen == len(updates) and worst < 1e-6 and not peft_warnings
    if source is not None:
        src = source_unet(model_dir, source)
        worst, seen = 0.0, 0
        modules = dict(src.named_modules())
        for path, want in updates.items():
            module = modules[path]
            adapter = next(iter(module.lora_A.keys()))
            worst = max(worst, (effective_update(module, adapter) - want).abs().max().item())
            seen += 1
        report["source"] = {"compared": seen, "max_abs_diff": worst}
        ok &= seen == len(updates) and worst < 1e-5
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
