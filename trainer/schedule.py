"""Noise schedules for training: x_t = a_t x0 + b_t noise and what the model predicts (eps, v, flow)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .settings import TrainingError

PREDICTIONS = ("eps", "v", "flow")


@dataclass
class Schedule:
    """A training noise schedule: x_t = a_t x0 + b_t noise, and what the model predicts.

    eps / v: discrete DDPM schedule (a_t = sqrt(alphas_cumprod), b_t = sqrt(1 - alphas_cumprod)),
    timestep passed to the model = the index. flow: rectified flow, a_t = 1 - s_t, b_t = s_t,
    target noise - x0, timestep = s_t * multiplier.
    """

    prediction: str
    signal: Tensor  # a_t per index (float64)
    noise: Tensor  # b_t per index (float64)
    timesteps: Tensor  # what the denoiser receives for each index (float32)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise TrainingError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTIONS}")

    @classmethod
    def discrete(cls, alphas_cumprod: Tensor, prediction: str = "eps") -> "Schedule":
        """DDPM schedule from alphas_cumprod (index t -> timestep t)."""
        a = alphas_cumprod.detach().double().cpu()
        return cls(prediction, a.sqrt(), (1 - a).clamp_min(0).sqrt(), torch.arange(len(a), dtype=torch.float32))

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, prediction: str = "eps") -> "Schedule":
        """DDPM schedule from k-diffusion sigmas (sigma = sqrt((1 - a) / a))."""
        s = sigmas.detach().double().cpu()
        return cls.discrete(1.0 / (1.0 + s * s), prediction)

    @classmethod
    def flow(cls, sigmas: Tensor, multiplier: float = 1000.0) -> "Schedule":
        """Rectified-flow schedule from its sigmas in (0, 1]."""
        s = sigmas.detach().double().cpu()
        return cls("flow", 1 - s, s, (s * multiplier).float())

    def __len__(self) -> int:
        return len(self.timesteps)

    def _coef(self, values: Tensor, idx: Tensor, like: Tensor) -> Tensor:
        return values[idx.cpu()].to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """x_t for clean latents x0, noise and schedule indices."""
        return self._coef(self.signal, idx, x0) * x0 + self._coef(self.noise, idx, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """What the model should predict at these indices."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self._coef(self.signal, idx, x0) * noise - self._coef(self.noise, idx, x0) * x0
        return noise - x0

    def split(self, x_t: Tensor, pred: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, noise) implied by a prediction at x_t (used by the sampler)."""
        a, b = self._coef(self.signal, idx, x_t), self._coef(self.noise, idx, x_t)
        if self.prediction == "eps":
            return (x_t - b * pred) / a.clamp_min(1e-8), pred
        if self.prediction == "v":
            return a * x_t - b * pred, b * x_t + a * pred
        return x_t - b * pred, x_t + a * pred
