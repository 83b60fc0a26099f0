"""Tensorization of a dimension: n = n_1 * ... * n_D (row-major, first factor slowest)."""
from __future__ import annotations

import math

# The paper's reference shapes (TENSOR_SHAPE_DICT of the reference code).
PAPER_SHAPES: dict[int, tuple[int, ...]] = {
    320: (4, 8, 10),
    640: (8, 8, 10),
    768: (8, 8, 12),
    1280: (8, 10, 16),
    2048: (8, 16, 16),
}

SHAPE_PRESETS = ("paper", "auto")


def _balanced_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """Split n into num_factors factors as equal as possible, ascending (1s allowed)."""
    if num_factors == 1:
        return (n,)
    target = n ** (1.0 / num_factors)
    best: tuple[int, ...] | None = None
    best_score = math.inf
    # Try every divisor d as the first factor, recurse on the rest; n is small (< 1e6).
    for d in range(1, int(math.isqrt(n)) + 1):
        for first in {d, n // d} if n % d == 0 else ():
            rest = _balanced_factors(n // first, num_factors - 1)
            candidate = tuple(sorted((first, *rest)))
            score = sum((math.log(f) - math.log(target)) ** 2 for f in candidate)
            if score < best_score:
                best, best_score = candidate, score
    assert best is not None
    return best


def auto_factors(n: int, num_factors: int = 3) -> tuple[int, ...]:
    """The `auto` rule: the most balanced factorisation of n into at most num_factors parts.

    Factors of 1 are dropped (so a prime n gives (n,), a single dense core), and the
    result is ascending, so the widest factor is the fastest-varying one.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot tensorize dimension {n!r}: it must be a positive integer")
    if n == 1:
        return (1,)
    factors = tuple(f for f in _balanced_factors(n, num_factors) if f > 1)
    return factors or (n,)


def factorize(n: int, preset: str = "paper", num_factors: int = 3) -> tuple[int, ...]:
    """Factors of dimension n for a shapes preset (`paper` falls back to `auto`)."""
    if preset not in SHAPE_PRESETS:
        raise ValueError(f"unknown shapes preset {preset!r}; expected one of {SHAPE_PRESETS}")
    if preset == "paper" and n in PAPER_SHAPES and num_factors == 3:
        return PAPER_SHAPES[n]
    return auto_factors(n, num_factors)
