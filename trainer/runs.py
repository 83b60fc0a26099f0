"""Run records and reports: what the web UI and callers learn about a run while and after it trains."""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..tlora.adapter import ModuleAdapter


class RunRegistry:
    """Latest state, loss history and summary of recent runs, by run id (thread-safe).

    A record: run_id, status (running/done/cancelled/diverged/failed), started, finished,
    whatever start() was given (steps, start_step, loss_kind, path, and from a host: node,
    prompt_id, file_name), `state` (the latest step's figures plus the latest `sample`),
    `history` (step, loss, lr per step) and `summary` (steps_done, final_loss, partial,
    file_name when this run saved a file, message when it stopped on an error).
    """

    def __init__(self, keep: int = 32):
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}
        self._keep = keep

    def start(self, run_id: str, **info: Any) -> None:
        """Register a run as running."""
        with self._lock:
            self._runs[run_id] = {"run_id": run_id, "status": "running", "started": time.time(),
                                  "history": [], "state": {}, "summary": {}, **info}
            while len(self._runs) > self._keep:
                self._runs.pop(next(iter(self._runs)))

    def update(self, run_id: str, state: Mapping[str, Any]) -> None:
        """Record a step: latest state plus one (step, loss, lr) history point."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return
            previous = run["state"]
            run["state"] = dict(state)
            if "sample" not in state and "sample" in previous:
                run["state"]["sample"] = previous["sample"]  # the latest sample stays until a newer one
            run["history"].append({k: state[k] for k in ("step", "loss", "lr") if k in state})

    def set_validation(self, run_id: str, step: int, loss: float) -> None:
        """Record a held-out loss: on the step's history point and as the latest `val_loss`."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return
            run["state"] = {**run["state"], "val_loss": loss}
            for point in reversed(run["history"]):
                if point.get("step") == step:
                    point["val_loss"] = loss
                    break

    def set_sample(self, run_id: str, sample: Mapping[str, Any]) -> None:
        """Record the run's newest sample (e.g. a host's image reference with its step)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run["state"] = {**run["state"], "sample": dict(sample)}

    def finish(self, run_id: str, status: str, **summary: Any) -> None:
        """Mark a run done/cancelled/diverged/failed with a summary."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run["status"] = status
                run["summary"] = dict(summary)
                run["finished"] = time.time()

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A copy of one run's record (None if unknown)."""
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else {**run, "history": list(run["history"])}

    def runs(self) -> list[dict[str, Any]]:
        """Short records of every kept run, oldest first."""
        with self._lock:
            return [{k: v for k, v in r.items() if k != "history"} for r in self._runs.values()]


RUNS = RunRegistry()


# ----- reports ------------------------------------------------------------------------------
@dataclass
class StepReport:
    """What observers get after every optimizer step."""

    run_id: str
    step: int
    steps: int
    loss: float
    mse: float
    lr: float
    step_time: float
    eta: float
    grad_norm: float
    sample: Tensor | None = None  # (H, W, 3) in [0, 1], only on steps that made one
    sample_latent: Tensor | None = None
    samples: list[Tensor] = field(default_factory=list)  # every preview prompt's image (sample is the first)
    val_loss: float | None = None  # the held-out loss, on steps that measured it


@dataclass
class TrainResult:
    """A finished (or stopped) run."""

    run_id: str
    adapters: dict[str, ModuleAdapter]
    steps_done: int
    steps: int
    final_loss: float | None
    history: list[dict[str, float]]
    path: str | None
    partial: bool
    metadata: dict[str, str]
    last_sample: Tensor | None = None
    validation: list[dict[str, float]] = field(default_factory=list)  # held-out loss by step ({step, val})
