"""Tensor-ring (TR) residuals: Delta[(a..), (b..)] = trace(B_1[a_1] ... B_Do[a_Do] C_1[b_1] ... C_Di[b_Di]).

Output cores B_d: (O_d, R, R); input cores C_d: (I_d, R, R); row-major flattening.
Delta has rank at most R^2 and is applied as a rank-R^2 product Delta = U V^T, with
U (O, R^2) and V (I, R^2) formed from the cores each step (cheap: O R^3 + I R^3).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def chain(cores: Sequence[Tensor]) -> Tensor:
    """Product of ring cores along their chain: (n_1, R, R)... -> (n_1...n_D, R, R)."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.einsum("iab,jbc->ijac", out, core).reshape(-1, out.shape[1], core.shape[2])
    return out


def init_cores(out_factors: Sequence[int], in_factors: Sequence[int], rank: int,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               ) -> tuple[list[Tensor], list[Tensor]]:
    """Zero-start cores: B_1 = 0; other output cores N(0, 1/R); input cores N(0, 1/(n_d R)).

    The input-core rule makes V's entries have variance about 1/I (like Kaiming on a LoRA
    down-projection); the output rule keeps the chain B_2...B_Do of order one, so B_1's
    first gradients are well scaled. Delta is exactly zero at the start.
    """
    out_cores = [torch.zeros(out_factors[0], rank, rank, dtype=dtype)]
    for n in out_factors[1:]:
        out_cores.append(torch.randn(n, rank, rank, generator=generator, dtype=dtype) / math.sqrt(rank))
    in_cores = [torch.randn(n, rank, rank, generator=generator, dtype=dtype) / math.sqrt(n * rank)
                for n in in_factors]
    return out_cores, in_cores


def factor_matrices(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(U, V) with Delta = U @ V.T: U[a, (r, s)] = Bchain[a][r, s], V[b, (r, s)] = Cchain[b][s, r]."""
    up = chain(out_cores)
    down = chain(in_cores)
    rank = up.shape[1]
    return up.reshape(up.shape[0], rank * rank), down.transpose(1, 2).reshape(down.shape[0], rank * rank)


def dense(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor]) -> Tensor:
    """The dense O x I residual (reference)."""
    up, down = factor_matrices(out_cores, in_cores)
    return up @ down.transpose(0, 1)


def num_params(out_factors: Sequence[int], in_factors: Sequence[int], rank: int) -> int:
    """Parameters of a TR residual: (sum O_d + sum I_d) R^2."""
    return (sum(out_factors) + sum(in_factors)) * rank * rank
