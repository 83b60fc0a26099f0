"""The TRM algebra on cores (no engine): identity start, merging, the dense T, counts.

Cores A_d have shape (n_d, n_d, R, R); indices are flattened row-major (see `trm`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

def identity_cores(factors: Sequence[int], rank: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> list[Tensor]:
    """Cores with every A_d[:, :, r, r'] = eye(n_d) / R, so that T is the identity."""
    cores = []
    for n in factors:
        eye = torch.eye(n, dtype=dtype, device=device) / rank
        cores.append(eye[:, :, None, None].expand(n, n, rank, rank).contiguous())
    return cores


def merge_cores(cores: Sequence[Tensor]) -> Tensor:
    """Contract consecutive cores over their shared ring index into one core.

    (n_1, n_1, R, R), (n_2, n_2, R, R) -> (n_1 n_2, n_1 n_2, R, R), row-major in each axis.
    """
    merged = cores[0]
    for core in cores[1:]:
        p, q, r = merged.shape[0], core.shape[0], merged.shape[2]
        merged = torch.einsum("ijab,klbc->ikjlac", merged, core).reshape(p * q, p * q, r, core.shape[3])
    return merged


def best_split(factors: Sequence[int]) -> int:
    """Index k that splits the cores into prefix/suffix super-cores of sizes P, Q
    minimising P + Q (the cost of the two-product form is proportional to it)."""
    best_k, best_cost = 1, float("inf")
    for k in range(1, len(factors)):
        p, q = math.prod(factors[:k]), math.prod(factors[k:])
        if p + q < best_cost:
            best_k, best_cost = k, p + q
    return best_k


def dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense I x I matrix T (reference and dense-T form); differentiable.

    Built as one GEMM over the ring pair of a prefix/suffix split, so no (I, I, R, R)
    tensor is ever formed: T[(p q), (p' q')] = sum_ab P[p, p', a, b] Q[q, q', b, a].
    """
    if len(cores) == 1:
        return torch.diagonal(cores[0], dim1=2, dim2=3).sum(-1)
    split = best_split([c.shape[0] for c in cores])
    prefix, suffix = merge_cores(cores[:split]), merge_cores(cores[split:])
    p, q, r = prefix.shape[0], suffix.shape[0], prefix.shape[2]
    t4 = prefix.reshape(p * p, r * r) @ suffix.permute(3, 2, 0, 1).reshape(r * r, q * q)
    return t4.reshape(p, p, q, q).permute(0, 2, 1, 3).reshape(p * q, p * q)


def dense_with_strength(cores: Sequence[Tensor], strength: float = 1.0) -> Tensor:
    """(1 - sigma) I + sigma T, dense (the dense form's matrix)."""
    t = dense(cores)
    if strength != 1:
        t = strength * t + (1 - strength) * torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return t


def transpose_cores(cores: Sequence[Tensor]) -> list[Tensor]:
    """Cores of T^T (swap each core's row and column index)."""
    return [c.transpose(0, 1) for c in cores]


def num_params(factors: Sequence[int], rank: int) -> int:
    """Parameters of a TRM: sum_d n_d^2 R^2."""
    return sum(n * n * rank * rank for n in factors)
