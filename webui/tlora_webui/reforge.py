"""reForge: our weight adapter in `ldm_patched.modules.weight_adapter.adapters` (ComfyUI's registry; registry.py)."""
from __future__ import annotations

import types

from . import registry


def install(weight_adapter: types.ModuleType, patcher_cls: type) -> type:
    """Append our adapter to reForge's registry and fit-check its patches in ModelPatcher.add_patches."""
    return registry.install(weight_adapter, patcher_cls)
