"""reForge: our weight adapter in `ldm_patched.modules.weight_adapter.adapters` (ComfyUI's registry; registry.py).

reForge loads a file with one `ldm_patched.modules.lora.load_lora` over its UNet and CLIP key maps
together and logs each key no adapter took ("lora key not loaded") while applying the rest; for a
TLoRA file that is a file made for another model applied in part, so the file is refused whole
unless every TLoRA module in it became a patch of ours.
"""
from __future__ import annotations

import functools
import types

from . import core, perfile, registry


def guard_load_lora(lora_module: types.ModuleType) -> None:
    """Wrap lora_module.load_lora (looked up by name at each call): refuse a TLoRA file with modules left over."""
    original = lora_module.load_lora
    if getattr(original, "_tlora_guard", False):
        return

    @functools.wraps(original)
    def load_lora(lora, to_load, *args, **kwargs):
        patches = original(lora, to_load, *args, **kwargs)
        if core.is_tlora_file(lora):
            found = set().union(*(perfile.adapter_names(v) for v in patches.values())) if patches else set()
            core.check_all_matched("this file", lora.keys(), found)
        return patches

    load_lora._tlora_guard = True
    lora_module.load_lora = load_lora


def install(weight_adapter: types.ModuleType, patcher_cls: type, lora_module: types.ModuleType | None = None) -> type:
    """Append our adapter to reForge's registry, fit-check its patches in add_patches, guard load_lora."""
    cls = registry.install(weight_adapter, patcher_cls)
    if lora_module is not None:
        guard_load_lora(lora_module)
    return cls
