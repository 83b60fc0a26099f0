"""ComfyUI-style weight-adapter registries (reForge's `ldm_patched`, Forge Neo's `modules_forge.packages.comfy`).

Their `load_lora` offers every key-map entry to every class in `weight_adapter.adapters` and does not
stop at the first that answers: a later claimant's patch replaces an earlier one's without a word.
Ours therefore asks the registry's other classes about each module it claims and refuses the file
when one of them claims it too, whichever sits first in the list: it neither overrides another
claimant nor is overridden by one (known adapter kinds are already refused by `tlora.claim.claim`).
"""
from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch

from . import core
from .patcher_guard import guard_add_patches


def _also_claimed_by(cls: type, registry: list, x: str, lora: dict, alpha, dora_scale) -> str | None:
    """The name of another registered adapter class that claims module `x` of this file, if any."""
    for other in list(registry):
        if other is cls or getattr(other, "name", None) == core.PATCH_TYPE:
            continue
        try:
            found = other.load(x, lora, alpha, dora_scale, set())  # a scratch set: the host's stays untouched
        except Exception:  # noqa: BLE001 - a class that cannot read our keys does not claim them
            found = None
        if found is not None:
            return getattr(other, "__name__", type(other).__name__)
    return None


def adapter_class(base: type, registry: list) -> type:
    """The TLoRA weight adapter for a registry of `base` (the host's WeightAdapterBase) subclasses."""

    class TLoRAWebuiAdapter(base):
        """One weight's TLoRA patch: W += function(sigma (W0 T + s Delta - W0)), maths from the core."""

        name = core.PATCH_TYPE

        def __init__(self, loaded_keys: set, adapter: core.ModuleAdapter | None, slices: tuple = ()):
            self.loaded_keys = loaded_keys
            self.adapter = adapter
            self.slices = slices  # ((dim, start, length, ModuleAdapter), ...): several row slices of one weight
            self.weights = [t for a in ([adapter] if adapter else [s[3] for s in slices]) for t in a.tensors.values()]

        @classmethod
        def load(cls, x: str, lora: dict, alpha=None, dora_scale=None, loaded_keys: set | None = None):
            """Claim the keys `x.tlora_*` (None when absent); a broken or doubly claimed module raises our line."""
            found = core.claim(x, lora)
            if found is None:
                return None
            other = _also_claimed_by(cls, registry, x, lora, alpha, dora_scale)
            if other is not None:
                raise core.TLoRAError(f"broken TLoRA file: module {x} is also claimed by the {other} adapter "
                                      f"(this webui keeps one patch per weight); nothing of it was applied")
            adapter, keys = found
            if loaded_keys is not None:
                loaded_keys.update(keys)
            return cls(keys, adapter)

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            """weight += function(strength * (W T + s Delta - W)) in place (a row slice's view included)."""
            if strength == 0:
                return weight
            for view, adapter in ([(weight, self.adapter)] if self.adapter is not None else
                                  [(weight.narrow(d, start, n), a) for d, start, n, a in self.slices]):
                diff = adapter.weight_diff(view, strength)  # fit checked when the patch was added
                view += function(diff.to(weight.dtype))
            return weight

    return TLoRAWebuiAdapter


def regrouper(cls: type) -> Callable:
    """The add_patches regrouping for registry hosts: our patches of several row slices of one weight become one.

    Forge Neo's patcher keeps one patch per weight and file (a second slice of a fused q/k/v replaced
    the first without a word): it is handed one patch that applies every slice. Slices that overlap,
    or another adapter's patch on a weight we patch, are refused: such patches do not commute.
    """

    def regroup(patches: Mapping, ours: Mapping) -> tuple[dict, dict]:
        by_weight: dict[str, list] = {}
        for key in ours:
            by_weight.setdefault(key if isinstance(key, str) else key[0], []).append(key)
        out, replaced = dict(patches), {}
        for name, keys in by_weight.items():
            others = [k for k in patches if k not in ours and (k if isinstance(k, str) else k[0]) == name]
            if others:
                raise core.TLoRAError(f"broken TLoRA file: {ours[keys[0]].name} and another adapter's patch "
                                      f"({type(patches[others[0]]).__name__}) both change {name}: give each "
                                      f"weight one adapter; nothing of it was applied")
            if len(keys) == 1 or any(isinstance(k, str) for k in keys):
                if len(keys) > 1:
                    raise core.TLoRAError(f"broken TLoRA file: {ours[keys[0]].name} and {ours[keys[1]].name} "
                                          f"{core.OVERLAP} {name}; nothing of it was applied")
                continue
            spans = sorted((k[1][0], k[1][1], k[1][2], ours[k]) for k in keys)
            for (d0, s0, n0, a0), (d1, s1, n1, a1) in zip(spans, spans[1:]):
                if d0 != d1 or s1 < s0 + n0:
                    raise core.TLoRAError(f"broken TLoRA file: {a0.name} and {a1.name} {core.OVERLAP} {name} "
                                          f"(TLoRA patches of one weight do not commute); nothing of it was applied")
            for k in keys:
                out.pop(k)
                replaced[k] = name
            out[name] = cls(set(), None, tuple(spans))
        return out, replaced

    return regroup


def install(weight_adapter: types.ModuleType, patcher_cls: type) -> type:
    """Append our adapter to the host's registry (once) and fit-check its patches in patcher_cls.add_patches."""
    for cls in weight_adapter.adapters:
        if getattr(cls, "name", None) == core.PATCH_TYPE:
            return cls
    cls = adapter_class(weight_adapter.WeightAdapterBase, weight_adapter.adapters)
    weight_adapter.adapters.append(cls)
    guard_add_patches(patcher_cls, lambda v: v.adapter if getattr(v, "name", None) == core.PATCH_TYPE
                      and isinstance(getattr(v, "adapter", None), core.ModuleAdapter) else None, regrouper(cls))
    return cls
