"""Optimizer, learning-rate schedule and clipping of a run, from well-kept libraries.

AdamW is torch's; 8-bit AdamW bitsandbytes' (GPU only); Prodigy prodigyopt's; Adafactor transformers'.
Parameters are grouped by part (the transform cores, the residual, anything else a host trains) so each
part can have its own rate (LoRA+-style). The optimizer's state is saved in the run's parameter order
(`canonical_state`), so a sidecar reads back whatever the grouping (`load_canonical`).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..tlora.adapter import R_PART, T_PART
from .settings import TrainingError, TrainSettings

PARTS = ("transform", "residual", "other")
# The trainer names a parameter `<file key>.<suffix with dots as __>`: its part is in the suffix.
_T_NAME, _R_NAME = T_PART.rstrip(".") + "__", R_PART.rstrip(".") + "__"


def part_of(name: str) -> str:
    """Which part a trainer parameter name belongs to: transform, residual or other."""
    last = name.rsplit(".", 1)[-1]
    if last.startswith(_T_NAME) or last == T_PART.rstrip(".") + "__diag":
        return "transform"
    if last.startswith(_R_NAME):
        return "residual"
    return "other"


def lr_scale(config: TrainSettings, part: str) -> float:
    """A part's learning rate as a multiple of learning_rate."""
    return {"transform": config.transform_lr_scale, "residual": config.residual_lr_scale}.get(part, 1.0)


def param_groups(named: Sequence[tuple[str, nn.Parameter]], config: TrainSettings) -> list[dict[str, Any]]:
    """One optimizer group per part present, in PARTS order, each at its own learning rate."""
    groups = []
    for part in PARTS:
        params = [p for n, p in named if part_of(n) == part]
        if params:
            groups.append({"params": params, "name": part, "lr": config.learning_rate * lr_scale(config, part)})
    return groups


def make_optimizer(named: Sequence[tuple[str, nn.Parameter]], config: TrainSettings,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The settings' optimizer over the run's parameters, grouped by part."""
    groups = param_groups(named, config)
    betas = tuple(config.adam_betas)
    if config.optimizer == "adamw":
        return adamw(groups, config)
    if config.optimizer == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise TrainingError(f"optimizer adamw8bit runs on a CUDA GPU (bitsandbytes); this run is on "
                                f"{torch.device(device).type}: choose adamw, prodigy or adafactor")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                                   eps=1e-8)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainingError("optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        # The library's defaults (decoupled decay), its warm-up safeguard when the run warms up; it prints a
        # line about the decay at construction, which a node's console does not need.
        with contextlib.redirect_stdout(io.StringIO()):
            return Prodigy(groups, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                           decouple=True, safeguard_warmup=config.warmup_steps > 0)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        # An explicit rate (the schedule's), no relative step or parameter scaling: kohya's LoRA setting.
        return Adafactor(groups, lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=config.weight_decay)
    raise TrainingError(f"unknown optimizer {config.optimizer!r}")


def adamw(params: Any, config: TrainSettings) -> torch.optim.Optimizer:
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


def optimizer_bytes_per_param(optimizer: str) -> int:
    """Bytes of optimizer state per adapter parameter (float32; 8-bit AdamW's moments one byte each)."""
    return {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4}.get(optimizer, 8)


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


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """clip_grad_norm_ over many small tensors: foreach (one call) where the device allows it."""
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def canonical_state(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> dict[str, Any]:
    """The optimizer's state_dict with parameters numbered in the run's order (`params`), whatever the grouping."""
    sd = optimizer.state_dict()
    order = [p for group in optimizer.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(params)}
    to_run = {i: position[id(p)] for i, p in enumerate(order)}
    groups = [{**g, "params": [to_run[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {to_run[i]: v for i, v in sd["state"].items()}, "param_groups": groups}


def load_canonical(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], saved: dict[str, Any]) -> bool:
    """Load a canonical_state into an optimizer over the same parameters; whether its groups were the same.

    A sidecar grouped otherwise (one group, from before parts had their own rates) still gives each
    parameter its state and each group the saved hyperparameters; the caller then sets the rates.
    """
    order = [p for group in optimizer.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(params)}
    from_run = {position[id(p)]: i for i, p in enumerate(order)}
    saved_groups = saved["param_groups"]
    same = len(saved_groups) == len(optimizer.param_groups)
    groups = []
    for group in optimizer.param_groups:
        members = sorted(position[id(p)] for p in group["params"])
        match = next((g for g in saved_groups if sorted(g["params"]) == members), None)
        if match is None:
            same = False
            match = next((g for g in saved_groups if members[0] in g["params"]), saved_groups[0])
            match = {**match, "lr": group["lr"], "initial_lr": group.get("initial_lr", group["lr"])}
        groups.append({**{k: v for k, v in match.items() if k != "params"}, "name": group.get("name"),
                       "params": [from_run[i] for i in members]})
    state = {from_run[int(i)]: v for i, v in saved["state"].items()}
    # load_state_dict pairs groups' "params" with its own groups' params by position: the members of
    # each group in its own order.
    for group, own in zip(groups, optimizer.param_groups):
        group["params"] = [from_run[position[id(p)]] for p in own["params"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return same
