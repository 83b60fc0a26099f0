"""Weight-side TLoRA: W0 T + s Delta from raw tensors, differentiable (ComfyUI's weight-mode
training), and the merge's difference (`merge_diff`, no autograd: patching).

The transform acts on a weight's input-channel axis at every kernel tap; `on_input_channels`
is the one place that lays a Linear or Conv weight out as rows for it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import tr, trm


def on_input_channels(weight: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """fn applied to the weight's rows over input channels ((O*kh*kw, C) for a conv), reshaped back."""
    rows = weight.movedim(1, -1) if weight.dim() == 4 else weight
    moved = fn(rows.reshape(-1, rows.shape[-1])).reshape(rows.shape)
    return moved.movedim(-1, 1) if weight.dim() == 4 else moved


def transformed(weight: Tensor, cores: Sequence[Tensor] | None = None, diag: Tensor | None = None) -> Tensor:
    """W0 T for a TRM transform (cores) or a diagonal one, in factored form and weight's dtype."""
    if diag is not None:
        return on_input_channels(weight, lambda rows: rows * diag)
    return on_input_channels(weight, lambda rows: trm.weight_times_t(rows, cores))


def residual(kind: str, out_shape: Sequence[int], tensors: Sequence[Tensor]) -> Tensor | None:
    """Delta shaped like the weight: tr (out cores, in cores) or lora (up, down); None for none."""
    if kind == "tr":
        delta = tr.dense(*tensors)
    elif kind == "lora":
        up, down = tensors
        delta = up @ down
    else:
        return None
    return delta.reshape(tuple(out_shape))


def merge_diff(weight: Tensor, strength: float = 1.0, cores: Sequence[Tensor] | None = None,
               diag: Tensor | None = None, residual: tuple | None = None) -> Tensor:
    """sigma (W0 T + s Delta - W0) shaped like weight, no autograd: what a merge adds to W0.

    Computed in float32 (float64 for a float64 weight), the precision ComfyUI patches in:
    every step's error is a few float32 roundings of numbers of the weight's size. T is given
    by TRM `cores` (None: no transform or an exact identity) or a `diag`; `residual` is
    ("tr", out_cores, in_cores, s), ("lora", up (O, k), down (k, fan_in), s) or None.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    sigma = float(strength)
    with torch.no_grad():
        w0 = weight.detach().to(dtype)
        diff = None
        if cores:
            diff = on_input_channels(w0, lambda rows: trm.weight_diff(rows, cores, sigma))
        elif diag is not None:
            scale = (diag.detach().to(w0.device, dtype) - 1).mul_(sigma)
            diff = w0 * (scale.view(-1, *([1] * (w0.dim() - 2))) if w0.dim() > 2 else scale)
        if residual is not None:
            kind, first, second, res_scale = residual
            if kind == "tr":
                up, down = tr.factor_matrices_detached([c.to(w0.device, dtype) for c in first],
                                                       [c.to(w0.device, dtype) for c in second])
                down = down.t()
            else:
                up, down = first.detach().to(w0.device, dtype), second.detach().to(w0.device, dtype)
            alpha = sigma * float(res_scale)
            if diff is None:
                diff = torch.mm(up, down).mul_(alpha).reshape(w0.shape)
            else:
                diff = diff.contiguous()
                diff.view(w0.shape[0], -1).addmm_(up, down, alpha=alpha)
        return diff if diff is not None else torch.zeros_like(w0)
