"""Choosing the activation-side form of a transform for a layer (factored or dense T).

Both forms are exact; which is faster depends on width, factors, rank, token count and
device. `choose_form` is what layers call with form="auto".
"""
from __future__ import annotations

from collections.abc import Sequence

from .functional import trm

FORMS = ("factored", "dense")


def choose_form(factors: Sequence[int], rank: int, tokens: int, device_type: str = "cpu") -> str:
    """Pick `factored` or `dense` for applying T to `tokens` rows (a cost model)."""
    if len(factors) < 2:
        return "dense"
    width = 1
    for f in factors:
        width *= f
    split = trm.best_split(factors)
    p = 1
    for f in factors[:split]:
        p *= f
    q = width // p
    factored = tokens * width * (p + q) * rank * rank
    dense = tokens * width * width + width * width * rank * rank * len(factors)
    # Small contractions run far below peak; the big GEMM of the dense form does not.
    efficiency = 2.0 if device_type == "cpu" else 4.0
    return "factored" if factored * efficiency < dense else "dense"
