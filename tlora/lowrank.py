"""Low-rank approximation of a weight delta: truncated SVD, the rank a relative-error target needs.

A delta of a Linear weight is (O, I); a conv's (O, C, kh, kw) is taken as its (O, C*kh*kw) matrix
(the flattening of docs/FORMAT.md and of every LoRA loader). By Eckart-Young the rank-r truncated
SVD is the best rank-r approximation in the Frobenius norm, so its error is the norm of the
discarded singular values.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def as_matrix(delta: Tensor) -> Tensor:
    """A weight-shaped delta as the (O, fan_in) matrix a LoRA factors."""
    return delta.reshape(delta.shape[0], -1)


def svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of the delta's matrix in float64, thin (full_matrices=False)."""
    return torch.linalg.svd(as_matrix(delta).to(torch.float64), full_matrices=False)


def tail_error(singular: Tensor, rank: int) -> float:
    """Relative Frobenius error of keeping `rank` singular values: |S[rank:]| / |S| (0 for a zero delta)."""
    total = float(singular.pow(2).sum())
    if total == 0:
        return 0.0
    return math.sqrt(max(float(singular[rank:].pow(2).sum()), 0.0) / total)


def rank_for_error(singular: Tensor, max_error: float) -> int:
    """The smallest rank whose truncation error is at most `max_error` (0 when dropping the delta meets it)."""
    energy = singular.pow(2)
    total = float(energy.sum())
    if total == 0:
        return 0
    # tail[r] = sum of S[r:]^2: the squared error of rank r, for r = 0..n.
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    meets = (tail <= (max_error ** 2) * total).nonzero()
    return int(meets[0]) if len(meets) else len(singular)


def factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up (O, r), down (r, fan_in)) with up @ down the rank-r truncation; sqrt(S) on each side.

    Splitting S evenly keeps both factors of one magnitude, which half-precision files need.
    """
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
