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

from .. import native
from ._trm_native import native_lib


def _chain_prefixes(cores: Sequence[Tensor]) -> list[Tensor]:
    """Prefix products of the ring chain, each laid out (R, n_1...n_k, R): P[a, p, c] = prod[p][a, c].

    In this layout every step is one plain GEMM, (R P, R) @ (R, n R), with no permute of the
    growing product (only of the small next core).
    """
    c = cores[0].permute(1, 0, 2)
    out = [c]
    for core in cores[1:]:
        r = c.shape[0]
        c = torch.mm(c.reshape(r * c.shape[1], c.shape[2]), core.permute(1, 0, 2).reshape(core.shape[1], -1))
        c = c.view(r, -1, core.shape[2])
        out.append(c)
    return out


def chain(cores: Sequence[Tensor]) -> Tensor:
    """Product of ring cores along their chain: (n_1, R, R)... -> (n_1...n_D, R, R)."""
    return _chain_prefixes(cores)[-1].permute(1, 0, 2)


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
    up = _chain_prefixes(out_cores)[-1]  # (r, O, s)
    down = _chain_prefixes(in_cores)[-1]  # (s, I, r)
    return (up.permute(1, 0, 2).reshape(up.shape[1], -1),
            down.permute(1, 2, 0).reshape(down.shape[1], -1))


def _native(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor]):
    """The compiled ring products (tlora.native) when they apply: CPU float32, square cores of one rank."""
    cores = [*out_cores, *in_cores]
    rank = cores[0].shape[-1]
    if any(c.dim() != 3 or c.shape[1] != rank or c.shape[2] != rank for c in cores):
        return None
    return native_lib(*cores)


def factor_matrices_detached(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """`factor_matrices` without autograd (for fused nodes with a hand-written backward).

    On CPU in float32 each factor is one call of the compiled ring product: the torch chain is
    a few dozen tiny ops per call, and a fused node builds U, V twice per step (forward, backward).
    """
    out_cores = [c.detach().contiguous() for c in out_cores]
    in_cores = [c.detach().contiguous() for c in in_cores]
    lib = _native(out_cores, in_cores)
    if lib is not None:
        rank = out_cores[0].shape[-1]
        up = out_cores[0].new_empty(math.prod(c.shape[0] for c in out_cores), rank * rank)
        down = in_cores[0].new_empty(math.prod(c.shape[0] for c in in_cores), rank * rank)
        native.ring_product(lib, out_cores, up, False)
        native.ring_product(lib, in_cores, down, True)
        return up, down
    with torch.no_grad():
        return factor_matrices(out_cores, in_cores)


def _chain_backward(cores: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """Core gradients from the gradient (R, P, R) of the chain's product (`_chain_prefixes` layout)."""
    prefixes = _chain_prefixes(cores)
    grads: list[Tensor] = [grad] * len(cores)
    g = grad
    for k in range(len(cores) - 1, 0, -1):
        prev, core = prefixes[k - 1], cores[k]
        r, p, rb = prev.shape
        gm = g.reshape(r * p, -1)  # (R P, n R)
        left = prev.reshape(r * p, rb)
        grads[k] = (left.t() @ gm).view(rb, core.shape[0], core.shape[2]).permute(1, 0, 2)
        g = (gm @ core.permute(1, 0, 2).reshape(rb, -1).t()).view(r, p, rb)
    grads[0] = g.permute(1, 0, 2)
    return grads


def factor_matrices_backward(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor], grad_up: Tensor,
                             grad_down: Tensor) -> list[Tensor]:
    """Gradients of out_cores + in_cores from those of (U, V) = factor_matrices(...) (no autograd)."""
    out_cores = [c.detach().contiguous() for c in out_cores]
    in_cores = [c.detach().contiguous() for c in in_cores]
    lib = _native(out_cores, in_cores)
    if lib is not None and grad_up.dtype == grad_down.dtype == torch.float32:
        grads = [torch.empty_like(c) for c in (*out_cores, *in_cores)]
        native.ring_product_backward(lib, out_cores, grad_up.contiguous(), False, grads[:len(out_cores)])
        native.ring_product_backward(lib, in_cores, grad_down.contiguous(), True, grads[len(out_cores):])
        return grads
    with torch.no_grad():
        r_out = out_cores[0].shape[1]
        r_in = in_cores[0].shape[1]
        g_up = grad_up.view(grad_up.shape[0], r_out, -1).permute(1, 0, 2)  # (r, O, s)
        g_down = grad_down.view(grad_down.shape[0], -1, r_in).permute(2, 0, 1)  # (s, I, r)
        return _chain_backward(out_cores, g_up) + _chain_backward(in_cores, g_down)


def dense(out_cores: Sequence[Tensor], in_cores: Sequence[Tensor]) -> Tensor:
    """The dense O x I residual (reference)."""
    up, down = factor_matrices(out_cores, in_cores)
    return up @ down.transpose(0, 1)


def num_params(out_factors: Sequence[int], in_factors: Sequence[int], rank: int) -> int:
    """Parameters of a TR residual: (sum O_d + sum I_d) R^2."""
    return (sum(out_factors) + sum(in_factors)) * rank * rank
