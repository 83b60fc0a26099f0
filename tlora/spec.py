"""Adapter kinds as users write them: transform `none|diag|trm:R`, residual `none|lora:r|tr:R`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import TLoRAError

TRANSFORM_KINDS = ("none", "diag", "trm")
# The paper's TLoRA(2,6): what every host creates when asked for no particular kind.
DEFAULT_TRANSFORM = "trm:2"
DEFAULT_RESIDUAL = "tr:6"
RESIDUAL_KINDS = ("none", "lora", "tr")


@dataclass(frozen=True)
class Kind:
    """One part of an adapter: its kind and rank (0 when the kind has no rank)."""

    kind: str
    rank: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.rank}" if self.rank else self.kind


def _parse(text: str, allowed: tuple[str, ...], ranked: tuple[str, ...], what: str) -> Kind:
    name, _, rank_text = str(text).strip().lower().partition(":")
    if name not in allowed:
        raise TLoRAError(f"unknown {what} kind {text!r}; expected one of "
                         + ", ".join(f"{k}:R" if k in ranked else k for k in allowed))
    if name not in ranked:
        if rank_text:
            raise TLoRAError(f"{what} kind {name!r} takes no rank (got {text!r})")
        return Kind(name)
    try:
        rank = int(rank_text)
    except ValueError:
        raise TLoRAError(f"{what} {text!r} needs an integer rank, e.g. {name}:2") from None
    if rank < 1:
        raise TLoRAError(f"{what} rank must be >= 1 (got {text!r})")
    return Kind(name, rank)


def parse_transform(text: str | Kind) -> Kind:
    """Parse `none`, `diag` or `trm:R`."""
    return text if isinstance(text, Kind) else _parse(text, TRANSFORM_KINDS, ("trm",), "transform")


def parse_residual(text: str | Kind) -> Kind:
    """Parse `none`, `lora:r` or `tr:R`."""
    return text if isinstance(text, Kind) else _parse(text, RESIDUAL_KINDS, ("lora", "tr"), "residual")


def default_scale(residual: Kind, alpha: float = 1.0) -> float:
    """Residual scale s = alpha / sqrt(rank) (rsLoRA style, the reference code's rule)."""
    return alpha / math.sqrt(residual.rank) if residual.rank else 1.0
