"""Imports only point down: hosts -> trainer -> tlora (docs/ARCHITECTURE.md), read from the source with ast.

Floors: `tlora/` (the core) imports no other floor and no host library; `trainer/` outside its host
bindings imports only the core; the bindings (`trainer/comfy/`, `trainer/diffusers/`) import the engine,
the core and their own host; the hosts (`nodes/`, `webui/`, the root `__init__.py`) import what they
like except each other. Relative imports are resolved against the file's package; the webui's absolute
`tlora...` imports (it puts the repository on sys.path) count as the core.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_LIBRARIES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution", "diffusers",
                  "transformers", "peft", "accelerate", "modules", "ldm_patched", "backend", "network", "networks")
FLOORS = ("tlora", "trainer", "nodes", "webui", "harness", "tests", "benchmarks", "tools", "scripts")
# Library modules the engine may use though their package is a host's: transformers' Adafactor (an optimizer,
# imported only when a run asks for it; transformers is in every environment).
ENGINE_LIBRARY_MODULES = ("transformers.optimization",)


def floor_of(path: Path) -> str:
    """`tlora`, `engine` (trainer/ outside its bindings), `binding:comfy`, `binding:diffusers`, or a host floor."""
    parts = path.relative_to(ROOT).parts
    if parts[0] == "trainer":
        return f"binding:{parts[1]}" if len(parts) > 2 and parts[1] in ("comfy", "diffusers") else "engine"
    return parts[0] if len(parts) > 1 else "root"


def imported(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in a file; relative ones resolved within the repository."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]  # a module's package; __init__'s own
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                out.append((name or "<root>", node.lineno))
            else:
                out.append((node.module or "", node.lineno))
    return out


def violation(floor: str, module: str) -> str | None:
    """Why `floor` may not import `module` (None when it may)."""
    top = module.split(".")[0]
    is_host_lib = top in HOST_LIBRARIES and not (top == "nodes" and floor in ("root",))
    if floor == "tlora":
        if top in FLOORS and top != "tlora" or is_host_lib or module.startswith("<root>"):
            return "the core imports no other floor and no host"
    elif floor == "engine":
        if module in ENGINE_LIBRARY_MODULES:
            return None
        if module.startswith(("trainer.comfy", "trainer.diffusers")) or (top in FLOORS and top not in ("tlora", "trainer")) \
                or is_host_lib:
            return "the engine imports only the core (hosts plug in through trainer.binding)"
    elif floor.startswith("binding:"):
        own = floor.split(":")[1]
        other = "diffusers" if own == "comfy" else "comfy"
        if module.startswith(f"trainer.{other}") or top in ("nodes", "webui", "harness", "tests") and not (
                own == "comfy" and top == "nodes" and module == "nodes"):
            return f"the {own} binding imports the engine, the core and its own host only"
    elif floor in ("nodes", "webui"):
        other = "webui" if floor == "nodes" else "nodes"
        if top == other or top in ("harness", "tests", "benchmarks", "tools"):
            return "a host does not import another host or the test harness"
    return None


PACK_FILES = sorted(p for sub in ("tlora", "trainer", "nodes", "webui") for p in (ROOT / sub).rglob("*.py")) + [ROOT / "__init__.py"]


def test_every_import_points_down():
    bad = []
    for path in PACK_FILES:
        floor = floor_of(path)
        for module, line in imported(path):
            why = violation(floor, module)
            if why:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}: {why}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("where,source", [
    ("tlora/x.py", "from ..trainer.loop import Trainer"),
    ("tlora/x.py", "import comfy.lora"),
    ("trainer/x.py", "from .comfy.model import schedule_for"),
    ("trainer/x.py", "from ..nodes import apply"),
    ("trainer/diffusers/x.py", "from ..comfy import run"),
    ("nodes/x.py", "from ..webui.tlora_webui import core"),
])
def test_the_check_catches_an_upward_import(where, source):
    path = ROOT / where
    assert any(violation(floor_of(path), module) for module, _ in imported(path, source)), source


def test_the_diffusers_binding_keeps_its_former_import_path():
    from harness.pack import pack_module
    apply, inference = pack_module("trainer.diffusers.apply"), pack_module("trainer.diffusers.inference")
    assert apply.load_tlora is inference.load_tlora and apply.fuse is inference.fuse
    assert set(inference.__all__) <= set(dir(apply))
