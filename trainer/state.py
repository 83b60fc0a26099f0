"""The training-state sidecar beside an adapter file: what exact resume needs (never pickle)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from ..tlora import format as tformat
from ..tlora.errors import TLoRAError
from ..tlora.fileio import parse_json
from .settings import TrainingError

STATE_VERSION = "1"
STATE_SUFFIX = ".tlora-state"


def state_path_for(adapter_path: str) -> str:
    """The training-state sidecar beside an adapter file (`name.safetensors` -> `name.tlora-state`).

    Not `.safetensors`, so ComfyUI's `loras` list never offers it as an adapter.
    """
    root, ext = os.path.splitext(adapter_path)
    return (root if ext.lower() == ".safetensors" else adapter_path) + STATE_SUFFIX


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TrainState:
    """What exact resume needs besides the adapter: optimizer, scheduler, RNG, step."""

    step: int
    run_token: str
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: Tensor
    param_names: list[str]
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Other tensors a run keeps (the adapter's EMA and, when the file holds the EMA, the trained weights).
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors as tensors, everything else as JSON metadata (no pickle)."""
        tensors: dict[str, Tensor] = {"rng.generator": self.generator.clone()}
        tensors.update({f"keep.{k}": v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()})
        state = {}
        for index, entry in self.optimizer["state"].items():
            plain = {}
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    plain[key] = value
            state[str(index)] = plain
        meta = {
            "tlora.state.version": STATE_VERSION,
            "step": str(self.step),
            "run_token": self.run_token,
            "param_names": json.dumps(self.param_names),
            "optimizer.param_groups": json.dumps(_jsonable(self.optimizer["param_groups"])),
            "optimizer.plain_state": json.dumps(_jsonable(state)),
            "scheduler": json.dumps(_jsonable(self.scheduler)),
            "scaler": json.dumps(_jsonable(self.scaler)) if self.scaler is not None else "null",
            "extra": json.dumps(_jsonable(self.extra)),
        }
        return _st_save(tensors, metadata=meta)

    @classmethod
    def read(cls, path: str) -> "TrainState":
        """Parse a sidecar written by to_bytes (TrainingError if it is not one)."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
            meta = tformat.read_header(path)[0].get("__metadata__", {})
            tensors = _st_load(raw)
            if meta.get("tlora.state.version") != STATE_VERSION:
                raise ValueError(f"unknown state version {meta.get('tlora.state.version')!r}")
            plain = parse_json(meta["optimizer.plain_state"])
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, entry in plain.items():
                state.setdefault(int(index), {}).update(entry)
            return cls(step=int(meta["step"]), run_token=meta["run_token"],
                       optimizer={"state": state, "param_groups": parse_json(meta["optimizer.param_groups"])},
                       scheduler=parse_json(meta["scheduler"]), generator=tensors["rng.generator"],
                       param_names=parse_json(meta["param_names"]), scaler=parse_json(meta["scaler"]),
                       extra=parse_json(meta["extra"]),
                       tensors={k[5:]: v for k, v in tensors.items() if k.startswith("keep.")})
        except (OSError, KeyError, ValueError, TLoRAError) as err:
            # The file's own name, never the folder: messages reach the UI and the history.
            name = os.path.basename(path)
            reason = str(err).replace(path, name)
            raise TrainingError(f"training state {name} is unreadable ({reason}); delete it to continue "
                                f"from the adapter's weights only") from None


def _check_same_kinds(file_name: str, key: str, asked: Any, found: Any) -> None:
    """A resumed run trains what the file holds: refuse settings that ask for other kinds or shapes.

    Following the file silently would write metadata (tlora.config) describing tensors the
    file does not have.
    """
    for part in ("transform", "residual"):
        want, have = str(getattr(asked, part)), str(getattr(found, part))
        if want != have:
            raise TrainingError(f"cannot resume from {file_name}: it was trained with {part} {have}, this run "
                                f"asks for {want} (module {key}); set {part} to {have} to continue it, or "
                                f"start a new run")
    shapes = {k: tuple(v.shape) for k, v in asked.tensors.items()}
    if shapes != {k: tuple(v.shape) for k, v in found.tensors.items()}:
        raise TrainingError(f"cannot resume from {file_name}: its cores are factored differently from this "
                            f"run's (module {key}: another `shapes` preset?); use the settings it was trained with")


def load_resume(path: str, groups: Sequence[Any]) -> tuple[TrainState | None, int, str | None]:
    """Put the resume file's adapters into the groups (replacing fresh ones); read its sidecar.

    Returns (the sidecar's state if it matches the file, the file's step count, a note when
    training goes on from the weights only).
    """
    try:
        loaded = tformat.load(path)
    except TLoRAError as err:  # the file's name only: the message reaches the UI and the history
        raise TrainingError(f"cannot resume from {os.path.basename(path)}: "
                            f"{str(err).replace(path, os.path.basename(path))}") from None
    for group in groups:
        for p in list(group.adapters):
            key = group.file_key(p)
            if key not in loaded.adapters:
                raise TrainingError(f"cannot resume from {os.path.basename(path)}: it has no adapter for "
                                    f"{key} (was it trained with other targets or on another model?)")
            adapter = loaded.adapters[key]
            adapter.check_fits(tuple(group.root.get_submodule(p).weight.shape))
            _check_same_kinds(os.path.basename(path), key, group.adapters[p], adapter)
            group.adapters[p] = adapter
    extra = set(loaded.adapters) - {g.file_key(p) for g in groups for p in g.adapters}
    if extra:
        raise TrainingError(f"cannot resume from {os.path.basename(path)}: it adapts {len(extra)} modules "
                            f"this run does not target (e.g. {sorted(extra)[0]}); pick the same targets")
    steps_in_file = int(loaded.metadata.get("tlora.train.steps", "0") or 0)
    sidecar = state_path_for(path)
    if os.path.exists(sidecar):
        state = TrainState.read(sidecar)
        if state.step == steps_in_file and state.run_token == loaded.metadata.get("tlora.train.run_token"):
            return state, 0, None
        note = (f"training state {os.path.basename(sidecar)} is from step {state.step}, the adapter from "
                f"step {steps_in_file}: continuing from the adapter's weights with a fresh optimizer")
    else:
        note = (f"no training state beside {os.path.basename(path)}: continuing from its weights with "
                f"a fresh optimizer")
    return None, steps_in_file, note
