"""Weight-side TLoRA, differentiable: W0 T + s Delta from raw tensors (ComfyUI's weight-mode training).

The transform acts on a weight's input-channel axis at every kernel tap; `on_input_channels`
is the one place that lays a Linear or Conv weight out as rows for it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

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
