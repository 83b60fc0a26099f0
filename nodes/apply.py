"""Matching a TLoRA file to a ComfyUI model/CLIP and patching it (our loaders' engine).

Prefixes are resolved with ComfyUI's own key maps (comfy.lora.model_lora_keys_unet/clip),
so every prefix form ComfyUI accepts for LoRAs (generic `diffusion_model.<path>`,
`text_encoders.<key>`, kohya `lora_unet_...`/`lora_te_...`, diffusers `transformer.<path>`
for Flux/SD3/Qwen-Image, whose q/k/v name slices of fused weights) works for TLoRA too.
A file that does not fit is refused whole: it is never half-applied.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping

import comfy.lora
import comfy.utils

from ..tlora import arch as arch_mod
from ..tlora import diffusers_names
from ..tlora.adapter import ModuleAdapter
from ..tlora.claim import MISSING, OVERLAP, refusal
from ..tlora.errors import TLoRAError, TLoRAShapeError
from ..tlora.format import load_file, read_metadata
from . import activation
from .comfy_adapter import TLoRAWeightAdapter

TEXT_ENCODER_PREFIXES = ("text_encoders.", "lora_te", "text_encoder")

_cache_lock = threading.Lock()
_cache: dict[str, tuple[tuple[int, int, int], dict[str, ModuleAdapter], dict[str, str]]] = {}


class TLoRAApplyError(TLoRAError):
    """A TLoRA file that cannot be applied: unreadable, invalid, or not fitting the model."""


def file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """(mtime, ctime, size, inode) of a file: changes whenever its content may have (None if unreadable).

    inode: atomic replaces; ctime: an in-place rewrite that restores mtime (utime cannot set
    ctime). The loaders report it to ComfyUI so a changed file re-runs them (the host never
    re-runs a node whose inputs did not change), and key their own cache with it.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)


def load_cached(path: str, label: str | None = None) -> tuple[dict[str, ModuleAdapter], dict[str, str]]:
    """load_file + read_metadata, cached by the file's stamp so re-queues are instant.

    Errors name the file by `label` (its name in the loras list) instead of the full path.
    """
    stamp = file_stamp(path)
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
    try:
        adapters, metadata = load_file(path), read_metadata(path)
    except TLoRAError as err:
        message = str(err).removeprefix(f"{path}: ")
        raise TLoRAApplyError(f"TLoRA {label or os.path.basename(path)!r}: {message}") from None
    with _cache_lock:
        _cache[path] = (stamp, adapters, metadata)
    return adapters, metadata


def model_key_map(model) -> dict[str, str]:
    """ComfyUI's prefix -> weight-key map for a MODEL (ModelPatcher), plus the kohya forms of its bare
    dotted names (musubi-tuner's Z-Image names; tlora.diffusers_names.kohya_aliases) and the diffusers
    names of whole weights where the host's map has none (Wan's `transformer.blocks.N.attn1.to_q`)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    config = getattr(model.model, "model_config", None)
    archs = arch_mod.archs_for_host_model(type(config).__name__) if config is not None else ()
    weights = set(key_map.values()) if archs else set()
    diffusers = diffusers_names.whole_weight_aliases(archs, {w for w in weights if isinstance(w, str)})
    return {**diffusers, **diffusers_names.kohya_aliases(key_map), **key_map}


def clip_key_map(clip) -> dict[str, str]:
    """ComfyUI's prefix -> weight-key map for a CLIP."""
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


def _weight_shape(root, key):
    """Shape of the weight a key-map entry names: a weight key, or (key, (dim, start, length)) for a slice."""
    weight_key, span = (key, None) if isinstance(key, str) else (key[0], key[1])
    try:
        shape = list(comfy.utils.get_attr(root, weight_key).shape)
    except AttributeError:
        return None
    if span is not None:  # diffusers q/k/v of a fused weight: ComfyUI patches weight.narrow(*span)
        dim, start, length = span
        if start + length > shape[dim]:
            return None
        shape[dim] = length
    return tuple(shape)


def _rows(key) -> tuple[str, int, int | None]:
    """(weight key, first row, end row or None for all) of a key-map entry."""
    if isinstance(key, str):
        return key, 0, None
    weight_key, (dim, start, length) = key[0], key[1]
    return (weight_key, start, start + length) if dim == 0 else (weight_key, 0, None)


def overlaps(keys: Mapping[str, object]) -> list[tuple[str, str]]:
    """Pairs of file modules that patch the same rows of one weight (whole and slice, or one weight twice).

    TLoRA patches do not commute (`W0 T` of a patched weight is not the sum of two patches), so
    such a file would give different images depending on patch order.
    """
    by_weight: dict[str, list[tuple[str, int, int | None]]] = {}
    for prefix, key in keys.items():
        weight_key, start, end = _rows(key)
        by_weight.setdefault(weight_key, []).append((prefix, start, end))
    pairs = []
    for spans in by_weight.values():
        for i, (a, a0, a1) in enumerate(spans):
            for b, b0, b1 in spans[i + 1:]:
                if (a1 is None or b0 < a1) and (b1 is None or a0 < b1):
                    pairs.append((a, b))
    return pairs


def match(adapters: Mapping[str, ModuleAdapter], key_map: Mapping[str, object], root,
          ) -> tuple[dict[object, TLoRAWeightAdapter], dict[str, str]]:
    """Patches for every prefix found in key_map, and {prefix: problem} for shape misfits.

    A key-map entry is a weight key or, for diffusers names of fused weights (Flux, SD3), a
    (weight key, (dim, start, length)) slice; the patch is keyed the same way, which is how
    ComfyUI's ModelPatcher takes offset patches.
    """
    patches, problems, found = {}, {}, {}
    for prefix, adapter in adapters.items():
        key = key_map.get(prefix)
        if key is None:
            continue
        shape = _weight_shape(root, key)
        if shape is None:
            problems[prefix] = f"weight {key if isinstance(key, str) else key[0]} not found"
            continue
        try:
            adapter.check_fits(shape)
        except TLoRAShapeError as err:
            problems[prefix] = str(err).split(": ", 1)[-1]
            continue
        patches[key] = TLoRAWeightAdapter.from_module_adapter(adapter)
        found[prefix] = key
    for a, b in overlaps(found):
        problems[b] = f"{OVERLAP} {_rows(found[b])[0]} as {a}"
    return patches, problems


def plan_patches(adapters: Mapping[str, ModuleAdapter], metadata: Mapping[str, str], label: str,
                 model=None, clip=None) -> tuple[dict, dict]:
    """(model patches, clip patches) for a file, or TLoRAApplyError naming what did not fit."""
    unet_map = model_key_map(model) if model is not None else {}
    te_map = clip_key_map(clip) if clip is not None else {}
    model_patches, model_problems = match(adapters, unet_map, model.model if model is not None else None)
    clip_patches, clip_problems = ({}, {}) if clip is None else \
        match(adapters, te_map, clip.cond_stage_model)
    problems = {**model_problems, **clip_problems}
    for prefix in adapters:
        if prefix in unet_map or prefix in te_map:
            continue
        if clip is None and prefix.startswith(TEXT_ENCODER_PREFIXES):
            continue  # model-only loading skips text-encoder modules, as LoraLoaderModelOnly does
        problems[prefix] = MISSING
    if problems:
        target = "model" if clip is None else "model and CLIP"
        raise TLoRAApplyError(refusal(label, len(adapters), problems, target, metadata.get("modelspec.architecture")))
    if not model_patches and not clip_patches:
        raise TLoRAApplyError(f"TLoRA {label!r} has no module for this model")
    return model_patches, clip_patches


def block_of(weight_key: str) -> str:
    """`input`, `middle`, `output` or `other` for a diffusion-model weight key."""
    path = weight_key.removeprefix("diffusion_model.")
    for block, starts in (("input", ("input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks.")),
                          ("middle", ("middle_block.", "mid_block.")),
                          ("output", ("output_blocks.", "up_blocks.", "single_blocks."))):
        if path.startswith(starts):
            return block
    return "other"


def check_strengths(**strengths: float) -> None:
    """Refuse NaN and infinite strengths (JSON NaN passes the host's min/max check): an all-black image otherwise."""
    for name, value in strengths.items():
        if value is not None and not math.isfinite(float(value)):
            raise TLoRAError(f"{name} is {value}: strengths must be finite numbers")


def parse_block_overrides(text: str) -> list[tuple[str, float]]:
    """`input_blocks.4=0.5, output_blocks.2=0` -> [(prefix, multiplier)], longest prefix first."""
    overrides = []
    for part in filter(None, (p.strip() for p in (text or "").replace("\n", ",").split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().removeprefix("diffusion_model.")
        if not sep or not name:
            raise TLoRAError(f"block weight {part!r} must look like input_blocks.4=0.5")
        try:
            number = float(value)
        except ValueError:
            raise TLoRAError(f"block weight {part!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(number):
            raise TLoRAError(f"block weight {part!r}: {value.strip()!r} is not a finite number")
        overrides.append((name, number))
    return sorted(overrides, key=lambda o: -len(o[0]))


def check_overrides_exist(overrides: list[tuple[str, float]], weight_keys) -> None:
    """Every override must name a block of the model (a typo would otherwise be ignored silently)."""
    paths = [k.removeprefix("diffusion_model.") for k in weight_keys]
    for prefix, _ in overrides:
        base = prefix.rstrip(".")
        if not any(p == base or p.startswith(base + ".") for p in paths):
            raise TLoRAError(f"block weight {prefix!r} names no block of this model "
                             f"(e.g. input_blocks.4, middle_block.1, output_blocks.2)")


def _in_block(key: str, prefix: str) -> bool:
    path = key.removeprefix("diffusion_model.")
    return path == prefix or path.startswith(prefix.rstrip(".") + ".")


def block_multiplier(weights: Mapping[str, float], overrides: list[tuple[str, float]]) -> Callable[[str], float]:
    """Multiplier of each weight key from block multipliers and prefix overrides (kept as `.overrides`)."""
    def multiplier(key: str) -> float:
        for prefix, value in overrides:
            if _in_block(key, prefix):
                return value
        return weights.get(block_of(key), 1.0)
    multiplier.overrides = list(overrides)  # type: ignore[attr-defined]
    return multiplier


def check_overrides_used(multiplier: Callable[[str], float] | None, patches: Mapping, label: str) -> None:
    """Every override must reach a weight the file patches: one naming a block without adapter modules would
    change nothing, silently."""
    keys = [k if isinstance(k, str) else k[0] for k in patches]
    for prefix, _ in getattr(multiplier, "overrides", ()):
        if not any(_in_block(k, prefix) for k in keys):
            blocks = sorted({".".join(k.removeprefix("diffusion_model.").split(".")[:2]) for k in keys})
            raise TLoRAApplyError(f"adapter {label!r}: block weight {prefix!r} names a block it has no module in "
                                  f"(its modules are in {', '.join(blocks[:8])}{', ...' if len(blocks) > 8 else ''}); "
                                  f"nothing was applied")


def add_weighted(patcher, patches: Mapping, strength: float, multiplier: Callable[[str], float] | None = None):
    """Clone `patcher` and add patches at `strength` (times a per-key multiplier): merged by the host."""
    clone = patcher.clone()
    if multiplier is None:
        clone.add_patches(dict(patches), strength)
        return clone
    groups: dict[float, dict] = {}
    for key, patch in patches.items():
        groups.setdefault(multiplier(key if isinstance(key, str) else key[0]), {})[key] = patch
    for mult, group in groups.items():
        if mult != 0:
            clone.add_patches(group, strength * mult)
    return clone


def check_mode(mode: str) -> str:
    """The loader's mode, or a one-line error."""
    if mode not in activation.MODES:
        raise TLoRAError(f"mode {mode!r}: expected one of {', '.join(activation.MODES)}")
    return mode


def apply_model_patches(patcher, patches: Mapping, strength: float, multiplier: Callable[[str], float] | None,
                        mode: str, label: str):
    """A clone with `patches` applied: activation-side where `mode` says so (see activation.py), merged elsewhere.

    TLoRA patches always can run activation-side; a LoRA patch can when it is a plain B A (no
    LoCon mid, no DoRA); others are merged by the host, unless their layer already runs adapters
    activation-side (then the file is refused: the chain's order would be lost).
    """
    check_overrides_used(multiplier, patches, label)
    merged, beside = {}, {}
    for key, patch in patches.items():
        if not activation.wants_activation(patcher, key, mode):
            merged[key] = patch
            continue
        weight_key = key if isinstance(key, str) else key[0]
        adapter = patch.module_adapter() if isinstance(patch, TLoRAWeightAdapter) else \
            activation.lora_as_adapter(patch, weight_key)
        if adapter is not None:
            beside[key] = adapter
        elif activation.carries_chain(patcher, key):
            raise TLoRAApplyError(f"adapter {label!r}: {weight_key} is a {type(patch).__name__} patch, which cannot "
                                  f"run activation-side, and its layer already runs adapters activation-side (they "
                                  f"would no longer apply in the chain's order); load it before them. Nothing was "
                                  f"applied.")
        else:  # a norm's diff, LoHa, LoKr, DoRA...: merged by the host (into quantized weights its own way)
            merged[key] = patch
    out = add_weighted(patcher, merged, strength, multiplier) if merged else patcher
    return activation.add(out, beside, strength, multiplier) if beside else out


def apply_file(path: str, label: str, model=None, clip=None, strength_model: float = 1.0,
               strength_clip: float = 1.0, multiplier: Callable[[str], float] | None = None, mode: str = "auto"):
    """(model, clip) with the TLoRA file applied; inputs are not modified. The CLIP is always merged."""
    check_mode(mode)
    adapters, metadata = load_cached(path, label)
    use_model = model if (model is not None and strength_model != 0) else None
    use_clip = clip if (clip is not None and strength_clip != 0) else None
    # Match against everything given (so a wrong file is refused even at strength 0).
    model_patches, clip_patches = plan_patches(adapters, metadata, label, model, clip)
    new_model = model if use_model is None else \
        apply_model_patches(model, model_patches, strength_model, multiplier, mode, label)
    new_clip = add_weighted(clip, clip_patches, strength_clip) if use_clip is not None else clip
    return new_model, new_clip


def is_tlora_file(path: str) -> bool:
    """True if a safetensors file carries TLoRA keys (reads only the header)."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(path, framework="pt") as handle:
            return any(".tlora_" in k for k in handle.keys())
    except Exception:
        # A broken .safetensors goes to our loader for a clear error; other formats
        # (legacy .pt LoRAs) go to ComfyUI's own weights-only loader.
        return path.lower().endswith(".safetensors")


def apply_other_file(path: str, label: str, model, strength: float, multiplier: Callable[[str], float],
                     mode: str = "merged"):
    """Any adapter ComfyUI itself understands (LoRA, LoHa, LoKr, ...), block-weighted; plain LoRAs activation-side
    where `mode` says so (`apply_model_patches`)."""
    check_mode(mode)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    patches = comfy.lora.load_lora(lora, model_key_map(model))
    if not patches:
        raise TLoRAApplyError(f"adapter {label!r} has no module ComfyUI can apply to this model")
    return apply_model_patches(model, patches, strength, multiplier, mode, label)
