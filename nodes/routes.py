"""HTTP routes for the web UI: adapter cards (`/tlora/adapter`) and training runs (`/tlora/runs`).

Every answer is JSON. Names are accepted only when ComfyUI's own `loras` list offers them
and the file really lies inside a `loras` folder (a symlink pointing elsewhere is refused).
Refusals never echo paths, exception text with paths, or stack traces.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import folder_paths
from aiohttp import web

from ..trainer import previews
from .display import ABS_PATH, short_config, short_metadata, short_value

log = logging.getLogger("ComfyUI-TLoRA")

PREFIX = "/tlora"
# Run ids the trainer makes: "<unix time>-<hex>" (ComfyUI glue) or 12 hex digits (engine default).
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_NAME = 512
_registered = False


class Refused(Exception):
    """A request the routes answer with a 4xx and a fixed, path-free message."""

    def __init__(self, status: int, message: str):
        """Keep the status and the public message."""
        super().__init__(message)
        self.status, self.message = status, message


# ----- names and paths ----------------------------------------------------------------------
def _loras_roots() -> list[str]:
    """Real paths of every configured `loras` folder."""
    return [os.path.realpath(p) for p in folder_paths.get_folder_paths("loras")]


def _inside(path: str, roots: list[str]) -> bool:
    """True when `path` (already a real path) lies inside one of `roots`."""
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root and path != root:
                return True
        except ValueError:  # different drives on Windows
            continue
    return False


def safe_lora_path(name: Any) -> str:
    """The real path of a name from the `loras` list that resolves inside a `loras` folder; Refused otherwise."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or "\x00" in name:
        raise Refused(400, "invalid adapter name")
    # The list is the allow-list: traversal, absolute paths and decoded separators never match it.
    if name not in folder_paths.get_filename_list("loras"):
        raise Refused(404, "unknown adapter")
    full = folder_paths.get_full_path("loras", name)
    if not full:
        raise Refused(404, "unknown adapter")
    real = os.path.realpath(full)
    if not _inside(real, _loras_roots()) or not os.path.isfile(real):
        raise Refused(404, "unknown adapter")
    return real


def public_file_name(path: Any) -> str | None:
    """A file's name as the `loras` list shows it (or its base name): never a full path."""
    if not isinstance(path, str) or not path:
        return None
    real = os.path.realpath(path)
    for root in _loras_roots():
        if _inside(real, [root]):
            return os.path.relpath(real, root).replace(os.sep, "/")
    return os.path.basename(path)


def scrub_message(text: str, path: str, name: str) -> str:
    """An error message with the file's path replaced by its name; generic if any other path remains."""
    out = str(text).replace(path, name)
    return "this file could not be read" if ABS_PATH.search(out) else out[:300]


def jsonable(value: Any) -> Any:
    """Plain JSON types only; NaN/inf become None (browsers' JSON.parse rejects them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ----- adapter info -------------------------------------------------------------------------
def _plain_file_info(name: str, real: str) -> dict[str, Any]:
    """What we can tell about an adapter that is not TLoRA (LoRA, LoHa, ...: the block-weight node takes them)."""
    info: dict[str, Any] = {"name": name, "tlora": False, "file_bytes": os.path.getsize(real)}
    if real.lower().endswith(".safetensors"):
        try:
            from safetensors import safe_open  # noqa: PLC0415
            with safe_open(real, framework="pt") as handle:
                meta = handle.metadata() or {}
                info["tensors"] = len(list(handle.keys()))
            info["architecture"] = short_value(meta.get("modelspec.architecture") or meta.get("ss_base_model_version")
                                               or "unknown", 80)
            keep = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                    "ss_resolution", "ss_max_train_steps", "ss_steps", "ss_output_name", "ss_training_comment")
            info["training"] = short_metadata({k: meta[k] for k in keep if k in meta})
        except Exception:  # a broken file still gets its size on the card
            info["architecture"] = "unknown"
    return info


def adapter_info(name: str) -> dict[str, Any]:
    """The card of one adapter from the `loras` list (Refused for anything else)."""
    real = safe_lora_path(name)
    from . import apply, loader_nodes  # noqa: PLC0415  (needs ComfyUI's model code: import late)

    if not apply.is_tlora_file(real):
        return jsonable(_plain_file_info(name, real))
    try:
        info = loader_nodes.describe(name)
    except Exception as err:
        raise Refused(422, scrub_message(str(err), real, name)) from None
    info = dict(info)
    info["tlora"] = True
    info["training"] = short_metadata(info.get("training", {}))
    info["config"] = short_config(info.get("config"))
    info["architecture"] = short_value(info.get("architecture", "unknown"), 80)
    info["partial"] = info["training"].get("tlora.train.partial") == "true"
    return jsonable(info)


# ----- runs ---------------------------------------------------------------------------------
def _registry() -> Any:
    """The trainer's run registry (imported late: the trainer pulls in torch)."""
    from ..trainer import runs  # noqa: PLC0415
    return runs.RUNS


def _latest_sample(run_id: str) -> dict[str, Any] | None:
    """The newest preview the ComfyUI binding wrote for this run (a /view reference with its step), if any."""
    return previews.latest_preview(folder_paths.get_temp_directory(), run_id)


def _file_summary(file_name: str | None) -> dict[str, Any]:
    """Parameter count, size and partial flag of a run's saved file (empty if it is not in the list)."""
    if not file_name:
        return {}
    try:
        info = adapter_info(file_name)
    except Exception:
        return {}
    return {"params": info.get("params"), "file_bytes": info.get("file_bytes"), "modules": info.get("modules"),
            "partial": info.get("partial"), "kinds": info.get("kinds")}


# What of a registry record may leave the server (an allow-list: new registry fields, such as
# full paths or the whole prompt, stay private until added here on purpose).
RUN_FIELDS = ("run_id", "status", "started", "finished", "steps", "start_step", "loss_kind", "node", "prompt_id")
STATE_FIELDS = ("step", "steps", "loss", "mse", "lr", "step_time", "eta", "grad_norm")
SUMMARY_FIELDS = ("steps_done", "final_loss", "partial", "message")


def _sample_ref(value: Any) -> dict[str, Any] | None:
    """A /view reference made of plain names only, with its step and URL (rebuilt here, never passed through)."""
    if not isinstance(value, Mapping):
        return None
    name, sub, kind = (str(value.get(k, "")) for k in ("filename", "subfolder", "type"))
    if not name or name != os.path.basename(name) or "\\" in name or ".." in sub or os.path.isabs(sub) \
            or "\\" in sub or "\x00" in name + sub or kind not in ("temp", "output"):
        return None
    ref: dict[str, Any] = {"filename": name, "subfolder": sub, "type": kind, "url": previews.view_url(name, sub, kind)}
    step = value.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        ref["step"] = step
    return ref


def _public_message(value: Any) -> str | None:
    """An error message fit to leave the server: absolute paths replaced by their last part."""
    if value is None:
        return None
    text = str(value)[:500]
    return ABS_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/\\")) or "…", text)


def public_run(run: Mapping[str, Any], with_history: bool = True, since: int = 0) -> dict[str, Any]:
    """A registry record made safe to send: allow-listed fields, file names instead of paths, the saved file summarised."""
    out: dict[str, Any] = {k: run[k] for k in RUN_FIELDS if k in run}
    out["file"] = public_file_name(run.get("path")) or public_file_name(run.get("file_name"))
    raw_state = dict(run.get("state") or {})
    state = {k: raw_state[k] for k in STATE_FIELDS if k in raw_state}
    sample = _sample_ref(raw_state.get("sample"))
    if sample is None and with_history and isinstance(run.get("run_id"), str) and _RUN_ID.match(run["run_id"]):
        sample = _latest_sample(run["run_id"])
    if sample is not None:
        state["sample"] = sample
    out["state"] = state
    raw_summary = dict(run.get("summary") or {})
    summary = {k: raw_summary[k] for k in SUMMARY_FIELDS if k in raw_summary}
    if "message" in summary:
        summary["message"] = _public_message(summary["message"])
    if run.get("status") != "running":
        if "file_name" in raw_summary:  # the file this run saved (None: it saved nothing)
            saved = raw_summary["file_name"]
            summary["file"] = os.path.basename(saved) if isinstance(saved, str) and saved else None
        else:  # records of older trainers
            summary["file"] = public_file_name(raw_summary.get("path")) or out["file"]
        # The registry knows how the run ended; the file adds its size and parameter count.
        for key, value in _file_summary(summary["file"]).items():
            if value is not None:
                summary.setdefault(key, value)
    out["summary"] = summary
    if with_history:
        out["history"] = [{k: h[k] for k in ("step", "loss", "mse", "lr", "val_loss") if k in h}
                          for h in run.get("history", []) if h.get("step", 0) > since]
    return jsonable(out)


# ----- handlers -----------------------------------------------------------------------------
def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _guarded(work: Any, *args: Any) -> web.Response:
    """Run blocking `work` off the event loop; map Refused to its 4xx and anything else to a bare 500."""
    try:
        return web.json_response(await asyncio.to_thread(work, *args))
    except Refused as err:
        return _error(err.status, err.message)
    except Exception:
        log.exception("TLoRA: web route failed")  # details stay in the server log
        return _error(500, "internal error")


async def get_adapter(request: web.Request) -> web.Response:
    """GET /tlora/adapter?name=<name from the loras list>: the adapter card."""
    names = request.query.getall("name", [])
    if len(names) != 1:
        return _error(400, "give exactly one name")
    return await _guarded(adapter_info, names[0])


async def list_runs(request: web.Request) -> web.Response:
    """GET /tlora/runs: every kept run, newest last, without loss histories."""
    return await _guarded(lambda: {"runs": [public_run(r, with_history=False) for r in _registry().runs()]})


async def get_run(request: web.Request) -> web.Response:
    """GET /tlora/runs/<run_id>[?since=<step>]: one run with its loss history (after `since`)."""
    run_id = request.match_info.get("run_id", "")
    if not _RUN_ID.match(run_id):
        return _error(400, "invalid run id")
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        return _error(400, "since must be an integer")

    def work() -> dict[str, Any]:
        run = _registry().get(run_id)
        if run is None:
            raise Refused(404, "unknown run")
        return public_run(run, since=since)

    return await _guarded(work)


def register(server: Any = None) -> bool:
    """Add the routes to ComfyUI's PromptServer (once); False when there is no server to add them to."""
    global _registered
    if _registered:
        return True
    if server is None:
        try:
            import server as comfy_server  # noqa: PLC0415
            server = getattr(comfy_server.PromptServer, "instance", None)
        except Exception:
            return False
    routes = getattr(server, "routes", None)
    if routes is None or not hasattr(routes, "get"):
        return False  # in-process test hosts have a stub server without HTTP
    # A second import of the pack must not add duplicates (aiohttp refuses them at start-up).
    if any(getattr(r, "path", None) == f"{PREFIX}/adapter" for r in routes):
        _registered = True
        return True
    routes.get(f"{PREFIX}/adapter")(get_adapter)
    routes.get(f"{PREFIX}/runs")(list_runs)
    routes.get(PREFIX + "/runs/{run_id}")(get_run)
    _registered = True
    return True
