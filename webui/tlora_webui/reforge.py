"""reForge: a weight adapter class in ldm_patched.modules.weight_adapter.adapters (ComfyUI's registry)."""
from __future__ import annotations

import torch

from . import core
from .patcher_guard import guard_add_patches


def adapter_class(base: type) -> type:
    """The TLoRA weight adapter for reForge's registry, subclassing its WeightAdapterBase."""

    class TLoRAWebuiAdapter(base):
        """One weight's TLoRA patch: W += function(sigma (W0 T + s Delta - W0)), maths from the core."""

        name = core.PATCH_TYPE

        def __init__(self, loaded_keys: set, adapter: core.ModuleAdapter):
            self.loaded_keys = loaded_keys
            self.adapter = adapter
            self.weights = list(adapter.tensors.values())

        @classmethod
        def load(cls, x: str, lora: dict, alpha=None, dora_scale=None, loaded_keys: set | None = None):
            """Claim the keys `x.tlora_*` (None when absent); a broken module raises with our message."""
            found = core.claim(x, lora)
            if found is None:
                return None
            adapter, keys = found
            if loaded_keys is not None:
                loaded_keys.update(keys)
            return cls(keys, adapter)

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            """weight += function(strength * (W T + s Delta - W)); strength 0 leaves it untouched."""
            if strength == 0:
                return weight
            diff = self.adapter.weight_diff(weight, strength)  # fit checked when the patch was added
            weight += function(diff.to(weight.dtype))
            return weight

    return TLoRAWebuiAdapter


def install(weight_adapter, patcher_cls: type) -> type:  # weight_adapter: the host's module
    """Append our adapter to reForge's registry and fit-check its patches in ModelPatcher.add_patches."""
    for cls in weight_adapter.adapters:
        if getattr(cls, "name", None) == core.PATCH_TYPE:
            return cls
    cls = adapter_class(weight_adapter.WeightAdapterBase)
    weight_adapter.adapters.append(cls)
    guard_add_patches(patcher_cls, lambda v: v.adapter if isinstance(v, cls) else None)
    return cls
