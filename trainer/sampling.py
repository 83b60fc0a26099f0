"""Sampling for previews and prior-preservation class images (deterministic DDIM on any schedule)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .data import Cond, Denoiser, Example, TrainData, collate_conds
from .schedule import Schedule
from .settings import TrainingError, TrainSettings, derived_seed


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: Schedule, cond: Cond, uncond: Cond | None, shape: Sequence[int],
                steps: int = 20, cfg: float = 5.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Deterministic DDIM (eta 0) from pure noise: a preview/class-image sampler for any schedule."""
    x = torch.randn(tuple(shape), generator=generator).to(device)
    batch = x.shape[0]
    indices = torch.linspace(len(schedule) - 1, 0, max(int(steps), 1)).round().long().unique_consecutive()
    c = collate_conds([cond] * batch)
    both = collate_conds([cond] * batch + [uncond] * batch) if uncond is not None and cfg != 1 else None
    for i, index in enumerate(indices):
        idx = index.repeat(batch)
        t = schedule.timesteps[idx].to(device)
        with autocast(x.device.type, autocast_dtype):
            if both is not None:
                out = denoiser(torch.cat([x, x]), torch.cat([t, t]), {k: v.to(device) for k, v in both.items()})
                pos, neg = out.float().chunk(2)
                pred = neg + cfg * (pos - neg)
            else:
                pred = denoiser(x, t, {k: v.to(device) for k, v in c.items()}).float()
        x0, eps = schedule.split(x, pred, idx)
        if i + 1 == len(indices):
            return x0
        nxt = indices[i + 1].repeat(batch)
        x = schedule.add_noise(x0, eps, nxt)
    return x


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to dtype on this device type, or explicitly off (None: fp32)."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def class_examples(denoiser: Denoiser, schedule: Schedule, data: TrainData, settings: TrainSettings,
                   device: torch.device, amp_dtype: torch.dtype | None,
                   interrupt_check: Callable[[], None] | None = None) -> list[Example]:
    """Prior-preservation examples: the given class images plus generated ones up to the count asked.

    Call with the adapters at strength 0 (the base model draws the class).
    """
    examples = list(data.prior)
    missing = data.generate_prior - len(examples)
    if missing > 0:
        if data.prior_cond is None or data.prior_shape is None:
            raise TrainingError("prior preservation needs a class prompt to generate class images")
        # A generator of its own: the same class images on resume, whatever the main RNG did.
        gen = torch.Generator().manual_seed(derived_seed(settings.seed, 7919))
        for _ in range(missing):
            if interrupt_check is not None:
                interrupt_check()  # class images take a while: Cancel works between them
            latent = ddim_sample(denoiser, schedule, data.prior_cond, data.prior_uncond, (1, *data.prior_shape),
                                 settings.sample_steps, settings.sample_cfg, gen, device, amp_dtype)
            examples.append(Example(latent[0].detach(), data.prior_cond))
    return examples
