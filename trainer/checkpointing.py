"""Gradient checkpointing of a host's blocks: recompute their activations in backward, undoably."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


def _copy(value: Any) -> Any:
    """A copy of a floating-point tensor (graph or not: the saved input must stay as it was); else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.clone()
    return value


def _checkpoint_forward(original: Callable) -> Callable:
    def on_copies(*args: Any, **kwargs: Any) -> Any:
        # Checkpoint keeps the block's inputs to recompute from, and DiT blocks add their residuals
        # in place onto their inputs (Flux's `x += ...`): the block works on copies made inside.
        return original(*(_copy(a) for a in args), **{k: _copy(v) for k, v in kwargs.items()})

    def forward(*args: Any, **kwargs: Any) -> Any:
        # Only when building a graph: no-grad passes (DCO reference, previews) run plainly.
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(on_copies, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)
    return forward


def enable_checkpointing(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """Recompute each module's activations in backward; returns what restore_checkpointing needs."""
    undo = []
    for module in modules:
        had = module.__dict__.get("forward")
        module.forward = _checkpoint_forward(module.forward)
        undo.append((module, had))
    return undo


def restore_checkpointing(undo: Sequence[tuple[nn.Module, Any]]) -> None:
    """Undo enable_checkpointing."""
    for module, had in undo:
        if had is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = had
