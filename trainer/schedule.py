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
    target noise - x0 (the velocity), timestep = s_t * multiplier.
    Any other parametrisation a host samples with (x0, EDM's preconditioned output, ...) is given
    by its target's coefficients: target = c_t x0 + d_t noise (`general`); `prediction` is then a
    label for the file's metadata.
    Training draws indices uniformly, or by `weights` (flow: logit-normal, see `flow`).
    """

    prediction: str
    signal: Tensor  # a_t per index (float64)
    noise: Tensor  # b_t per index (float64)
    timesteps: Tensor  # what the denoiser receives for each index (float32)
    weights: Tensor | None = None  # training draw probability per index (None: uniform)
    target_signal: Tensor | None = None  # c_t per index (float64), with target_noise: a general target
    target_noise: Tensor | None = None  # d_t per index (float64)

    def __post_init__(self) -> None:
        general = self.target_signal is not None and self.target_noise is not None
        if not general and self.prediction not in PREDICTIONS:
            raise TrainingError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTIONS}")
        if general:
            det = self.signal * self.target_noise - self.noise * self.target_signal
            if not bool(torch.isfinite(det).all()) or bool((det.abs() < 1e-12).any()):
                raise TrainingError(f"the {self.prediction} target cannot be told apart from the noisy input "
                                    f"at some noise levels: no denoising target to train")

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """n training indices (uniform, or by `weights`) from the run's CPU generator."""
        if self.weights is None:
            return torch.randint(len(self), (n,), generator=generator)
        return torch.multinomial(self.weights, n, replacement=True, generator=generator)

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
    def flow(cls, sigmas: Tensor, multiplier: float = 1000.0, logit_normal: tuple[float, float] | None = (0.0, 1.0),
             ) -> "Schedule":
        """Rectified-flow schedule from the model's sigmas in (0, 1] (index i at t = (i + 1) / N, shift applied).

        Training timesteps as SD3's paper and the diffusers/kohya flow trainers draw them: t from a
        logit-normal (mean, std) = (0, 1) on the unshifted t, then the model's own shift, i.e. index i
        weighted by the logit-normal density at (i + 1) / N over the model's shifted sigmas.
        `logit_normal=None` draws t uniformly instead.
        """
        s = sigmas.detach().double().cpu()
        weights = None
        if logit_normal is not None:
            mean, std = logit_normal
            t = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
            t = t.clamp(max=1 - 0.5 / len(s))  # the last index (t = 1) has density 0: keep it finite and drawn rarely
            z = (torch.log(t) - torch.log1p(-t) - mean) / std
            weights = torch.exp(-0.5 * z * z) / (t * (1 - t))
            weights = weights / weights.sum()
        return cls("flow", 1 - s, s, (s * multiplier).float(), weights)

    @classmethod
    def general(cls, prediction: str, signal: Tensor, noise: Tensor, target_signal: Tensor, target_noise: Tensor,
                timesteps: Tensor, weights: Tensor | None = None) -> "Schedule":
        """x_t = a x0 + b noise with target c x0 + d noise per index (all float64), any parametrisation."""
        as64 = lambda t: t.detach().double().cpu()  # noqa: E731
        return cls(prediction, as64(signal), as64(noise), timesteps.detach().float().cpu(), weights,
                   as64(target_signal), as64(target_noise))

    def __len__(self) -> int:
        return len(self.timesteps)

    def _coef(self, values: Tensor, idx: Tensor, like: Tensor) -> Tensor:
        return values[idx.cpu()].to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """x_t for clean latents x0, noise and schedule indices."""
        return self._coef(self.signal, idx, x0) * x0 + self._coef(self.noise, idx, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """What the model should predict at these indices."""
        if self.target_signal is not None and self.target_noise is not None:
            return self._coef(self.target_signal, idx, x0) * x0 + self._coef(self.target_noise, idx, x0) * noise
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self._coef(self.signal, idx, x0) * noise - self._coef(self.noise, idx, x0) * x0
        return noise - x0

    def split(self, x_t: Tensor, pred: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, noise) implied by a prediction at x_t (used by the sampler)."""
        a, b = self._coef(self.signal, idx, x_t), self._coef(self.noise, idx, x_t)
        if self.target_signal is not None and self.target_noise is not None:
            # Solve [x_t, pred] = [[a, b], [c, d]] [x0, noise] (the determinant is checked non-zero at build).
            c, d = self._coef(self.target_signal, idx, x_t), self._coef(self.target_noise, idx, x_t)
            det = a * d - b * c
            return (d * x_t - b * pred) / det, (a * pred - c * x_t) / det
        if self.prediction == "eps":
            return (x_t - b * pred) / a.clamp_min(1e-8), pred
        if self.prediction == "v":
            return a * x_t - b * pred, b * x_t + a * pred
        return x_t - b * pred, x_t + a * pred
