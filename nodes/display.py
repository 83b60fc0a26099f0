"""What of a file's metadata may be shown (node text, web cards): one rule for every place that shows it."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Metadata values longer than this (kohya's tag frequencies, hashes of datasets, a 50 MB
# ss_training_comment) would bloat the card, the node's text and every /history entry.
MAX_META_VALUE = 400
# An absolute path fragment (POSIX or Windows drive): never sent out.
ABS_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]*[\\/][^\s'\"]*")


def short_value(value: Any, limit: int = MAX_META_VALUE) -> str:
    """A metadata value as text, cut to `limit` characters (with an ellipsis)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def short_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Training metadata for display: long values cut, anything path-like left out."""
    out = {}
    for key, value in meta.items():
        text = str(value)
        if key.endswith(("path", "save_error")) or ABS_PATH.fullmatch(text):
            continue
        out[key] = short_value(text)
    return out
