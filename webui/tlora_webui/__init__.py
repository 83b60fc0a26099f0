"""TLoRA files in the A1111 family (A1111, Forge, reForge, Forge Neo, ersatzForge, SD.Next) through each host's own LoRA loader.

Host glue only: the maths, file validation and fit checks are the core's (`tlora/`, reached from
the repository this folder sits in; see core.py). `install()` finds the running webui by the LoRA
mechanism it has, registers with it and names it; `startup_line()` is what the start-up script prints.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import types
from collections.abc import Callable

log = logging.getLogger("TLoRA-webui")
METHOD = "transformed LoRA (TLoRA, arXiv 2501.08727)"  # core.METHOD, spelled here so a failed core import can say it


def _module(name: str) -> types.ModuleType | None:
    """The module, or None when it (or a package above it) does not exist; a module that exists but fails raises."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            return None
        raise


def _webui_root() -> str:
    """The webui's folder: where its `modules` package sits (the start-up script runs inside the webui)."""
    modules = sys.modules.get("modules")
    paths = list(getattr(modules, "__path__", []) or [])
    return os.path.dirname(os.path.abspath(paths[0])) if paths else os.getcwd()


def _changelog_version() -> str:
    """The first release heading of the webui's CHANGELOG.md (A1111's own fallback when git is absent)."""
    try:
        with open(os.path.join(_webui_root(), "CHANGELOG.md"), encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("## "):
                    return re.sub(r"^(Update for|Version)\s+", "", line[3:].strip())
    except OSError:
        pass
    return "version unknown"


def _forge_version() -> str:
    found = _module("modules_forge.forge_version")
    return str(getattr(found, "version", None) or "version unknown")


def _sdnext_version() -> str:
    version = getattr(sys.modules.get("installer"), "version", None)  # filled by SD.Next's launcher from git
    if isinstance(version, dict) and version.get("commit", "unknown") != "unknown":
        return f"{version.get('updated', '?')} {version['commit']}"
    return _changelog_version()


def _neo() -> str | None:
    weight_adapter = _module("modules_forge.packages.comfy.weight_adapter")
    if weight_adapter is None or not isinstance(getattr(weight_adapter, "adapters", None), list):
        return None
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "load_lora_for_models"):
        raise RuntimeError("Forge Neo's built-in LoRA extension (sd_forge_lora) is not loaded")
    from backend.patcher.base import ModelPatcher
    from . import neo
    neo.install(weight_adapter, ModelPatcher, networks)
    return f"Forge Neo ({_forge_version()})"


def _reforge() -> str | None:
    weight_adapter = _module("ldm_patched.modules.weight_adapter")
    if weight_adapter is None or not isinstance(getattr(weight_adapter, "adapters", None), list):
        return None
    import ldm_patched.modules.lora as lora_module
    from ldm_patched.modules.model_patcher import ModelPatcher
    from . import reforge
    reforge.install(weight_adapter, ModelPatcher, lora_module)
    return f"reForge ({_forge_version()})"


def _forge() -> str | None:
    forge_lora = _module("backend.patcher.lora")
    if forge_lora is None or not hasattr(forge_lora, "lora_collection_priority"):
        return None
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "load_lora_for_models"):
        raise RuntimeError("Forge's built-in LoRA extension (sd_forge_lora) is not loaded")
    from backend.patcher.base import ModelPatcher
    from . import forge
    forge.install(forge_lora, ModelPatcher, networks)
    version = _forge_version()
    return f"{'ersatzForge' if 'ersatz' in version else 'Forge'} ({version})"


def _sdnext() -> str | None:
    common = _module("modules.lora.lora_common")
    if common is None or not isinstance(getattr(common, "module_types", None), list):
        return None
    from . import sdnext
    sdnext.install()
    return f"SD.Next ({_sdnext_version()})"


def _a1111() -> str | None:
    networks = sys.modules.get("networks")  # the built-in Lora extension's, imported by its own script first
    if networks is None or not isinstance(getattr(networks, "module_types", None), list):
        return None
    import network
    from modules import sd_models
    from . import a1111
    a1111.install(networks, network, sd_models)
    return f"A1111 ({_changelog_version()})"


DETECTORS: tuple[Callable[[], str | None], ...] = (_neo, _reforge, _forge, _sdnext, _a1111)


def install() -> str:
    """Register TLoRA with the running webui's LoRA mechanism; returns "<host> (<version>)"."""
    for detect in DETECTORS:
        found = detect()
        if found is not None:
            return found
    raise RuntimeError("this webui has none of the LoRA loaders it registers with (Forge Neo's or reForge's "
                       "adapter registry, Forge's lora_collection_priority, SD.Next's modules.lora, A1111's "
                       "built-in Lora extension)")


def startup_line() -> tuple[bool, str]:
    """(registered, the one line to print): the host and version, or why not; never raises."""
    try:
        host = install()
    except Exception as exc:  # noqa: BLE001 - a broken install must not stop the webui from starting
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"[TLoRA] {METHOD} not enabled: {why}"
    return True, f"[TLoRA] {METHOD} registered with {host}: TLoRA files in the LoRA folder apply through <lora:name:weight>"
