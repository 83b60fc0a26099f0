"""The pack's own packages (tlora, trainer, nodes) imported without ComfyUI's loader.

The pack uses relative imports between its packages (trainer -> ..tlora), as ComfyUI
imports it: as one package. Outside ComfyUI this gives it a namespace package of its own,
never running the pack's ComfyUI `__init__.py`, so every caller (unit tests, benchmarks)
shares one copy of each module and class.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "tlora_pack"


def pack_module(sub: str) -> ModuleType:
    """`tlora...`, `trainer...` or `nodes...` of this repository, imported as the pack's subpackage."""
    if NAMESPACE not in sys.modules:
        namespace = types.ModuleType(NAMESPACE)
        namespace.__path__ = [str(ROOT)]
        sys.modules[NAMESPACE] = namespace
    return importlib.import_module(f"{NAMESPACE}.{sub}")
