"""What of a file's metadata may be shown (node text, web cards): one rule for every place that shows it."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Metadata values longer than this (kohya's tag frequencies, hashes of datasets, a 50 MB
# ss_training_comment) would bloat the card, the node's text and every /history entry.
MAX_META_VALUE = 400
# At most this many metadata entries are shown (our trainer writes about 45): a file with 100,000
# keys made a 40 MB card, node text and /history entry. The ones our cards read come first.
MAX_META_KEYS = 64
SHOWN_FIRST = ("tlora.train.partial", "tlora.train.steps", "tlora.train.total_steps", "tlora.train.stopped",
               "tlora.train.final_loss", "tlora.train.loss", "tlora.train.lr", "tlora.train.targets",
               "tlora.train.resolution", "tlora.train.seed", "tlora.train.instance_prompt", "tlora.train.base_model",
               "tlora.train.time", "tlora.train.host")
# The parts of a file's tlora.config a card or the Info node shows (the rest is the file's business).
SHOWN_CONFIG = ("arch", "transform", "residual", "targets", "shapes", "alpha", "text_encoder", "with_convs",
                "modules", "params", "transform_params", "residual_params", "dtype", "format_version",
                "transform_kinds", "residual_kinds", "params_by_kind")
MAX_CONFIG_ITEMS = 16
# An absolute path fragment (POSIX or Windows drive): never sent out.
ABS_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"]*[\\/][^\s'\"]*")


def short_value(value: Any, limit: int = MAX_META_VALUE) -> str:
    """A metadata value as text, cut to `limit` characters (with an ellipsis)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def short_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Training metadata for display: at most MAX_META_KEYS entries, long values cut, anything path-like left out."""
    out: dict[str, str] = {}
    keys = [k for k in SHOWN_FIRST if k in meta] + sorted(str(k) for k in meta if k not in SHOWN_FIRST)
    for key in keys:
        text = str(meta[key])
        if key.endswith(("path", "save_error")) or ABS_PATH.fullmatch(text):
            continue
        if len(out) == MAX_META_KEYS:
            out["…"] = f"{len(keys) - MAX_META_KEYS} more metadata entries not shown"
            break
        out[short_value(key, 80)] = short_value(text)
    return out


def short_config(config: Any) -> dict[str, Any]:
    """The shown part of a file's tlora.config: known keys only, strings cut, small tables cut to MAX_CONFIG_ITEMS."""
    if not isinstance(config, Mapping):
        return {}
    out: dict[str, Any] = {}
    for key in SHOWN_CONFIG:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, Mapping):
            value = {short_value(k, 40): v if isinstance(v, (int, float)) and not isinstance(v, bool) else short_value(v, 40)
                     for k, v in list(value.items())[:MAX_CONFIG_ITEMS]}
        elif not isinstance(value, (bool, int, float)) or value is None:
            value = short_value(value, 80)
        out[key] = value
    return out
