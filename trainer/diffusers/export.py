"""A TLoRA file as an ordinary LoRA against a diffusers pipeline's own weights (the work is tlora/convert.py).

    from comfyui_tlora.trainer.diffusers.export import export_lora
    result = export_lora(pipe, "style.safetensors", "style_lora.safetensors", rank=32)   # or max_error=0.05
    pipe.load_lora_weights("style_lora.safetensors")      # any LoRA loader reads it, ComfyUI's and A1111's too

The base weights are read from the live modules (through our TLoRA wrappers and PEFT's, whose
`weight` is the base's), each ComfyUI generic weight rebuilt from the diffusers modules that hold
its rows (Flux/SD3 q, k, v and `proj_mlp` of the fused weights, the swapped modulations), as
`tlora.diffusers_names` maps them on the live model's own config. The file gets kohya names, so
the LoRA is the same file `python -m tlora export-lora` writes from a ComfyUI checkpoint.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as arch_mod
from ...tlora import diffusers_names as names
from ...tlora.basefile import Located, WeightBase
from ...tlora.convert import Input, LoRATarget, Result, convert, write_result
from ...tlora.format import TLoRAFile, load
from . import apply as binding  # the inference binding (apply.py: its kept-importable name)

COMPONENTS = ("unet", "transformer", *names.TEXT_ENCODER_COMPONENT.values())


def _roots(target: Any, component: str | None) -> dict[str, nn.Module]:
    """{component: model} of a pipeline, or of a bare model (`component` names a bare CLIP's slot)."""
    if isinstance(target, nn.Module):
        return {component or ("unet" if type(target).__name__ == "UNet2DConditionModel" else "transformer"): target}
    components = getattr(target, "components", None)
    if not isinstance(components, Mapping):
        raise binding.TLoRAApplyError(f"{type(target).__name__} is neither a diffusers pipeline nor a torch module")
    return {c: m for c, m in components.items() if c in COMPONENTS and isinstance(m, nn.Module)}


def live_base(target: Any, component: str | None = None) -> tuple[str, WeightBase]:
    """(family, a `WeightBase` of ComfyUI's generic weights rebuilt from the live diffusers modules)."""
    roots = _roots(target, component)
    family, live = binding.arch_of(roots)
    shapes: dict[str, tuple[int, ...]] = {}
    sources: dict[str, list[tuple[nn.Module, tuple | None]]] = {}
    aliases: dict[str, Located] = {}
    for generic, targets in names.diffusers_rows(live).items():
        found = []
        for path, pieces in targets:
            comp, _, sub = path.partition(".")
            try:
                found.append((roots[comp].get_submodule(binding.resolve_path(roots[comp], sub)), pieces))
            except (KeyError, AttributeError):
                break
        else:
            first = found[0][0].weight
            rows = sum(m.weight.shape[0] for m, _ in found)
            shapes[generic], sources[generic] = (rows,) + tuple(first.shape[1:]), found
            for (path, pieces), _ in zip(targets, found):
                aliases[path] = Located(generic, pieces)

    def read(generic: str) -> Tensor:
        parts = sources[generic]
        if len(parts) == 1 and parts[0][1] is None:
            return parts[0][0].weight.detach()
        out = torch.empty(shapes[generic], dtype=torch.float64)
        for module, pieces in parts:
            weight, at = module.weight.detach().to("cpu", torch.float64), 0
            for offset, count in pieces or ((0, weight.shape[0]),):  # the module's rows are these generic rows
                out[offset:offset + count] = weight[at:at + count]
                at += count
        return out

    return family, WeightBase(shapes, read, aliases, "the diffusers model", "sd15" if family == "sd15" else "sdxl")


def export_lora(target: Any, file: str | os.PathLike | TLoRAFile, path: str | os.PathLike, rank: int | None = None,
                max_error: float | None = None, component: str | None = None, dtype: torch.dtype = torch.float32,
                progress: bool = True) -> Result:
    """Write a TLoRA file as a kohya LoRA for this pipeline or model (a rank, or a relative-error target per module).

    Returns the conversion's `Result` (`summary()`, per-module `modules`: rank, parameters, relative
    Frobenius error, output difference on a sample batch). Nothing is written when the file does not
    fit the model.
    """
    target_spec = LoRATarget(rank, max_error)
    loaded = file if isinstance(file, TLoRAFile) else load(file)
    label = os.path.basename(loaded.path) if loaded.path else "<in memory>"
    family, base = live_base(target, component)
    inp = Input(label, "tlora", 1.0, dict(loaded.adapters), config=dict(loaded.config))
    result = convert([inp], base, target_spec, progress=progress)
    arch = loaded.config.get("arch") if loaded.config.get("arch") in arch_mod.ARCHS else None
    write_result(result, path, [inp], base.label, arch, dtype)
    return result
