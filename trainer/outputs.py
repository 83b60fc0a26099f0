"""Where a run's adapter file goes: a plain, safe name in one folder, never over another run's file."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable

from ..tlora.errors import TLoRAError
from .state import state_path_for

# What a user may call an adapter file: one name, no folders, no traversal, no drive letters.
_SAFE_NAME = re.compile(r"^[\w][\w\-. ()+\[\]]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def sanitize_output_name(name: str) -> str:
    """`name` -> `name.safetensors` if it is one plain file name; TLoRAError naming the problem otherwise."""
    raw = "" if name is None else str(name)
    text = raw.strip()
    problem = None
    if not text:
        problem = "it is empty"
    elif "/" in text or "\\" in text or os.sep in text or (os.altsep and os.altsep in text):
        problem = "it contains a folder separator (files are always saved directly in the loras folder)"
    elif ".." in text or text.startswith("."):
        problem = "it starts with a dot or contains '..'"
    elif os.path.isabs(text) or re.match(r"^[A-Za-z]:", text):
        problem = "it is an absolute path"
    elif any(ord(c) < 32 for c in text) or not _SAFE_NAME.match(text):
        problem = "it has characters other than letters, digits, space and - _ . ( ) + [ ]"
    elif len(text) > 120:
        problem = "it is longer than 120 characters"
    stem = text[: -len(".safetensors")] if text.lower().endswith(".safetensors") else text
    if problem is None and (not stem or stem.split(".")[0].lower() in _WINDOWS_RESERVED):
        problem = "it is a reserved device name"
    if problem:
        raise TLoRAError(f"output_name {raw!r} was refused: {problem}. Use a plain name like 'sks_dog'.")
    return stem + ".safetensors"


def output_path(folder: str, output_name: str, resume_path: str | None = None) -> tuple[str, str]:
    """(full path, file name) for a new adapter; an existing file is never overwritten by a new run.

    Resuming into the same name continues that file; otherwise `name_2`, `name_3`... are used.
    """
    file_name = sanitize_output_name(output_name)
    path = os.path.join(folder, file_name)
    if os.path.realpath(os.path.dirname(path)) != os.path.realpath(folder):
        raise TLoRAError(f"output_name {output_name!r} was refused: it leaves the loras folder")
    if resume_path and os.path.realpath(resume_path) == os.path.realpath(path):
        return path, file_name
    check_writable(folder)
    path = _free(path)
    return path, os.path.basename(path)


def _free(path: str, start: int = 2) -> str:
    """path, or `stem_2`, `stem_3`... beside it: the first name with neither a file nor a state sidecar."""
    folder, file_name = os.path.split(path)
    stem, ext = os.path.splitext(file_name)
    n = start
    while os.path.lexists(path) or os.path.lexists(state_path_for(path)):
        path = os.path.join(folder, f"{stem}_{n}{ext}")
        n += 1
    return path


def check_writable(folder: str) -> None:
    """TLoRAError now, not at the first save, when files cannot be created in folder."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise TLoRAError(f"cannot write into the output folder {folder}: {err.strerror or err}") from None


def claim_output(path: str, write: Callable[[str], None]) -> str:
    """Write a new run's first file with write(path) without ever replacing one; returns the name it got.

    Two runs started with one output name both chose it while it was free: the first to write
    keeps it, the other takes the next free `_2`, `_3`... name (write must raise FileExistsError,
    as fileio.atomic_write(replace=False) does, when the name is taken).
    """
    candidate = path
    while True:
        if not os.path.lexists(state_path_for(candidate)):
            try:
                write(candidate)
                return candidate
            except FileExistsError:
                pass
        candidate = _free(path)
