#!/usr/bin/env python3
"""Expose this environment's torch and torchvision (with what they need) to another environment.

    .venv/bin/python tools/share_torch.py SHARED_DIR TARGET_SITE_PACKAGES

Links the distributions torch and torchvision depend on (transitively; numpy and Pillow excluded:
the other environment installs its own) into SHARED_DIR and writes a `.pth` in the target's
site-packages naming it. The second ComfyUI environment then imports the same torch without a
second 5 GB install. SHARED_DIR must lie outside the target environment: pip never uninstalls a
distribution outside its environment, so an upgrade there shadows a shared package instead of
deleting it through a link.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("torch", "torchvision")
OWN = {"numpy", "pillow"}  # the target pins its own versions of these


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: tuple[str, ...] = ROOTS) -> list[metadata.Distribution]:
    """The installed distributions `roots` need (markers for extras skipped), roots included."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in OWN:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(_name(req))
    return list(seen.values())


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """First path components a distribution installed under site-packages (dist-info included)."""
    entries = set()
    for f in dist.files or []:
        first = Path(str(f)).parts[0]
        if first not in ("..", "__pycache__"):
            entries.add(first)
    return entries


def main(argv: list[str]) -> int:
    """Link the closure into SHARED_DIR and point the target at it."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    shared, target = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    if shared.is_relative_to(target.parents[2]):
        raise SystemExit(f"{shared} lies inside the target environment {target.parents[2]}")
    shared.mkdir(parents=True, exist_ok=True)
    for dist in closure():
        source = Path(str(dist.locate_file("")))
        for entry in top_level_entries(dist):
            link = shared / entry
            if not link.exists() and (source / entry).exists():
                link.symlink_to(source / entry)
    (target / "tlora-shared-torch.pth").write_text(f"{shared}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
