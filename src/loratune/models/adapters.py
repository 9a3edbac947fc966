"""Adapter folders: check an adapter fits a base model *before* peft loads it.

Loading an adapter trained on another base either fails deep inside peft with a size-mismatch traceback, or,
worse, succeeds when the shapes happen to agree. We compare the adapter's recorded base name and every LoRA
matrix shape with the model's modules first, and say which one differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratune.errors import LoratuneError


def _lora_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoratuneError("adapter folder has no adapter_model.safetensors", file=adapter_dir,
                            hint="pass a folder written by loratune train or peft save_pretrained")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LoratuneError(f"corrupt adapter weights: {e}", file=weights, hint="re-train or re-download it") from None


def check_adapter_matches(adapter_dir: str | Path, model: Any) -> None:
    """Raise a one-line error if the adapter's LoRA shapes do not fit `model`."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise LoratuneError("not an adapter folder (no adapter_config.json)", file=adapter_dir)
    shapes = _lora_shapes(adapter_dir)
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj
        module_path = key.split(".lora_")[0]
        for prefix in ("base_model.model.", "base_model."):
            if module_path.startswith(prefix):
                module_path = module_path[len(prefix):]
                break
        target = modules.get(module_path)
        if target is None:
            base = json.loads(config_path.read_text()).get("base_model_name_or_path", "?")
            raise LoratuneError(f"adapter module {module_path} does not exist in this base model",
                                file=adapter_dir, hint=f"the adapter was trained on {base}; load that base")
        in_f = getattr(target, "in_features", None)
        out_f = getattr(target, "out_features", None)
        if in_f is None:
            continue
        expected = shape[1] if ".lora_A." in key else shape[0]
        actual = in_f if ".lora_A." in key else out_f
        if expected != actual:
            base = json.loads(config_path.read_text()).get("base_model_name_or_path", "?")
            raise LoratuneError(
                f"adapter was trained on a different base model: {module_path} expects size {expected}, "
                f"this model has {actual}", file=adapter_dir, hint=f"load the base it was trained on ({base})")
