"""Which noise levels training draws: the settings' timestep sampling as weights over the schedule's levels.

A schedule's index i sits at position u = (i + 1) / N of its table (N levels, low u = little noise):
the DDPM timestep t / 1000 of eps/v models, the unshifted flow time of flow models, whose table already
holds the model's own shift (ComfyUI's sampling object as patched, diffusers' scheduler). A choice draws
z in (0, 1), maps it through the extra shift s (u = s z / (1 + (s - 1) z), which multiplies a flow
model's own shift), and index i gets the probability of u falling in ((i)/N, (i + 1)/N]: exact, from
the draw's closed-form distribution function.

    uniform        z ~ U(0, 1)
    logit-normal   z = sigmoid(logit_mean + logit_std * n), n ~ N(0, 1)   (SD3's paper, kohya's sd3)
    sigmoid        z = sigmoid(logit_std * n)                             (musubi-tuner, kohya's flux)
    shift          the sigmoid draw, then the shift                       (musubi-tuner's `shift`)
    auto           the schedule as the host built it (flow models: logit-normal (0, 1); others uniform)
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .schedule import Schedule
from .settings import TrainSettings


def _cdf(z: Tensor, kind: str, mean: float, std: float) -> Tensor:
    """P(draw <= z) for z in [0, 1] (float64)."""
    if kind == "uniform":
        return z.clamp(0, 1)
    if kind == "sigmoid" or kind == "shift":
        mean = 0.0
    inner = z.clamp(1e-300, 1 - 1e-16)
    x = (torch.log(inner) - torch.log1p(-inner) - mean) / std
    out = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return torch.where(z <= 0, torch.zeros_like(out), torch.where(z >= 1, torch.ones_like(out), out))


def draw_weights(levels: int, kind: str, shift: float = 1.0, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Probability of each of `levels` indices under a sampling choice (float64, sums to 1)."""
    edges = torch.arange(levels + 1, dtype=torch.float64) / levels
    # u = s z / (1 + (s - 1) z)  <=>  z = u / (s - (s - 1) u)
    z = edges / (shift - (shift - 1) * edges)
    cdf = _cdf(z, kind, mean, std)
    weights = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return weights / weights.sum()


def training_schedule(schedule: Schedule, settings: TrainSettings) -> Schedule:
    """The schedule with the settings' draw weights (the host's own for `auto`)."""
    if settings.timestep_sampling == "auto":
        return schedule
    weights = draw_weights(len(schedule), settings.timestep_sampling, settings.timestep_shift, settings.logit_mean,
                           settings.logit_std)
    return dataclasses.replace(schedule, weights=weights)


def quantile_indices(schedule: Schedule, count: int) -> Tensor:
    """`count` indices at the (k + 1/2) / count quantiles of the schedule's draw (the validation loss's levels)."""
    n = len(schedule)
    weights = schedule.weights if schedule.weights is not None else torch.full((n,), 1.0 / n, dtype=torch.float64)
    cdf = torch.cumsum(weights.double(), 0)
    targets = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return torch.searchsorted(cdf / cdf[-1], targets).clamp(max=n - 1)
