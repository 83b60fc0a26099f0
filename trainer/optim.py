"""Optimizer, learning-rate schedule and clipping of a run (torch's own, set up for many small tensors)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .settings import TrainSettings


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then constant or cosine decay, from torch's own schedulers."""
    lrs = torch.optim.lr_scheduler
    warm = int(config.warmup_steps)
    after = max(config.steps - warm, 1)
    main = (lrs.CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0) if config.lr_schedule == "cosine"
            else lrs.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if warm <= 0:
        return main
    warmup = lrs.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return lrs.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def fast_forward(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Advance a fresh schedule to `steps` (resuming without its saved state)."""
    with warnings.catch_warnings():  # "step() before optimizer.step()" is intended here
        warnings.simplefilter("ignore")
        for _ in range(steps):
            scheduler.step()


def adamw(params: list[nn.Parameter], config: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with the multi-tensor (foreach) implementation on every device.

    A TLoRA has several small tensors per module (about 1,150 on SD1.5's attention): the
    per-tensor loop torch uses on CPUs by default costs more than the maths there. Not
    `fused`: its kernel does not bump the parameters' version counters, which
    tlora.module reads to know the transform has left its identity start.
    """
    kwargs = dict(lr=config.learning_rate, betas=tuple(config.adam_betas), weight_decay=config.weight_decay, eps=1e-8)
    try:
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """clip_grad_norm_ over many small tensors: foreach (one call) where the device allows it."""
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
