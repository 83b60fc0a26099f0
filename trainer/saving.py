"""What a run writes: the adapter file with its metadata and the training-state sidecar, atomically.

Part of the Trainer (trainer/loop.py), split out by topic: `Saving` is one of its bases.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
from typing import Any

from ..tlora import format as tformat
from ..tlora.adapter import ModuleAdapter
from ..tlora.fileio import atomic_write
from .ema import WEIGHTS_KEY
from .optim import canonical_state
from .outputs import claim_output
from .runs import TrainResult
from .state import TrainState, state_path_for


class Saving:
    """The Trainer's file, metadata and state sidecar."""

    def current_adapters(self) -> dict[str, ModuleAdapter]:
        """The adapters the file holds, keyed by file prefix (float32, CPU): the EMA when one is kept."""
        with self.file_weights():
            return {key: module.to_adapter() for key, module in self.modules.items()}

    def file_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights the file holds in the modules while the block runs: the EMA's when one is kept."""
        ema = getattr(self, "_ema", None)
        return ema.swapped_in() if ema is not None and not getattr(self, "_raw_weights", False) \
            else contextlib.nullcontext()

    def _train_metadata(self, partial: bool, reason: str | None) -> dict[str, str]:
        """Settings, what this run did, and the host's facts, as the file's string metadata."""
        cfg = self.settings
        final = self.history[-1]["loss"] if self.history else None
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        meta = cfg.metadata()
        meta.update({
            "tlora.train.steps": str(self.step),
            "tlora.train.partial": "true" if partial else "false",
            "tlora.train.final_loss": "" if final is None else f"{final:.6g}",
            "tlora.train.dataset_size": str(len(self.data.instance)),
            "tlora.train.time": now,
            "tlora.train.run_id": self.run_id,
            "tlora.train.run_token": self.run_token,
            "tlora.train.prediction": self.schedule.prediction,
            "ss_steps": str(self.step),
            "ss_num_train_images": str(len(self.data.instance)),
            "ss_training_finished_at": now,
        })
        if self.output_path:
            meta["ss_output_name"] = os.path.splitext(os.path.basename(self.output_path))[0]
        if self.data.prior or self.data.generate_prior:
            meta["tlora.train.prior_loss_weight"] = repr(cfg.prior_loss_weight)
            meta["tlora.train.num_class_images"] = str(max(len(self.data.prior), self.data.generate_prior))
        if reason:
            meta["tlora.train.stopped"] = reason
        if self._ema is not None:
            meta[WEIGHTS_KEY] = ("trained: the run diverged, so the moving average (which took in its last steps) "
                                 "was not kept" if self._raw_weights else self._ema.describe())
        if self._validation:
            last = self._validation[-1]
            meta["tlora.train.validation_loss"] = f"{last['val']:.6g}"
            meta["tlora.train.validation_images"] = str(len(self.validation_examples))
        meta.update({k: str(v) for k, v in self.metadata.items()})
        return meta

    def file_config(self) -> dict[str, Any]:
        """The file's tlora.config: the settings' part plus the host's (e.g. the architecture)."""
        return {**self.settings.file_config(), **self.binding.file_config}

    def save(self, path: str, partial: bool, reason: str | None = None, state: bool = True) -> dict[str, str]:
        """Adapter file + state sidecar (state=False: none), both atomic (the main process only); returns the
        metadata written."""
        metadata = self._train_metadata(partial, reason)
        if not self.dist.is_main:
            return metadata
        sidecar = None
        if state:
            cfg = self.settings
            extra = {"history": self.history[-10000:], "total_steps": cfg.steps, "lr_schedule": cfg.lr_schedule,
                     "seed": int(cfg.seed), "optimizer": cfg.optimizer,
                     "lr_scales": [cfg.transform_lr_scale, cfg.residual_lr_scale],
                     "validation": self._validation[-10000:]}
            if self._ema is not None:
                extra["ema_updates"] = self._ema.updates
            sidecar = TrainState(self.step, self.run_token, canonical_state(self._optimizer, self._params),
                                 self._scheduler.state_dict(), self._gen_state, [n for n, _ in self._ordered_params()],
                                 self._scaler.state_dict() if self._scaler is not None else None, extra,
                                 self._ema.state() if self._ema is not None else {}).to_bytes()
        ours = self.output_path is not None and os.path.abspath(path) == os.path.abspath(self.output_path)
        if ours and not self._claimed:
            # A new run's first file claims its name: if another run wrote that name since this
            # one started, this run takes the next free name instead of replacing that file.
            path = self.output_path = claim_output(path, lambda p: tformat.save_file(
                self.current_adapters(), p, metadata={**metadata, "ss_output_name": _stem(p)},
                config=self.file_config(), replace=False))
            self._claimed = True
            metadata = {**metadata, "ss_output_name": _stem(path)}
            if sidecar is not None:
                atomic_write(state_path_for(path), sidecar)
        else:
            # Sidecar first: a crash in between leaves a newer sidecar, which resume detects
            # (step/run token mismatch) and then falls back to the adapter's weights.
            if sidecar is not None:
                atomic_write(state_path_for(path), sidecar)
            tformat.save_file(self.current_adapters(), path, metadata=metadata, config=self.file_config())
        if ours:
            self.saved_path = path
        return metadata

    def _finish(self, partial: bool) -> TrainResult:
        # The adapter after the last step is the one no training step has run: checked before it is kept.
        with self.file_weights():
            finite = self._outputs_finite()
        if not finite:
            self._diverged("output of the final adapter", float("nan"), at_step=self.step)
        metadata = self._train_metadata(partial, None)
        if self.output_path:
            metadata = self.save(self.output_path, partial=partial)
        return TrainResult(self.run_id, self.current_adapters(), self.step, self.settings.steps,
                           self.history[-1]["loss"] if self.history else None, list(self.history),
                           self.output_path, partial, metadata, self.last_sample, list(self._validation))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
