"""TLoRA files in the A1111 family (A1111, Forge, reForge) through each host's own LoRA loader.

Host glue only: the maths, file validation and fit checks are the core's (`tlora/`, reached from
the repository this folder sits in; see core.py). `install()` detects the running webui.
"""
from __future__ import annotations

import logging

log = logging.getLogger("TLoRA-webui")


def install() -> str:
    """Register TLoRA with the running webui's LoRA mechanism; returns the host's name."""
    try:  # reForge: ComfyUI's adapter registry, copied into ldm_patched
        import ldm_patched.modules.weight_adapter as weight_adapter
        import ldm_patched.modules.model_patcher as model_patcher
    except ImportError:
        weight_adapter = None
    if weight_adapter is not None:
        from . import reforge
        reforge.install(weight_adapter, model_patcher.ModelPatcher)
        return "reForge"
    try:  # Forge: patch-type calculators in backend/patcher/lora.py
        import backend.patcher.lora as forge_lora
        import backend.patcher.base as forge_base
    except ImportError:
        forge_lora = None
    if forge_lora is not None:
        from . import forge
        forge.install(forge_lora, forge_base.ModelPatcher)
        return "Forge"
    import sys  # A1111: the built-in Lora extension's module types (imported by its own script first)
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "module_types"):
        raise RuntimeError("TLoRA: no LoRA mechanism found (is the built-in Lora extension enabled?)")
    import network
    from modules import sd_models
    from . import a1111
    a1111.install(networks, network, sd_models)
    return "A1111"
