"""What a diverged run may keep: recent adapters whose outputs were finite, and the check of an adapter's outputs.

A NaN loss at step n+1 is the output of the adapter after step n, so that adapter is not good;
nor, always, is the one before it: a loss finite on one batch at one timestep can sit beside inf
outputs at others (the issue's lr-1.0 runs kept such a file, which rendered black). So the trainer
keeps the last few adapters whose training losses were finite and, when a run diverges, keeps
the newest of them whose outputs are finite over every check draw.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .data import Cond, Denoiser, Example
from .sampling import autocast
from .schedule import Schedule

# Snapshots kept (each a copy of the adapter parameters; adapters are small next to their model).
KEEP = 3
# The output check: up to this many training images, each at these fractions of the schedule.
CHECK_IMAGES = 4
CHECK_POINTS = (0.02, 0.35, 0.65, 0.98)


class LastGood:
    """The last KEEP adapters whose training losses were finite, as (step, parameter copies), newest last."""

    def __init__(self, params: Sequence[torch.nn.Parameter], step: int):
        self.params = list(params)
        self.kept: deque[tuple[int, list[Tensor]]] = deque()
        self.push(step)

    def push(self, step: int) -> None:
        """Copy the parameters as they are now, the adapter of `step` (the oldest copy's memory is reused)."""
        buffers = self.kept.popleft()[1] if len(self.kept) == KEEP else [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(buffers, [p.detach() for p in self.params])
        self.kept.append((step, buffers))

    def candidates(self, after: int) -> Iterator[int]:
        """Put each kept adapter newer than step `after` into the parameters, newest first; yields its step."""
        for step, buffers in reversed(self.kept):
            if step <= after:
                return
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], buffers)
            yield step


def outputs_finite(params: Sequence[Tensor], denoiser: Denoiser, schedule: Schedule, examples: Sequence[Example],
                   conds: Callable[[list[Example]], Cond], device: torch.device, amp_dtype: torch.dtype | None,
                   seed: int) -> bool:
    """Whether the adapter in `params` is finite and the model's outputs with it are, over the check draws.

    The draws (their own generator: training's noise is untouched) cover up to CHECK_IMAGES training
    images at timesteps spread over the schedule, one forward each, no gradients.
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
                noise = torch.randn(x0.shape, generator=generator).to(device)
                x_t = schedule.add_noise(x0, noise, idx)
                if not bool(torch.isfinite(denoiser(x_t, schedule.timesteps[idx].to(device), conds([example]))).all()):
                    return False
    return True
