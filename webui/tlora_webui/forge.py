"""Forge: TLoRA keys become patches of type "transformed_lora", merged by extra_weight_calculators."""
from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch

from . import core, perfile
from .patcher_guard import guard_add_patches


def calculate(weight: torch.Tensor, strength: float, v: tuple) -> torch.Tensor:
    """Forge's calculator hook: weight += strength * (W T + s Delta - W), in place (weight is float32 there).

    In place because a patch of a fused weight's rows gets a view of them, and Forge keeps the whole
    weight it narrowed, not what the calculator returns (a new tensor would be dropped without a word).
    """
    if strength == 0:
        return weight
    diff = v[0].weight_diff(weight, strength)  # fit checked when the patch was added
    weight += diff.to(weight.dtype)
    return weight


def loader(host_load_lora: Callable) -> Callable:
    """A load_lora(lora, to_load) that claims TLoRA modules and hands the other keys to the host's."""

    def load_lora(lora: Mapping, to_load: Mapping) -> tuple[dict, dict]:
        patches, used = {}, set()
        for x, model_key in to_load.items():
            found = core.claim(x, lora)
            if found is None:
                continue
            if model_key in patches:
                raise core.TLoRAError(f"broken TLoRA file: the weight {model_key} is given twice (as "
                                      f"{patches[model_key][1][0].name} and {x}): keep one name per module")
            patches[model_key] = (core.PATCH_TYPE, (found[0],))
            used |= found[1]
        for prefix, model_key in _text_encoder_aliases(lora, to_load, used).items():
            found = core.claim(prefix, lora)
            patches[model_key] = (core.PATCH_TYPE, (found[0],))
            used |= found[1]
        if not patches:
            return host_load_lora(lora, to_load)
        host_patches, remaining = host_load_lora({k: v for k, v in lora.items() if k not in used}, to_load)
        host_patches.update(patches)
        return host_patches, remaining

    load_lora._tlora_loader = True
    return load_lora


def _text_encoder_aliases(lora: Mapping, to_load: Mapping, used: set) -> dict:
    """{ComfyUI text-encoder module path: model key} for our modules Forge's key map lacks.

    Forge maps text encoders by kohya names only (`lora_te_`, `lora_te1_`, `lora_te2_`), not by
    ComfyUI's `text_encoders.<clip>.transformer...` paths, which our trainer writes.
    """
    out = {}
    prefixes = {k.rpartition(".tlora_")[0] for k in lora if ".tlora_" in k and k not in used}
    for prefix in sorted(p for p in prefixes if p.startswith(core.tarch.TE_PREFIX) and p not in to_load):
        for arch in ("sdxl", "sd15"):  # clip_l is lora_te1_ on SDXL, lora_te_ on SD1.5: Forge maps both
            try:
                kohya = core.tarch.kohya_name(prefix, arch)
            except ValueError:
                continue
            if kohya in to_load:
                out[prefix] = to_load[kohya]
                break
    return out


def install(forge_lora: types.ModuleType, patcher_cls: type, networks: types.ModuleType | None = None) -> None:
    """Register the calculator, put our loader first in Forge's lora collections, fit-check in add_patches,
    and guard the per-file loader (perfile.py) when given."""
    forge_lora.extra_weight_calculators[core.PATCH_TYPE] = calculate
    priority = forge_lora.lora_collection_priority
    if not any(getattr(getattr(c, "load_lora", None), "_tlora_loader", False) for c in priority):
        host = forge_lora.get_function("load_lora")
        priority.insert(0, types.SimpleNamespace(__name__="tlora_webui", load_lora=loader(host)))
    guard_add_patches(patcher_cls, lambda v: v[1][0] if isinstance(v, tuple) and len(v) == 2
                      and v[0] == core.PATCH_TYPE else None)
    if networks is not None:
        perfile.guard(networks)
