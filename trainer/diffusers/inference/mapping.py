"""Where a TLoRA file's modules go in a diffusers model: the live model's own tables, targets, the plan.

Names are mapped by `tlora.diffusers_names` on tables built from the live model's config
(`arch_of`), so tiny and non-standard models map as the released ones do. A file that does not
fit is refused whole, worded by the core (`tlora.claim.refusal`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ....tlora import arch as arch_mod
from ....tlora import arch_families as families
from ....tlora import diffusers_names as names
from ....tlora.adapter import ModuleAdapter
from ....tlora.claim import MISSING, OVERLAP, UNFIT, refusal
from ....tlora.errors import TLoRAError, TLoRAShapeError
from ....tlora.format import TLoRAFile, is_tlora_key, load as load_file, split_key
from ....tlora.runtime import geometry_of
from .layers import WRAPPERS, _innermost, _is_peft_layer, resolve_path

TRANSFORMER_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "QwenImageTransformer2DModel",
                       "Flux2Transformer2DModel", "ChromaTransformer2DModel", "ZImageTransformer2DModel",
                       "WanTransformer3DModel", "ErnieImageTransformer2DModel")
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


class TLoRAApplyError(TLoRAError):
    """A TLoRA file that cannot be applied to this diffusers model (nothing was applied)."""


# ----- the model's own tables ----------------------------------------------------------------
def _cfg(model: nn.Module, key: str, default: Any = None) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return default
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def unet_config(unet: nn.Module) -> arch_mod.UNetConfig:
    """The ComfyUI-style UNetConfig of a diffusers UNet2DConditionModel (what fixes the generic names)."""
    chans = list(_cfg(unet, "block_out_channels"))
    levels = len(chans)
    per = _cfg(unet, "layers_per_block")
    per = [per] * levels if isinstance(per, int) else list(per)
    depth = _cfg(unet, "transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = _cfg(unet, "down_block_types")
    up = _cfg(unet, "up_block_types")
    rdepth = _cfg(unet, "reverse_transformer_layers_per_block") or list(reversed(depth))
    depth_in: list[int] = []
    for level in range(levels):
        d = depth[level] if "CrossAttn" in down[level] else 0
        depth_in += [d if isinstance(d, int) else d[0]] * per[level]
    depth_out: list[int] = []  # ComfyUI consumes it from the END: deepest up block last
    for k, level in enumerate(reversed(range(levels))):
        d = rdepth[k] if "CrossAttn" in up[k] else 0
        depth_out = [d if isinstance(d, int) else d[0]] * (per[level] + 1) + depth_out
    mid = _cfg(unet, "transformer_layers_per_block", 1)
    mid = mid if isinstance(mid, int) else mid[-1]
    mid = mid if isinstance(mid, int) else mid[0]
    context = _cfg(unet, "cross_attention_dim")
    context = context if isinstance(context, int) else context[0]
    return arch_mod.UNetConfig(chans[0], tuple(c // chans[0] for c in chans), tuple(per), tuple(depth_in), int(mid),
                               tuple(depth_out), int(context), bool(_cfg(unet, "use_linear_projection", False)))


def _clip_config(name: str, model: nn.Module) -> arch_mod.TextEncoderConfig:
    return arch_mod.TextEncoderConfig(name, int(_cfg(model, "num_hidden_layers")), int(_cfg(model, "hidden_size")),
                                      int(_cfg(model, "intermediate_size")), "")


def _denoiser(roots: Mapping[str, nn.Module]) -> tuple[str, nn.Module] | None:
    for comp in ("unet", "transformer"):
        if comp in roots:
            return comp, roots[comp]
    return None


def arch_of(roots: Mapping[str, nn.Module]) -> tuple[str, arch_mod.Arch]:
    """(family, Arch built from the live models' configs) for the name mapping."""
    found = _denoiser(roots)
    cls = type(found[1]).__name__ if found else ""
    if found and found[0] == "unet":
        family = "sdxl" if _cfg(found[1], "addition_embed_type") == "text_time" else "sd15"
        denoiser: Any = unet_config(found[1])
    elif found:
        try:  # Flux.1, SD3, Qwen-Image, Flux.2, Chroma, Z-Image, Wan, ERNIE-Image: the live transformer's table
            table = families.from_diffusers(cls, dict(found[1].config))
        except ValueError as err:
            raise TLoRAApplyError(str(err)) from None
        if table is None:
            raise TLoRAApplyError(f"unsupported diffusers {found[0]} {cls} (supported: UNet2DConditionModel, "
                                  f"{', '.join(TRANSFORMER_CLASSES)})")
        family, denoiser = table
    else:
        family, denoiser = "clip", arch_mod.QwenImageConfig(layers=0)
    tes = tuple(_clip_config(name, roots[comp]) for name, comp in names.TEXT_ENCODER_COMPONENT.items()
                if comp in roots and type(roots[comp]).__name__ in CLIP_CLASSES)
    return family, arch_mod.Arch(family, denoiser, tes, "", "", "")


def _kohya_names(arch: arch_mod.Arch, family: str, generics: Iterable[str]) -> dict[str, str]:
    """{kohya name: generic} (ComfyUI's prefixes for this family's CLIP encoders)."""
    te_prefix = {te.name: te.kohya_prefix for te in arch_mod.ARCHS.get(family, arch_mod.ARCHS["sdxl"]).text_encoders}
    out = {}
    for generic in generics:
        if generic.startswith(arch_mod.UNET_PREFIX):
            out["lora_unet_" + generic[len(arch_mod.UNET_PREFIX):].replace(".", "_")] = generic
        else:
            name, _, rest = generic[len(arch_mod.TE_PREFIX):].partition(".transformer.")
            if name in te_prefix:
                out[te_prefix[name] + rest.replace(".", "_")] = generic
    return out


# ----- targets -------------------------------------------------------------------------------
def _roots(target: Any, component: str | None = None) -> dict[str, nn.Module]:
    """{component: model} of a pipeline or of a bare model."""
    if isinstance(target, nn.Module):
        cls = type(target).__name__
        if component is None:
            if cls == "UNet2DConditionModel":
                component = "unet"
            elif cls in TRANSFORMER_CLASSES:
                component = "transformer"
            elif cls in CLIP_CLASSES:
                component = "text_encoder"
            else:
                raise TLoRAApplyError(f"cannot tell which pipeline component a bare {cls} is: pass component=")
        return {component: target}
    components = getattr(target, "components", None)
    if not isinstance(components, Mapping):
        raise TLoRAApplyError(f"{type(target).__name__} is neither a diffusers pipeline nor a torch module")
    out = {}
    for comp in ("unet", "transformer", *names.TEXT_ENCODER_COMPONENT.values()):
        model = components.get(comp)
        if isinstance(model, nn.Module) and (comp in ("unet", "transformer") or type(model).__name__ in CLIP_CLASSES):
            out[comp] = model
    return out


def _label(file: Any) -> str:
    if isinstance(file, TLoRAFile):
        return os.path.basename(file.path) if file.path else "<in memory>"
    if isinstance(file, Mapping):
        return "<in memory>"
    return os.path.basename(os.fspath(file))


def _read(file: Any, label: str) -> tuple[dict[str, ModuleAdapter], dict[str, Any]]:
    if isinstance(file, TLoRAFile):
        return dict(file.adapters), dict(file.config)
    if isinstance(file, Mapping):
        return _adapters_of(file, label), {}
    try:
        loaded = load_file(file)
    except TLoRAError as err:
        raise TLoRAApplyError(f"TLoRA {label!r}: {str(err).removeprefix(f'{os.fspath(file)}: ')}") from None
    return loaded.adapters, loaded.config


def _adapters_of(mapping: Mapping[Any, Any], label: str) -> dict[str, ModuleAdapter]:
    """{module: ModuleAdapter} from an in-memory file: adapters (or trained modules), or a state dict of tensors."""
    if mapping and all(isinstance(v, Tensor) for v in mapping.values()):
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in mapping.items():
            if not isinstance(key, str) or not is_tlora_key(key):
                raise TLoRAApplyError(f"TLoRA {label!r}: key {key!r} is not a TLoRA tensor name "
                                      f"('<module>.tlora_t.0', '<module>.tlora_scale', ...). Nothing was applied.")
            prefix, suffix = split_key(key)
            grouped.setdefault(prefix, {})[suffix] = value
        try:
            return {prefix: ModuleAdapter(tensors, name=prefix) for prefix, tensors in grouped.items()}
        except TLoRAError as err:
            raise TLoRAApplyError(f"TLoRA {label!r}: {err}. Nothing was applied.") from None
    out = {}
    for key, value in mapping.items():
        if isinstance(value, ModuleAdapter):
            out[key] = value
        elif hasattr(value, "to_adapter"):
            out[key] = value.to_adapter()
        elif isinstance(getattr(value, "tensors", None), Mapping):  # an adapter of another import of the core
            try:
                out[key] = ModuleAdapter(dict(value.tensors), name=str(key))
            except TLoRAError as err:
                raise TLoRAApplyError(f"TLoRA {label!r}: {err}. Nothing was applied.") from None
        else:
            raise TLoRAApplyError(f"TLoRA {label!r}: {key!r} is a {type(value).__name__}; an in-memory file maps "
                                  f"module names to ModuleAdapters, or tensor names to tensors. Nothing was applied.")
    return out


def _inside_a_wrapper(root: nn.Module, path: str) -> str | None:
    """The path of a TLoRA or PEFT layer that `path` reaches into (its `.base`, `.base_layer`...), if any.

    A file naming a module inside another adapter's layer would wrap that layer's own base: its
    remove() could no longer find it, and the model's adapter records would break.
    """
    parts = path.split(".")
    for end in range(1, len(parts)):
        parent = ".".join(parts[:end])
        module = root.get_submodule(parent)
        if isinstance(module, WRAPPERS) or _is_peft_layer(module):
            return parent
    return None


def _rows_index(pieces: tuple[names.Piece, ...] | None) -> Tensor | None:
    if pieces is None:
        return None
    return torch.cat([torch.arange(off, off + count) for off, count in pieces])


@dataclass
class _Planned:
    root: str
    path: str
    prefix: str
    adapter: ModuleAdapter
    rows: Tensor | None


def _plan(adapters: Mapping[str, ModuleAdapter], roots: Mapping[str, nn.Module], label: str,
          config: Mapping[str, Any]) -> tuple[list[_Planned], list[str]]:
    """Where each file module goes ([_Planned]) and the modules skipped (text encoders on a bare denoiser)."""
    family, arch = arch_of(roots)
    table = names.diffusers_rows(arch)  # {generic: [(diffusers path, pieces)]} of the live model
    kohya = _kohya_names(arch, family, table)
    plans: list[_Planned] = []
    problems: dict[str, str] = {}
    skipped: list[str] = []
    taken: dict[tuple[str, str], str] = {}
    denoiser = _denoiser(roots)
    for prefix, adapter in adapters.items():
        comp = prefix.partition(".")[0]
        generic = kohya.get(prefix, prefix)
        if comp in names.DENOISER_COMPONENT.values() or comp in names.TEXT_ENCODER_COMPONENT.values():
            targets = [(prefix, None)]  # a diffusers path: one whole module
        elif generic in table:
            targets = table[generic]
        else:
            targets = None
        is_te = generic.startswith((arch_mod.TE_PREFIX, "lora_te")) or comp.startswith("text_encoder")
        if targets is None or targets[0][0].partition(".")[0] not in roots:
            if (is_te and not any(c.startswith("text_encoder") for c in roots)) or (not is_te and denoiser is None):
                skipped.append(prefix)  # model-only loading skips text-encoder modules, as ComfyUI's loaders do
                continue
            problems[prefix] = MISSING
            continue
        total = max((off + count for _, pieces in targets if pieces for off, count in pieces), default=None)
        for path, pieces in targets:
            root_name, _, sub = path.partition(".")
            sub = resolve_path(roots[root_name], sub)
            try:
                module = roots[root_name].get_submodule(sub)
            except AttributeError:
                problems[prefix] = f"{MISSING} ({path})"
                break
            inside = _inside_a_wrapper(roots[root_name], sub)
            if inside is not None:
                problems[prefix] = f"{UNFIT}: {path} is inside the adapter layer {root_name}.{inside}; name the layer itself"
                break
            plain = _innermost(module)
            if not isinstance(plain, (nn.Linear, nn.Conv2d)) or isinstance(plain, nn.ConvTranspose2d):
                problems[prefix] = f"{UNFIT}: {path} is a {type(plain).__name__}, not a Linear or Conv2d"
                break
            shape = geometry_of(plain).weight_shape  # the logical shape (GGUF layers store packed blocks)
            if pieces is not None:
                if sum(c for _, c in pieces) != shape[0]:
                    problems[prefix] = f"{path} has {shape[0]} rows, the mapping gives it {sum(c for _, c in pieces)}"
                    break
                shape = (total, *shape[1:])
            try:
                adapter.check_fits(shape)
            except TLoRAShapeError as err:
                problems[prefix] = str(err).split(": ", 1)[-1]
                break
            if (root_name, sub) in taken:
                problems[prefix] = f"{OVERLAP} {path} as {taken[(root_name, sub)]}"
                break
            taken[(root_name, sub)] = prefix
            plans.append(_Planned(root_name, sub, prefix, adapter, _rows_index(pieces)))
    if problems:
        made_for = config.get("arch")
        raise TLoRAApplyError(refusal(label, len(adapters), problems, f"{family} model",
                                      made_for if isinstance(made_for, str) else None))
    if not plans:
        raise TLoRAApplyError(f"TLoRA {label!r} has no module for this model (skipped: {len(skipped)})")
    return plans, skipped
