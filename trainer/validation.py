"""Validation loss on held-out images: which images are held out, and their loss at fixed draws.

The split is drawn from the run's seed (the same images on a resume). The loss is the plain denoising
MSE on the model's target (comparable with the training `mse` whatever the training loss), at
VALIDATION_LEVELS noise levels per image (the quantiles of the training draw) with noise fixed once:
the same draws at every evaluation, so its changes are the adapter's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Cond, Denoiser, Example, collate_conds
from .sampling import autocast
from .schedule import Schedule
from .settings import TrainingError, TrainSettings, derived_seed
from .timesteps import quantile_indices

VALIDATION_LEVELS = 4


def split(examples: list[Example], settings: TrainSettings) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples for the settings' validation_split (no hold-out when it is 0)."""
    if settings.validation_split <= 0:
        return list(examples), []
    n = len(examples)
    held = max(1, round(n * settings.validation_split))
    if held >= n:
        raise TrainingError(f"validation_split {settings.validation_split:g} holds out {held} of {n} images and "
                            f"leaves none to train on: give more images or lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(settings.seed, 271828))).tolist()
    out = set(order[:held])
    return [e for i, e in enumerate(examples) if i not in out], [e for i, e in enumerate(examples) if i in out]


class Validation:
    """The fixed draws of a run's held-out images, and their mean denoising MSE with the adapters as they are."""

    def __init__(self, examples: list[Example], schedule: Schedule, seed: int):
        self.examples, self.schedule = examples, schedule
        self.levels = quantile_indices(schedule, VALIDATION_LEVELS)
        generator = torch.Generator().manual_seed(derived_seed(seed, 161803))
        self.noise = [torch.randn((VALIDATION_LEVELS, *ex.latent.shape), generator=generator) for ex in examples]

    @torch.no_grad()
    def loss(self, denoiser: Denoiser, device: torch.device, amp_dtype: torch.dtype | None,
             conds: list[Cond] | None = None) -> float:
        """Mean MSE over held-out images and levels (`conds`: each image's conditioning, else its cached one)."""
        total = 0.0
        for i, ex in enumerate(self.examples):
            x0 = ex.latent.to(device, torch.float32)[None].expand(VALIDATION_LEVELS, *ex.latent.shape)
            noise = self.noise[i].to(device)
            x_t = self.schedule.add_noise(x0, noise, self.levels)
            cond = conds[i] if conds is not None else ex.cond
            batch = {k: v.to(device) for k, v in collate_conds([cond] * VALIDATION_LEVELS).items()}
            with autocast(device.type, amp_dtype):
                pred = denoiser(x_t, self.schedule.timesteps[self.levels].to(device), batch)
            total += float(F.mse_loss(pred.float(), self.schedule.target(x0, noise, self.levels).float()))
        return total / max(len(self.examples), 1)
