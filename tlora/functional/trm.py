"""Tensor-ring matrix (TRM) transforms: T[(i..), (j..)] = trace(A_1[i_1, j_1] ... A_D[i_D, j_D]).

Cores A_d have shape (n_d, n_d, R, R). Indices are flattened row-major (C order): the first
core indexes the slowest-varying factor. The row index i of T is the one contracted with
W0's input axis, so the adapted layer computes W0 (T x) and merges as W0 @ T.
"""
from __future__ import annotations

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


def dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense I x I matrix T (reference and dense-T form)."""
    merged = merge_cores(cores)
    return torch.diagonal(merged, dim1=2, dim2=3).sum(-1)


def best_split(factors: Sequence[int]) -> int:
    """Index k that splits the cores into prefix/suffix super-cores of sizes P, Q
    minimising P + Q (the cost of the two-product form is proportional to it)."""
    best_k, best_cost = 1, float("inf")
    for k in range(1, len(factors)):
        p = 1
        for f in factors[:k]:
            p *= f
        q = 1
        for f in factors[k:]:
            q *= f
        if p + q < best_cost:
            best_k, best_cost = k, p + q
    return best_k


def two_stage_operands(cores: Sequence[Tensor], split: int | None = None) -> tuple[Tensor, Tensor]:
    """Matrices (M_p, M_q) of the factored form T x = M_p . (x M_q), one GEMM each.

    T = sum_{a,b} P_ab (x) Q_ba with P, Q the merged prefix/suffix super-cores.
    M_q: (Q, R*R*Q) laid out [q', (a, b, q)]; M_p: (P, P*R*R) laid out [p, (p', a, b)].
    """
    if split is None:
        split = best_split([c.shape[0] for c in cores])
    prefix = merge_cores(cores[:split])  # (P, P, a, b)
    suffix = merge_cores(cores[split:])  # (Q, Q, b, a)
    p, q, r = prefix.shape[0], suffix.shape[0], prefix.shape[2]
    m_q = suffix.permute(1, 3, 2, 0).reshape(q, r * r * q)  # [q', a, b, q]
    m_p = prefix.reshape(p, p * r * r)  # [p, p', a, b]
    return m_p, m_q


def apply_two_stage(x: Tensor, m_p: Tensor, m_q: Tensor) -> Tensor:
    """T x for rows x (..., P*Q), given two_stage_operands; no dense T is formed."""
    p, q = m_p.shape[0], m_q.shape[0]
    rr = m_q.shape[1] // q
    lead = x.shape[:-1]
    rows = x.reshape(-1, p, q)
    n = rows.shape[0]
    # y[n, p', (a b q)] = sum_q' x[n, p', q'] Q[q, q', b, a]: one GEMM with K = Q.
    y = (rows.reshape(n * p, q) @ m_q).reshape(n, p * rr, q)
    # out[n, p, q] = sum_{p', a, b} P[p, p', a, b] y[n, (p' a b), q]: a batched product.
    out = torch.matmul(m_p, y)
    return out.reshape(*lead, p * q)


def apply(x: Tensor, cores: Sequence[Tensor], form: str = "factored") -> Tensor:
    """T x for rows x of shape (..., I), in the named form (`factored` or `dense`)."""
    if len(cores) == 1 or form == "dense":
        return x @ dense(cores).transpose(0, 1)
    if form != "factored":
        raise ValueError(f"unknown transform form {form!r}")
    return apply_two_stage(x, *two_stage_operands(cores))


def transpose_cores(cores: Sequence[Tensor]) -> list[Tensor]:
    """Cores of T^T (swap each core's row and column index)."""
    return [c.transpose(0, 1) for c in cores]


def weight_times_t(weight_rows: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """W0 @ T in factored form, for W0 given as rows (O, I): (W0 T) = (T^T W0^T)^T."""
    return apply(weight_rows, transpose_cores(cores), form="factored")


def num_params(factors: Sequence[int], rank: int) -> int:
    """Parameters of a TRM: sum_d n_d^2 R^2."""
    return sum(n * n * rank * rank for n in factors)
