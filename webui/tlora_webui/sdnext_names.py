"""A TLoRA file's module names as SD.Next's LoRA loader reads them (one name per layer, no dots before the suffix).

SD.Next names a layer by its pipeline component and diffusers path: `lora_unet_`, `lora_transformer_`,
`lora_llm_adapter_`, `lora_te_` (`lora_te1_` when there is a second text encoder), `lora_te2_`, then
the path with dots as underscores; it converts kohya UNet names from the ldm layout itself. So:

* diffusers-named modules (`unet.`, `transformer.`, `text_encoder.`...) get that name directly;
* ComfyUI-named UNet and CLIP modules (`diffusion_model.`, `text_encoders.<clip>.transformer.`) get
  their kohya names (`tlora.arch.kohya_name`), which SD.Next converts as it converts a kohya LoRA's;
* ComfyUI- and kohya-named transformer modules go through the core's diffusers name table
  (`tlora.diffusers_names`) built from the live transformer's config; a fused module (Flux's or SD3's
  qkv, Flux's linear1) becomes one module per diffusers layer, with the adapter rows that layer takes;
* kohya UNet/CLIP names are SD.Next's to convert; anything else is left as written (and refused later
  as naming no layer).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from . import core

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "llm_adapter")


def _prefix(pipe, component: str) -> str:
    """SD.Next's layer-name prefix for a pipeline component (modules/lora/lora_convert.py)."""
    if component == "text_encoder":
        return "lora_te1_" if hasattr(pipe, "text_encoder_2") else "lora_te_"
    return {"text_encoder_2": "lora_te2_"}.get(component, f"lora_{component}_")


def transformer_arch(transformer) -> core.tarch.Arch | None:
    """The core's table for a live diffusers transformer of any size (None: a family the core does not table).

    The core's one reader of diffusers transformer configs (`tlora.arch_families.from_diffusers`), as the
    diffusers binding's `arch_of` uses it.
    """
    from tlora import arch_families
    try:
        found = arch_families.from_diffusers(type(transformer).__name__, dict(getattr(transformer, "config", {}) or {}))
    except ValueError:  # an SD3 ComfyUI's names do not describe
        return None
    if found is None:
        return None
    family, denoiser = found
    return core.tarch.Arch(family, denoiser, (), "", "", "")


def _rows(pieces) -> torch.Tensor | None:
    if pieces is None:
        return None
    return torch.cat([torch.arange(off, off + count) for off, count in pieces])


def _transformer_targets(pipe, model_type: str, label: str) -> dict[str, list]:
    """{generic or kohya module name: [(diffusers path, row pieces)]} for the pipeline's transformer."""
    from tlora import diffusers_names
    arch = transformer_arch(pipe.transformer)
    if arch is None:
        raise core.TLoRAError(f"{core.METHOD} file {label}: its modules are named the ComfyUI or kohya way, and "
                              f"SD.Next's {model_type} model ({type(pipe.transformer).__name__}) has no name table "
                              f"here; name them by diffusers path (transformer.<module>). Nothing of it was applied.")
    table = diffusers_names.diffusers_rows(arch)
    kohya = {"lora_unet_" + g[len(core.tarch.UNET_PREFIX):].replace(".", "_"): g
             for g in table if g.startswith(core.tarch.UNET_PREFIX)}
    return {**table, **{k: table[g] for k, g in kohya.items()}}


def rename(tensors: Mapping[str, torch.Tensor], pipe, model_type: str, label: str
           ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor | None]]]:
    """(the file's tensors under SD.Next layer names, {layer name: (module in the file, adapter rows or None)})."""
    te_arch = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"
    has_transformer = getattr(pipe, "transformer", None) is not None
    table = None
    targets: dict[str, tuple[str, torch.Tensor | None]] = {}
    mine: dict[str, dict] = {}
    out: dict[str, torch.Tensor] = {}  # other adapters' keys of a mixed file stay SD.Next's to read
    for key, value in tensors.items():
        prefix, mark, suffix = key.rpartition(core.tformat.SUFFIX_MARK)
        if mark and prefix and core.tformat.is_tlora_key(key):
            mine.setdefault(prefix, {})[(prefix, mark[1:] + suffix)] = value
        else:
            out[key] = value
    for module in core.module_prefixes(tensors):
        component, _, rest = module.partition(".")
        if component in COMPONENTS and rest:
            names = [(_prefix(pipe, component) + rest.replace(".", "_"), None)]
        elif has_transformer and (module.startswith(core.tarch.UNET_PREFIX) or module.startswith("lora_unet_")):
            table = table if table is not None else _transformer_targets(pipe, model_type, label)
            found = table.get(module)
            names = [("lora_transformer_" + path.partition(".")[2].replace(".", "_"), _rows(pieces))
                     for path, pieces in found] if found else [(module.replace(".", "_"), None)]
        elif module.startswith((core.tarch.UNET_PREFIX, core.tarch.TE_PREFIX)):
            try:
                names = [(core.tarch.kohya_name(module, te_arch), None)]
            except ValueError:
                names = [(module.replace(".", "_"), None)]  # names no layer: refused once SD.Next has looked
        else:
            names = [(module, None)]  # kohya names: SD.Next's own conversion
        for name, rows in names:
            if name in targets:
                raise core.TLoRAError(f"broken TLoRA file: {module} and {targets[name][0]} {core.OVERLAP} {name} "
                                      f"(give each weight once); nothing of it was applied")
            targets[name] = (module, rows)
            out.update({f"{name}.{suffix}": value for (prefix, suffix), value in mine.get(module, {}).items()})
    return out, targets
