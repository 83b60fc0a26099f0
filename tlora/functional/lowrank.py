"""The low-rank residual s Delta x = s U (V^T x) applied activation-side, with its hand-written backward.

Delta = U V^T is a tensor ring's factor matrices (`tr.factor_matrices`, k = R^2 columns) or a
LoRA's up and down. The residual is given raw, as `trm.linear` takes it: ("tr", out_cores,
in_cores, s) or ("lora", up (O, k), down (I, k), s), s a float, a 0-d tensor or None for 1.

What is kept for the backward: x (shared with the transform and the frozen layer where they
keep it too) and V^T x (k floats per token). U and V are rebuilt from the raw tensors in the
backward instead of kept: (O + I) R^3 multiply-adds (one call of the compiled ring product on
CPU) against (O + I) k floats per layer held from the forward to the backward, which for TR(6)
on SD1.5 was about as much as everything else the adapters keep.

`apply` is the residual alone for a layer the transform does not fuse with (a host's op, a
quantized or offloaded layer: `tlora.runtime`'s general path); the fused nodes of
`_trm_fused` call `residual_forward` / `residual_backward` inside their own.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from . import tr


def _factors(x: Tensor, kind: str, res: Sequence[Tensor], n_out: int, mult: float,
             res_scale: Tensor | None) -> tuple[Tensor, Tensor, float | Tensor]:
    """(f U, V, f) of the residual, built from its raw tensors without autograd (f = mult * res_scale)."""
    if kind == "tr":
        up, down = tr.factor_matrices_detached(res[:n_out], res[n_out:])
    else:
        up, down = res[0].detach(), res[1].detach()
    factor = mult if res_scale is None else res_scale.to(x.dtype) * mult
    up_s = up if isinstance(factor, float) and factor == 1 else up * factor
    return up_s, down, factor


def residual_forward(x: Tensor, out: Tensor, kind: str | None, res: Sequence[Tensor], n_out: int, mult: float,
                     res_scale: Tensor | None) -> Tensor | None:
    """out += f U (V^T x) for rows x (N, I); returns V^T x, the one thing the backward keeps of it."""
    if kind is None:
        return None
    up_s, down, _ = _factors(x, kind, res, n_out, mult, res_scale)
    hidden = x @ down
    out.addmm_(hidden, up_s.t())
    return hidden


def residual_backward(x: Tensor, gy: Tensor, gx: Tensor | None, kind: str | None, res: Sequence[Tensor], n_out: int,
                      mult: float, res_scale: Tensor | None, hidden: Tensor, need_res: bool,
                      pick: Tensor | None = None) -> list[Tensor | None]:
    """gx += the residual's part (when gx is given); gradients of the residual's raw tensors.

    `pick`: the output rows of U the layer used (a fused adapter on one of its split layers);
    U's other rows get zero gradient.
    """
    if kind is None:
        return []
    if gx is None and not need_res:
        return [None] * len(res)
    up_s, down, factor = _factors(x, kind, res, n_out, mult, res_scale)
    used = up_s if pick is None else up_s.index_select(0, pick)
    g_hidden = gy @ used
    if gx is not None:
        gx.addmm_(g_hidden, down.t())
    if not need_res:
        return [None] * len(res)
    g_up = gy.t() @ hidden
    if not (isinstance(factor, float) and factor == 1):
        g_up = g_up * factor
    if pick is not None:
        g_up = g_up.new_zeros(up_s.shape).index_add_(0, pick, g_up)
    g_down = x.t() @ g_hidden
    if kind == "tr":
        return tr.factor_matrices_backward(res[:n_out], res[n_out:], g_up, g_down)
    return [g_up, g_down]


class _LowRank(torch.autograd.Function):
    """f U[pick] (V^T x) for rows x (N, I) from the residual's raw tensors (spec = (kind, n_out, mult))."""

    @staticmethod
    def forward(ctx, x, res_scale, pick, spec, *res):  # noqa: D401
        kind, n_out, mult = spec
        up_s, down, _ = _factors(x, kind, res, n_out, mult, res_scale)
        used = up_s if pick is None else up_s.index_select(0, pick)
        hidden = x @ down
        out = hidden @ used.t()
        ctx.save_for_backward(x, hidden, res_scale, pick, *res)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, gy):
        x, hidden, res_scale, pick, *res = ctx.saved_tensors  # unpacked once (checkpointing allows no more)
        kind, n_out, mult = ctx.spec
        need = ctx.needs_input_grad
        gy = gy.to(x.dtype).contiguous()
        with torch.autocast(x.device.type, enabled=False):
            gx = torch.zeros_like(x) if need[0] else None
            grads = residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, hidden, any(need[4:]), pick)
        return (gx, None, None, None, *grads)


def apply(x: Tensor, residual: tuple, pick: Tensor | None = None) -> Tensor:
    """s U[pick] V^T x on the last axis of x (..., I): the residual alone, unweighted by strength.

    Under autocast it computes as autocast would run its GEMMs (inputs cast to the autocast dtype,
    then autocast off); callers that also transform x cast it once and pass the cast tensor, so
    one copy of x is kept for both.
    """
    kind, first, second, scale = residual
    res = (*first, *second) if kind == "tr" else (first, second)
    n_out = len(first) if kind == "tr" else 0
    mult, res_scale = (float(scale), None) if isinstance(scale, (int, float)) else (1.0, scale)
    lead, width = x.shape[:-1], x.shape[-1]
    kind_dev = x.device.type
    amp = torch.is_autocast_enabled(kind_dev) if kind_dev in ("cpu", "cuda", "xpu", "mps") else False
    dtype = torch.get_autocast_dtype(kind_dev) if amp and x.is_floating_point() else x.dtype
    with torch.autocast(kind_dev, enabled=False) if amp else contextlib.nullcontext():
        rows = x.to(dtype).reshape(-1, width)
        res = [t.to(dtype) for t in res]
        out = _LowRank.apply(rows, res_scale, pick, (kind, n_out, mult), *res)
    return out.reshape(*lead, out.shape[-1])

