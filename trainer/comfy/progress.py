"""ComfyUI progress for a run: the node's progress bar and preview, `tlora.train` events, cancel checks."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

import comfy.model_management as mm
import comfy.utils
import folder_paths

from .. import previews
from ..loop import TrainingDiverged
from ..runs import RUNS, RunRegistry, StepReport
from ..settings import TrainSettings

log = logging.getLogger("ComfyUI-TLoRA")
EVENT = "tlora.train"


def _server() -> Any:
    try:
        import server
        return getattr(server.PromptServer, "instance", None)
    except Exception:
        return None


def send_event(data: Mapping[str, Any]) -> None:
    """`tlora.train` to the web UI (no-op without a server, never fails the run)."""
    srv = _server()
    if srv is None:
        return
    try:
        srv.send_sync(EVENT, dict(data), getattr(srv, "client_id", None))
    except Exception as err:  # a UI hiccup must not cost a training run
        log.debug("TLoRA: could not send %s: %s", EVENT, err)


def save_preview(image: Tensor, run_id: str, step: int, index: int = 0) -> dict[str, Any] | None:
    """Write a sample to ComfyUI's temp folder; the /view reference the UI can show (with its step)."""
    try:
        folder = os.path.join(folder_paths.get_temp_directory(), previews.SUBFOLDER)
        os.makedirs(folder, exist_ok=True)
        name = previews.preview_name(run_id, step, index)
        to_pil(image).save(os.path.join(folder, name))
        return previews.preview_ref(name, step)
    except Exception as err:
        log.debug("TLoRA: preview not saved: %s", err)
        return None


def current_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing (None outside an execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except Exception:  # older hosts without the context helper: the server's last prompt
        get_executing_context = None
    if get_executing_context is not None:
        try:
            context = get_executing_context()
        except Exception:
            context = None
        value = getattr(context, "prompt_id", None)
        return str(value) if value else None  # a direct call outside an execution has none
    srv = _server()
    value = getattr(srv, "last_prompt_id", None) if srv is not None else None
    return str(value) if isinstance(value, str) and value else None


def to_pil(image: Tensor) -> Any:
    """(H, W, 3) in [0, 1] -> PIL image."""
    from PIL import Image
    return Image.fromarray((image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))


class ComfyProgress:
    """Engine observer: UI progress bar (with the latest sample as preview), events, cancel checks."""

    def __init__(self, steps: int, node_id: str | None, run_id: str, registry: RunRegistry | None = None):
        self.bar = comfy.utils.ProgressBar(steps, node_id=node_id) if node_id is not None else comfy.utils.ProgressBar(steps)
        self.node_id, self.run_id = node_id, run_id
        self.registry = registry if registry is not None else RUNS
        self.preview = None  # the latest sample, as ComfyUI's preview tuple
        self.sample_ref: dict[str, Any] | None = None

    def __call__(self, report: StepReport) -> None:
        new_preview = ref = None
        if report.sample is not None:
            pil = to_pil(report.sample)
            # ComfyUI fits previews into max_size (up or down): never blow a small sample up.
            self.preview = new_preview = ("JPEG", pil, min(512, max(pil.size)))
            ref = save_preview(report.sample, report.run_id, report.step)
            if ref is not None:
                self.sample_ref = ref
                self.registry.set_sample(report.run_id, ref)
        # Every preview prompt's image (the first is `sample`), and the held-out loss on steps that took it.
        samples = [ref] if ref is not None else []
        for index, image in enumerate(report.samples[1:], start=1):
            extra = save_preview(image, report.run_id, report.step, index)
            if extra is not None:
                samples.append(extra)
        send_event({"node": self.node_id, "run_id": report.run_id, "step": report.step, "steps": report.steps,
                    "loss": report.loss, "mse": report.mse, "lr": report.lr, "step_time": report.step_time,
                    "eta": report.eta, "grad_norm": report.grad_norm if math.isfinite(report.grad_norm) else None,
                    **({"sample": dict(ref)} if report.sample is not None and ref is not None else {}),
                    **({"samples": samples} if len(samples) > 1 else {}),
                    **({"val_loss": report.val_loss} if report.val_loss is not None else {})})
        # A new sample becomes the node's progress-bar preview (the frontend keeps showing it
        # until the next one). ProgressBar's hook raises the user's Cancel in a server; the
        # explicit check covers in-process runs whose hook is not installed.
        self.bar.update_absolute(report.step, report.steps, new_preview)
        mm.throw_exception_if_processing_interrupted()


def report_end(err: BaseException, registry: RunRegistry, run_id: str, run_info: Mapping[str, Any],
               settings: TrainSettings) -> None:
    """A run raised: make sure the registry says how it ended, and tell the web UI (never raises)."""
    try:
        if isinstance(err, (mm.InterruptProcessingException, KeyboardInterrupt)):
            status = "cancelled"
        elif isinstance(err, TrainingDiverged):
            status = "diverged"
        else:
            status = "failed"
        record = registry.get(run_id)
        if record is None:
            # It failed before training started (images, captions, resume file...).
            registry.start(run_id, **{**run_info, "steps": settings.steps, "start_step": 0, "loss_kind": settings.loss})
            registry.finish(run_id, status, steps_done=0, final_loss=None, partial=True, file_name=None,
                            message=(str(err) or type(err).__name__)[:500] if status != "cancelled" else None)
            record = registry.get(run_id)
        elif record.get("status") == "running":
            registry.finish(run_id, status, **{**record.get("summary", {}), "partial": True})
            record = registry.get(run_id)
        summary = dict((record or {}).get("summary") or {})
        status = (record or {}).get("status", status)
        event = {"node": run_info.get("node"), "run_id": run_id, "status": status,
                 "step": summary.get("steps_done", 0), "steps": settings.steps,
                 "steps_done": summary.get("steps_done", 0), "file": summary.get("file_name"),
                 "partial": True, "loss": summary.get("final_loss")}
        if status in ("diverged", "failed"):
            event["message"] = summary.get("message") or (str(err) or type(err).__name__)[:500]
        send_event(event)
    except Exception as report_err:  # the original error matters more
        log.debug("TLoRA: could not report the end of run %s: %s", run_id, report_err)
