"""Gradient checkpointing of a host's blocks: recompute their activations in backward, undoably."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


def _checkpoint_forward(original: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        # Only when building a graph: no-grad passes (DCO reference, previews) run plainly.
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)
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
