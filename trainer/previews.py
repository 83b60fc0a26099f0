"""Preview images of a run: the one place that names their files and makes their /view addresses.

The ComfyUI binding writes previews with `preview_name`; the web routes find a run's newest
one with `latest_preview`. Names are `<run id>_<step, 6 digits>.png` in the `tlora`
subfolder of the host's temp folder.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any

SUBFOLDER = "tlora"
KIND = "temp"
_NAME = re.compile(r"^(?P<run>[A-Za-z0-9_-]{1,64})_(?P<step>[0-9]{1,9})\.png$")


def preview_name(run_id: str, step: int, index: int = 0) -> str:
    """The file name of a run's preview at a step (`index`: which preview prompt; the first keeps the plain name,
    the others `<run id>-p<n>_<step>.png`, which `latest_preview` leaves to the first)."""
    if index:
        return f"{run_id}-p{int(index) + 1}_{int(step):06d}.png"
    return f"{run_id}_{int(step):06d}.png"


def view_url(filename: str, subfolder: str, kind: str) -> str:
    """ComfyUI's /view address of a temp/output file (relative: the frontend adds its API base)."""
    return "/view?" + urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})


def preview_ref(filename: str, step: int | None = None) -> dict[str, Any]:
    """A /view reference to a preview file (with its step when known)."""
    ref: dict[str, Any] = {"filename": filename, "subfolder": SUBFOLDER, "type": KIND,
                           "url": view_url(filename, SUBFOLDER, KIND)}
    if step is not None:
        ref["step"] = int(step)
    return ref


def latest_preview(temp_dir: str, run_id: str) -> dict[str, Any] | None:
    """The newest preview written for this run (a /view reference with its step), if any."""
    try:
        folder = os.path.join(temp_dir, SUBFOLDER)
        names = sorted(n for n in os.listdir(folder) if n.startswith(run_id + "_") and n.endswith(".png"))
    except OSError:
        return None
    if not names:
        return None
    match = _NAME.match(names[-1])
    step = int(match.group("step")) if match and match.group("run") == run_id else None
    return preview_ref(names[-1], step)
