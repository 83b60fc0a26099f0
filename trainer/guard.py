"""What a diverged run may keep: recent adapters whose outputs were finite, and the check of an adapter's outputs.

A NaN loss at step n+1 is the output of the adapter after step n, so that adapter is not good;
nor, always, is the one before it: a loss finite on one batch at one timestep can sit beside inf
outputs at others (the issue's lr-1.0 runs kept such a file, which rendered black). So the trainer
keeps copies of adapters whose training losses were finite (the last few, and some spread over
the run) and, when a run diverges, keeps the newest of them whose outputs are finite over every
check draw.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .data import Cond, Denoiser, Example
from .sampling import autocast, ddim_sample
from .schedule import Schedule

# Snapshots kept: the most recent adapters, and some spread over the run (every total/8 steps), so
# a run that drifted for many steps into outputs a sampler cannot use still has an earlier one.
KEEP_RECENT = 2
KEEP_SPREAD = 4
SPREAD_PARTS = 8
# The output check, on what a sampler feeds the model: up to CHECK_IMAGES training images noised to
# these fractions of the schedule (its ends included: a NaN seen only at the top timestep, where
# every sampler starts, once passed a check without it), each with its caption's and the empty
# prompt's conditioning, then a short DDIM sample with classifier-free guidance from pure noise.
CHECK_IMAGES = 2
CHECK_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
CHECK_SAMPLE_STEPS = 4


class LastGood:
    """Copies of recent adapters whose training losses were finite, and of some spread over the run."""

    def __init__(self, params: Sequence[torch.nn.Parameter], step: int, total_steps: int):
        self.params = list(params)
        self.period = max(1, total_steps // SPREAD_PARTS)
        self.recent: deque[tuple[int, list[Tensor]]] = deque()
        self.spread: deque[tuple[int, list[Tensor]]] = deque()
        self.push(step)

    def _copy(self, kept: deque, limit: int, step: int) -> None:
        buffers = kept.popleft()[1] if len(kept) == limit else [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(buffers, [p.detach() for p in self.params])
        kept.append((step, buffers))

    def push(self, step: int) -> None:
        """Copy the parameters as they are now, the adapter of `step` (the oldest copy's memory is reused)."""
        self._copy(self.recent, KEEP_RECENT, step)
        if step % self.period == 0:
            self._copy(self.spread, KEEP_SPREAD, step)

    def steps(self) -> list[int]:
        """The steps of the kept adapters, newest first."""
        return sorted({step for step, _ in (*self.recent, *self.spread)}, reverse=True)

    def candidates(self, after: int) -> Iterator[int]:
        """Put each kept adapter newer than step `after` into the parameters, newest first; yields its step."""
        by_step = {step: buffers for step, buffers in (*self.spread, *self.recent)}
        for step in self.steps():
            if step <= after:
                return
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], by_step[step])
            yield step


def outputs_finite(params: Sequence[Tensor], denoiser: Denoiser, schedule: Schedule, examples: Sequence[Example],
                   conds: Callable[[list[Example]], Cond], uncond: Cond | None, cfg: float, device: torch.device,
                   amp_dtype: torch.dtype | None, seed: int) -> bool:
    """Whether the adapter in `params` is finite and the model's outputs with it are, over the check draws.

    Forwards one at a time (never a larger batch than training's), no gradients, on a generator of
    their own (training's noise is untouched).
    """
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return False
    generator = torch.Generator().manual_seed(seed)
    count = len(schedule.timesteps)
    with torch.no_grad(), autocast(device.type, amp_dtype):
        for example in list(examples)[:CHECK_IMAGES]:
            x0 = example.latent[None].to(device, torch.float32)
            for point in CHECK_POINTS:
                idx = torch.tensor([min(int(point * count), count - 1)])
                x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator).to(device), idx)
                for cond in (conds([example]), uncond):
                    if cond is not None and not bool(torch.isfinite(denoiser(
                            x_t, schedule.timesteps[idx].to(device), {k: v.to(device) for k, v in cond.items()})).all()):
                        return False
    first = examples[0]
    sample = ddim_sample(denoiser, schedule, conds([first]), uncond, (1, *first.latent.shape), CHECK_SAMPLE_STEPS,
                         cfg if uncond is not None else 1.0, generator, device, amp_dtype)
    return bool(torch.isfinite(sample).all())
