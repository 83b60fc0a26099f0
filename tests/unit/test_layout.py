"""The repository's layout gives each host only what belongs to it (ComfyUI, the A1111 family)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_webui_runs_only_the_webui_entry():
    """A webui executes every scripts/*.py of an extension: that folder holds the webui entry and nothing else."""
    assert sorted(p.name for p in (ROOT / "scripts").iterdir() if p.name != "__pycache__") == ["tlora_webui.py"]


def test_the_root_installer_serves_both_hosts():
    """ComfyUI-Manager and a webui both run the root install.py: it may import only the stdlib and our core."""
    tree = ast.parse((ROOT / "install.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"importlib", "sys", "os", "tlora"}, imported
