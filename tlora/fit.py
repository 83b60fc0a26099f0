"""Fitting a TLoRA to a target weight: W0 T + s Delta as close as it gets to W* (a LoRA's, a fine-tune's).

Used by `python -m tlora fit` / `merge` (tlora/convert.py) and by the real-weight benchmark
(benchmarks/real_weights.py), which measured the method this way first.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import lowrank
from .adapter import R_DOWN, R_IN, R_OUT, R_UP, SCALE, T_CORE, T_DIAG, ModuleAdapter
from .functional import weight as wfn
from .spec import parse_residual

DEFAULT_ITERS = 300
DEFAULT_LR = 1e-2


def _numbered(params: dict[str, Tensor], pattern: str) -> list[str]:
    keys = []
    while pattern.format(len(keys)) in params:
        keys.append(pattern.format(len(keys)))
    return keys


def solve_lora(target: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """(up, down) with s up @ down the best rank-`rank` fit of a weight-shaped target (float64 SVD)."""
    u, s, vh = lowrank.svd(target)
    up, down = lowrank.factors(u, s, vh, rank)
    return up / scale, down


def fit_adapter(w0: Tensor, w1: Tensor, transform: str, residual: str, iters: int = DEFAULT_ITERS,
                seed: int = 0, shapes: str = "paper", alpha: float = 1.0, lr: float = DEFAULT_LR,
                name: str = "<module>") -> ModuleAdapter:
    """The ModuleAdapter closest to W* found from TLoRA's start (T = I, Delta = 0), for a Linear or Conv weight.

    Transform and TR cores are fitted by Adam (lr 1e-2, cosine; L-BFGS stalled at TR's zero start, and
    lower Adam rates ended worse on real deltas) through the core's differentiable weight functions, in
    float32. A LoRA residual is solved exactly for the current transform (truncated SVD of W* - W0 T,
    re-solved every 10 iterations: variable projection), and once more in float64 for the transform
    kept, so transform + LoRA never ends worse than LoRA alone: with no transform, or when the target
    is W0 plus a LoRA of rank <= r, the start is already the optimum. Each fit keeps its best iterate.
    A LoRA rank above the weight's own is capped at it (exact, like an export at full rank).
    """
    kind = parse_residual(residual)
    full = min(int(w0.shape[0]), w0[0].numel())
    if kind.kind == "lora" and kind.rank > full:  # more rank than the weight has adds only zeros
        residual = f"lora:{full}"
    w0_64, w1_64 = w0.detach().to(torch.float64), w1.detach().to(torch.float64)
    w0, w1 = w0_64.to(torch.float32), w1_64.to(torch.float32)
    start = ModuleAdapter.create(tuple(w0.shape), transform, residual, shapes=shapes, alpha=alpha,
                                 generator=torch.Generator().manual_seed(seed), name=name)
    scale = start.tensors[SCALE]
    s = float(scale)
    lora_rank = start.residual.rank if start.residual.kind == "lora" else 0
    params = {k: nn.Parameter(v.clone()) for k, v in start.tensors.items() if k not in (SCALE, R_UP, R_DOWN)}
    t_keys, out_keys, in_keys = _numbered(params, T_CORE), _numbered(params, R_OUT), _numbered(params, R_IN)
    lora: dict[str, Tensor] = {}
    norm = float((w1_64 - w0_64).pow(2).sum()) or 1.0

    def base_fit() -> Tensor:
        """W0 T + s Delta_TR (everything but a LoRA residual), differentiable in the cores."""
        if t_keys:
            w = wfn.transformed(w0, [params[k] for k in t_keys])
        elif T_DIAG in params:
            w = wfn.transformed(w0, diag=params[T_DIAG])
        else:
            w = w0
        if out_keys:
            w = w + s * wfn.residual("tr", w0.shape, ([params[k] for k in out_keys], [params[k] for k in in_keys]))
        return w

    def solve() -> None:
        with torch.no_grad():
            up, down = solve_lora(w1 - base_fit(), lora_rank, s)
        lora["up"], lora["down"] = up.to(torch.float32), down.to(torch.float32)

    def loss_now() -> Tensor:
        w = base_fit()
        if lora_rank:
            w = w + s * (lora["up"] @ lora["down"]).reshape(w0.shape)
        return (w - w1).pow(2).sum() / norm

    def snapshot() -> dict[str, Tensor]:
        tensors = {k: v.detach().clone() for k, v in params.items()}
        tensors[SCALE] = scale.clone()
        return tensors

    if lora_rank:
        solve()
    trainable = list(params.values())
    best = (float(loss_now().detach()), snapshot())
    if trainable and iters > 0:
        opt = torch.optim.Adam(trainable, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
        for i in range(1, iters + 1):
            opt.zero_grad(set_to_none=True)
            loss_now().backward()
            opt.step()
            sched.step()
            if lora_rank and (i % 10 == 0 or i == iters):
                solve()
            if i % 5 == 0 or i == iters:  # best-iterate check every few steps (a snapshot copies every tensor)
                value = float(loss_now().detach())
                if math.isfinite(value) and value < best[0]:
                    best = (value, snapshot())
    tensors = best[1]
    if lora_rank:
        # The residual for the kept transform, solved in float64: exact where the target allows it.
        kept = ModuleAdapter({k: v for k, v in tensors.items()}, name=name) if len(tensors) > 1 else None
        rest = w1_64 - (w0_64 + kept.weight_diff(w0_64) if kept is not None else w0_64)
        tensors[R_UP], tensors[R_DOWN] = (t.to(torch.float32) for t in solve_lora(rest, lora_rank, s))
    return ModuleAdapter(tensors, name=name, weight_shape=w0.shape)
