"""Forge Neo: our adapter in its ComfyUI-style registry (registry.py) and its per-file loader guarded (perfile.py).

Neo applies a file in `networks.load_lora_for_models`: through its registry and `ModelPatcher.add_patches`
on float, fp8, nf4 and GGUF models (the patcher merges into the dequantized weight and stores it back,
or merges at every forward in its online mode), through nunchaku's own LoRA composer on SVDQuant
models, and through a LoRA-only run-time hook on int8 models. The last two take ordinary LoRA factors
(up, down, alpha) only, where a TLoRA would be misread, not applied: such files are refused first.
"""
from __future__ import annotations

import types

from . import perfile, registry


def _arg(dynamic_args: object, name: str) -> object:
    """One of Neo's run-time flags (a dict in early-2026 builds, an attribute namespace later)."""
    if isinstance(dynamic_args, dict):
        return dynamic_args.get(name)
    return getattr(dynamic_args, name, None)


def unsupported_path(dynamic_args: object) -> str | None:
    """Why the loaded model cannot carry a TLoRA in Neo (its nunchaku or int8 path), or None."""
    if _arg(dynamic_args, "nunchaku"):
        return ("Forge Neo runs this model through nunchaku (SVDQuant), whose LoRA composer takes ordinary "
                "LoRA factors only")
    ops = str(_arg(dynamic_args, "ops") or "")
    if ops.endswith("Int8"):
        return (f"Forge Neo runs this model's layers as int8 ({ops}), whose LoRA hook adds ordinary LoRA "
                f"factors only; load the model in bf16, fp8, nf4 or GGUF to use it")
    return None


def install(weight_adapter: types.ModuleType, patcher_cls: type, networks: types.ModuleType) -> type:
    """Register our adapter and guard Neo's per-file loader."""
    cls = registry.install(weight_adapter, patcher_cls)
    perfile.guard(networks, lambda: unsupported_path(getattr(networks, "dynamic_args", None)))
    return cls
