"""How one run spreads over processes: the engine's only view of data parallelism.

The engine writes no distributed machinery. A host that runs under a launcher (the diffusers
binding under `accelerate launch`) implements `Distributed` over that launcher's own objects;
the default is one process and changes nothing. What the engine does with it:

* every process draws the same global batch (batch_size x world) from the run's seeded
  generator and keeps its rank's slice, so N processes at batch b see exactly the examples,
  noise and timesteps of one process at batch N x b;
* the loss runs through `wrap(holder)`, the host's data-parallel wrapper (DDP) around a module
  holding only the adapter parameters: gradients are averaged over processes, the base model
  is never broadcast or reduced;
* losses are averaged (`mean`) before the divergence check, so every process stops together;
* only the main process writes files, previews and the progress bar.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn


class AdapterParams(nn.Module):
    """The trained parameters as one module whose forward runs the loss: what a DDP wrapper wraps."""

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(list(params))

    def forward(self, compute_loss: Callable[[], Tensor]) -> Tensor:
        """Run the step's loss (the model call happens inside, so DDP sees the forward)."""
        return compute_loss()


class Distributed:
    """One process (the default); a host overrides these over its launcher's engine."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    def wrap(self, holder: AdapterParams) -> nn.Module | None:
        """The data-parallel wrapper around the adapter parameters (None: call the loss directly)."""
        return None

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module | None) -> Iterator[None]:
        """Skip the gradient all-reduce for a micro-batch that is not the last of its step."""
        yield

    def mean(self, value: Tensor) -> Tensor:
        """A scalar averaged over processes (identity for one)."""
        return value
