"""Forge Neo: our adapter in its ComfyUI-style registry (registry.py) and a check in front of its per-file loader.

Neo applies a file in `networks.load_lora_for_models` (extensions-builtin/sd_forge_lora): through
its registry and `ModelPatcher.add_patches` on float, fp8, nf4 and GGUF models (the patcher merges
into the dequantized weight and stores it back, or merges at every forward in its online mode),
through nunchaku's own LoRA composer on SVDQuant models, and through a LoRA-only run-time hook on
int8 models. In front of it we refuse, with one line naming the file:

* a file Neo would apply only in part: TLoRA modules its key maps do not place are reported at
  info level only while fewer than half the keys miss (a file made for another model);
* a file on a model Neo runs through nunchaku or its int8 hook: both take ordinary LoRA
  factors (up, down, alpha) only, where a TLoRA would be misread, not applied.
"""
from __future__ import annotations

import functools
import os
import types

from . import core, registry


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


def check(networks: types.ModuleType, model, clip, lora: dict, filename: str) -> None:
    """Refuse (TLoRAError) a TLoRA file that Neo would misapply or apply in part; nothing is applied then."""
    label = os.path.basename(str(filename))
    core.check_file(str(filename), lora.keys())
    why = unsupported_path(getattr(networks, "dynamic_args", None))
    if why is not None:
        raise core.TLoRAError(f"{core.METHOD} file {label}: {why}. Nothing of it was applied.")
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(diffusion_model).__name__ == "Anima" and hasattr(networks, "process_anima"):
        networks.process_anima(lora)  # Neo's own renaming (its adapter moved to the text encoder); idempotent
    known: dict = {}
    if model is not None:
        known.update(networks.model_lora_keys_unet(model.model, {}))
    if clip is not None:
        known.update(networks.model_lora_keys_clip(clip.cond_stage_model, {}))
    core.check_all_matched(label, lora.keys(), known)


def guard_loader(networks: types.ModuleType) -> None:
    """Wrap networks.load_lora_for_models (looked up by name at each call) with `check` for TLoRA files."""
    original = networks.load_lora_for_models
    if getattr(original, "_tlora_guard", False):
        return

    @functools.wraps(original)
    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        if core.is_tlora_file(lora):
            check(networks, model, clip, lora, filename)
        return original(model, clip, lora, strength_model, strength_clip, filename=filename, online_mode=online_mode)

    load_lora_for_models._tlora_guard = True
    networks.load_lora_for_models = load_lora_for_models


def install(weight_adapter: types.ModuleType, patcher_cls: type, networks: types.ModuleType | None) -> type:
    """Register our adapter and guard Neo's per-file loader (when its LoRA extension is loaded)."""
    cls = registry.install(weight_adapter, patcher_cls)
    if networks is not None:
        guard_loader(networks)
    return cls
