"""Atomic file writes shared by the core and the trainer."""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any


TEMP_PREFIX, TEMP_SUFFIX = ".tlora-", ".tmp"
# A temp file this old is a leftover of a writer that was killed (writes take seconds).
STALE_TEMP_S = 15 * 60


def remove_stale_temps(folder: str, older_than_s: float = STALE_TEMP_S) -> list[str]:
    """Delete our own temp files (`.tlora-*.tmp`) that a killed writer left in folder; returns their names."""
    removed = []
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            continue
        full = os.path.join(folder, name)
        try:
            if now - os.stat(full).st_mtime > older_than_s:
                os.unlink(full)
                removed.append(name)
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


def atomic_write(path: str, data: bytes, replace: bool = True) -> None:
    """Write bytes beside the target, then rename over it: readers never see half a file.

    An existing file's mode is kept (else rw-r--r--); the temp file is removed on any failure,
    and temp files a killed writer left behind earlier are cleared first. replace=False never
    replaces a file: the name is taken by a hard link, atomically, and FileExistsError says that
    another writer has it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600).
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _claim(tmp: str, path: str) -> None:
    """Give tmp's content the name path only if no file has it (FileExistsError otherwise), atomically."""
    try:
        os.link(tmp, path)  # fails if the name exists, whoever made it and however late
    except FileExistsError:
        raise
    except OSError:
        # No hard links here (FAT, some network shares): an exclusive create claims the name,
        # then the content replaces the empty claim.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def parse_json(text: str | bytes) -> Any:
    """json.loads that answers absurdly nested input with ValueError, never RecursionError.

    A header, `tlora.config` or state sidecar nested thousands deep makes json's scanner
    recurse past Python's limit; callers turn the ValueError into their one-line,
    file-naming error like any other malformed JSON (json.JSONDecodeError is a ValueError).
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
