"""An exponential moving average of the adapter, kept beside the trained weights and saved as the file.

The decay at the k-th update (k = 0 for the first) is 0 for k = 0 (the average starts as the weights
after the first step) and min(ema_decay, (1 + k) / (10 + k)) after it: diffusers' EMAModel without
its warm-up options, so short runs are not dominated by the untrained start. The file then holds the
average (`tlora.train.weights` says so) and the state sidecar the trained weights, which a resume
continues from.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

WEIGHTS_KEY = "tlora.train.weights"


def decay_at(update: int, decay: float) -> float:
    """The decay of the `update`-th update (0-based)."""
    return 0.0 if update <= 0 else min(float(decay), (1.0 + update) / (10.0 + update))


class AdapterEMA:
    """Float32 running averages of a run's parameters (on their device)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float, updates: int = 0):
        self.params, self.decay, self.updates = list(params), float(decay), int(updates)
        self.average = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters as they are now into the average."""
        d = decay_at(self.updates, self.decay)
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.average, current, 1.0 - d)
        self.updates += 1

    def state(self) -> dict[str, Tensor]:
        """The averages and the trained weights, by position, for the state sidecar."""
        out = {f"ema.{i}": a for i, a in enumerate(self.average)}
        out.update({f"weights.{i}": p.detach() for i, p in enumerate(self.params)})
        return out

    def load(self, tensors: dict[str, Tensor], updates: int) -> bool:
        """Restore averages and trained weights from a sidecar's tensors; False when they are not all there."""
        if not all(f"ema.{i}" in tensors and f"weights.{i}" in tensors for i in range(len(self.params))):
            return False
        with torch.no_grad():
            for i, (avg, param) in enumerate(zip(self.average, self.params)):
                avg.copy_(tensors[f"ema.{i}"])
                param.copy_(tensors[f"weights.{i}"])
        self.updates = int(updates)
        return True

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the parameters' place while the block runs (saving, checks, previews); then back."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)

    def describe(self) -> str:
        """What the file's adapter is, for its metadata."""
        return (f"ema: exponential moving average of the trained adapter over {self.updates} steps (decay "
                f"min({self.decay:g}, (1 + k) / (10 + k)) at the k-th update, the first taken whole); the trained "
                f"weights are in the .tlora-state sidecar")
