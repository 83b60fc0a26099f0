"""In-process ComfyUI: make the installed host importable, load nodes, run API-format graphs.

Usage (tests get this through the `comfy_host` fixture):

    from harness import comfy_host
    host = comfy_host.setup_host("/tmp/base")        # once per process
    result = comfy_host.run_prompt({"1": {...}, ...})
    assert result.ok, result.describe()
    image = result.outputs["8"][0]                   # node 8's first output (a tensor)

Everything follows what ComfyUI's own `main.py` does (checked against 0.3.75), minus the
HTTP server: `--cpu`, a base directory, `nodes.init_extra_nodes`, `execution.PromptExecutor`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]  # the repository (harness/ is one level down)
# TLORA_COMFY_DIR lets a developer point the harness at another ComfyUI checkout.
DEFAULT_COMFY_DIR = Path(os.environ.get("TLORA_COMFY_DIR", ROOT / ".host" / "ComfyUI"))
PACK_LINK_NAME = "ComfyUI-TLoRA"
# Model folders a base directory gets up front; the rest are created by ComfyUI on demand.
MODEL_SUBDIRS = ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "embeddings")

_state: dict[str, Any] = {"comfy_dir": None, "host": None, "executor_server": None}


class HostError(RuntimeError):
    """The ComfyUI host could not be prepared (missing install, module name clash, ...)."""


# --------------------------------------------------------------------------- importability

def comfy_dir() -> Path:
    """The ComfyUI installation this process uses (after `ensure_importable`), else the default."""
    return Path(_state["comfy_dir"] or DEFAULT_COMFY_DIR)


def host_version(cdir: Optional[os.PathLike] = None) -> tuple[int, ...]:
    """The installed ComfyUI's version as a tuple, e.g. (0, 12, 1), read from its comfyui_version.py.

    Read as text (nothing is imported), so tests can decide what to run before the host starts.
    """
    path = Path(cdir or comfy_dir()) / "comfyui_version.py"
    try:
        text = path.read_text()
    except OSError:
        return (0,)
    import re
    match = re.search(r"__version__\s*=\s*[\"']([0-9.]+)", text)
    return tuple(int(p) for p in match.group(1).split(".")) if match else (0,)


def host_label(cdir: Optional[os.PathLike] = None) -> str:
    """"ComfyUI 0.12.1" for messages and skip reasons."""
    return "ComfyUI " + ".".join(str(p) for p in host_version(cdir))


def _module_is_under(mod: Any, directory: Path) -> bool:
    """True when a module object was loaded from a file under `directory`."""
    f = getattr(mod, "__file__", None)
    if f is None:
        return False
    try:
        return Path(f).resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def ensure_importable(path: Optional[os.PathLike] = None) -> Path:
    """Put ComfyUI first on sys.path, force `--cpu`, and pin ComfyUI's `utils`; returns its dir.

    Idempotent. Does not import torch or model code itself, so callers may still tweak
    `comfy.cli_args.args` afterwards (before the first `import comfy.model_management`).
    """
    cdir = Path(path or _state["comfy_dir"] or DEFAULT_COMFY_DIR).resolve()
    if _state["comfy_dir"] is not None and Path(_state["comfy_dir"]) != cdir:
        raise HostError(f"ComfyUI already set up from {_state['comfy_dir']}, not {cdir}")
    if not (cdir / "main.py").is_file() or not (cdir / "comfy" / "cli_args.py").is_file():
        raise HostError(f"no ComfyUI at {cdir}: run `bash tools/bootstrap.sh` (or `make bootstrap`)")
    # Our repository root has a `nodes/` folder (a regular package, like ComfyUI's nodes.py
    # module): ComfyUI must come first on sys.path so that `import nodes` is ComfyUI's.
    # ComfyUI also ships a regular `tests` package, and a regular package wins over a
    # namespace one (our `tests/` has no __init__.py) wherever ComfyUI stands on sys.path:
    # after this call `import tests` is ComfyUI's unless ours is already in sys.modules. The
    # harness itself never imports `tests` (it is the product's package `harness`, found at
    # the repository root, which ComfyUI does not shadow); our test suite binds its own
    # `tests` package in tests/conftest.py, before anything can get here.
    for name in ("nodes", "utils", "server", "execution", "folder_paths"):
        mod = sys.modules.get(name)
        if mod is not None and not _module_is_under(mod, cdir):
            raise HostError(
                f"module {name!r} is already imported from {getattr(mod, '__file__', mod)!r}, not from "
                f"ComfyUI at {cdir}; call harness.comfy_host.ensure_importable() before anything imports it")
    if str(cdir) in sys.path:
        sys.path.remove(str(cdir))
    sys.path.insert(0, str(cdir))
    import comfy.options  # noqa: F401  (argument parsing stays off: args = parse_args([]))
    from comfy.cli_args import args
    # No GPU here, and model code reads args.cpu at import time: set it before anything else.
    args.cpu = True
    # ComfyUI's `utils` package (utils.install_util etc.) must win over any other `utils`
    # module a test directory or site-package might put on the path.
    import utils  # noqa: F401
    if not _module_is_under(sys.modules["utils"], cdir):
        raise HostError(f"`utils` resolved to {sys.modules['utils']!r}, not ComfyUI's package")
    _state["comfy_dir"] = str(cdir)
    return cdir


# --------------------------------------------------------------------------- base directory

def set_base_directory(base: os.PathLike, custom_nodes_dir: Optional[os.PathLike] = None) -> Path:
    """Point folder_paths' model/input/output/temp/user folders at `base` (created as needed).

    Works whether or not `folder_paths` is already imported: before the first import it sets
    `args.base_directory` (what `--base-directory` does); afterwards it rewrites the table.
    Custom nodes keep coming from the host's `custom_nodes` (where the pack is linked).
    """
    ensure_importable()
    base = Path(base).resolve()
    for sub in MODEL_SUBDIRS:
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    from comfy.cli_args import args
    if "folder_paths" not in sys.modules:
        args.base_directory = str(base)
    import folder_paths
    old_models = Path(folder_paths.models_dir)
    new_models = base / "models"
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name == "custom_nodes":
            continue
        moved = []
        for p in paths:
            pp = Path(p)
            if pp.is_relative_to(old_models):
                moved.append(str(new_models / pp.relative_to(old_models)))
            else:
                moved.append(p)
        folder_paths.folder_names_and_paths[name] = (moved, exts)
    folder_paths.base_path = str(base)
    folder_paths.models_dir = str(new_models)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    cn = Path(custom_nodes_dir) if custom_nodes_dir else comfy_dir() / "custom_nodes"
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(cn)], set())
    folder_paths.filename_list_cache.clear()
    return base


def models_dir(kind: str = "loras") -> Path:
    """First folder ComfyUI searches for `kind` (e.g. "loras", "checkpoints") in this process."""
    import folder_paths
    return Path(folder_paths.get_folder_paths(kind)[0])


# --------------------------------------------------------------------------- server stub

class StubPromptServer:
    """Stands in for `server.PromptServer.instance` when no HTTP server runs in this process.

    Records everything nodes and the executor send (`events`) so tests can assert on it.
    Custom nodes may register routes at import time; they land in `routes` and go nowhere.
    """

    def __init__(self) -> None:
        """Create an empty recorder with the attributes ComfyUI's executor and nodes touch."""
        from aiohttp import web
        self.client_id: Optional[str] = None
        self.last_node_id: Optional[str] = None
        self.last_prompt_id: Optional[str] = None
        self.sockets_metadata: dict = {}
        self.supports = ["custom_nodes_from_web"]
        self.routes = web.RouteTableDef()
        self.app = web.Application()
        self.prompt_queue = None
        self.loop = None
        self.number = 0
        self.on_prompt_handlers: list[Callable] = []
        self.events: list[tuple[Any, Any, Optional[str]]] = []

    def send_sync(self, event: Any, data: Any, sid: Optional[str] = None) -> None:
        """Record an event (what the real server would push over the websocket)."""
        self.events.append((event, data, sid))

    async def send(self, event: Any, data: Any, sid: Optional[str] = None) -> None:
        """Async variant of `send_sync`."""
        self.send_sync(event, data, sid)

    async def send_json(self, event: Any, data: Any, sid: Optional[str] = None) -> None:
        """Async JSON send, recorded."""
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: Any, node_id: Any, sid: Optional[str] = None) -> None:
        """Record a progress-text message."""
        self.send_sync("progress_text", {"text": text, "node_id": node_id}, sid)

    def queue_updated(self) -> None:
        """No queue here: nothing to announce."""

    def add_on_prompt_handler(self, handler: Callable) -> None:
        """Keep on-prompt handlers (run_prompt applies them like the server's /prompt does)."""
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict) -> dict:
        """Apply registered on-prompt handlers, as `PromptServer.trigger_on_prompt` does."""
        for handler in self.on_prompt_handlers:
            json_data = handler(json_data)
        return json_data

    def events_named(self, name: str) -> list[Any]:
        """Data of every recorded event called `name`."""
        return [d for e, d, _ in self.events if e == name]


def install_stub_server() -> Any:
    """Give `server.PromptServer.instance` a `StubPromptServer` unless a real one exists; returns it."""
    ensure_importable()
    import server
    inst = getattr(server.PromptServer, "instance", None)
    if inst is None:
        inst = StubPromptServer()
        server.PromptServer.instance = inst
    return inst


def _install_progress_hook(srv: Any) -> None:
    """Mirror main.py's `hijack_progress`: progress events, and Cancel raised from ProgressBar."""
    import comfy.model_management
    import comfy.utils
    if getattr(comfy.utils, "PROGRESS_BAR_HOOK", None) is not None:
        return

    def hook(value: Any, total: Any, preview_image: Any, prompt_id: Any = None, node_id: Any = None) -> None:
        """Check for interruption and record a progress event."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        srv.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                   "prompt_id": prompt_id or srv.last_prompt_id,
                                   "has_preview": preview_image is not None}, srv.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


# --------------------------------------------------------------------------- host setup

@dataclasses.dataclass
class HostInfo:
    """What `setup_host` did: paths, the stub server, and whether our pack imported."""

    comfy_dir: Path
    base_dir: Path
    server: Any
    pack_dir: Optional[Path]
    pack_status: str              # "loaded" | "failed" | "absent" (no __init__.py) | "skipped"
    pack_error: Optional[str]     # traceback text logged by ComfyUI when pack_status == "failed"
    pack_nodes: list[str]         # node ids registered from the pack
    extras_failed: list[str]      # comfy_extras modules that failed to import (ComfyUI's list)
    log: list[str]                # log records emitted while nodes were loaded

    def require_pack(self) -> None:
        """Raise (with ComfyUI's traceback) unless the pack imported; tests call pytest.skip on 'absent'."""
        if self.pack_status != "loaded":
            raise HostError(f"ComfyUI-TLoRA pack status: {self.pack_status}\n{self.pack_error or ''}")


class _ListHandler(logging.Handler):
    """Collects formatted log records."""

    def __init__(self) -> None:
        """Start with no records."""
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the formatted message."""
        try:
            self.records.append(record.getMessage())
        except Exception:  # a bad format string must not break node loading
            self.records.append(str(record.msg))


def find_pack_link(cdir: Optional[Path] = None) -> Optional[Path]:
    """The entry in the host's custom_nodes that points at this repository, if any."""
    cn = (cdir or comfy_dir()) / "custom_nodes"
    if not cn.is_dir():
        return None
    for entry in sorted(cn.iterdir()):
        try:
            if entry.resolve() == ROOT:
                return entry
        except OSError:
            continue
    return None


def pack_module_name(link: Optional[Path] = None) -> Optional[str]:
    """sys.modules key ComfyUI gives the pack (the path with '.' replaced, see nodes.load_custom_node)."""
    link = link or find_pack_link()
    return None if link is None else str(link).replace(".", "_x_")


def pack_module() -> Any:
    """The pack's root module as ComfyUI imported it in this process (None if not loaded)."""
    name = pack_module_name()
    return sys.modules.get(name) if name else None


def _run_coro(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code.

    When this thread already runs an event loop (Playwright's sync API keeps one alive for
    the browser tests' session), asyncio.run refuses: run it on a worker thread instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures  # noqa: PLC0415 - only on this path

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def setup_host(base_dir: os.PathLike, *, load_nodes: bool = True, load_custom_nodes: bool = True,
               comfy_path: Optional[os.PathLike] = None, threads: Optional[int] = None) -> HostInfo:
    """Prepare in-process ComfyUI once per process: importable, --cpu, base dir, stub server, nodes.

    `load_nodes` runs ComfyUI's own `nodes.init_extra_nodes` (built-in comfy_extras nodes, plus
    the custom_nodes folder when `load_custom_nodes`), API nodes off, as `--disable-api-nodes`.
    `threads` sets torch's intra-op threads (None: leave torch's default). Calling it again
    returns the first HostInfo (a process has one ComfyUI).
    """
    if _state["host"] is not None:
        return _state["host"]
    cdir = ensure_importable(comfy_path)
    if threads is not None:
        import torch
        torch.set_num_threads(max(1, int(threads)))
    base = set_base_directory(base_dir)
    srv = install_stub_server()
    import comfy.model_management  # noqa: F401  (first model-code import: after args.cpu)
    import comfy.utils  # noqa: F401
    import execution  # noqa: F401
    import nodes
    _install_progress_hook(srv)
    link = find_pack_link(cdir)
    handler = _ListHandler()
    extras_failed: list[str] = []
    if load_nodes:
        root_logger = logging.getLogger()
        root_logger.addHandler(handler)
        old_level = root_logger.level
        if old_level > logging.INFO or old_level == logging.NOTSET:
            root_logger.setLevel(logging.INFO)
        try:
            hook_breaker = None
            try:
                import hook_breaker_ac10a0 as hook_breaker  # main.py guards core functions the same way
                hook_breaker.save_functions()
            except ImportError:
                pass
            extras_failed = list(_run_coro(nodes.init_extra_nodes(init_custom_nodes=load_custom_nodes,
                                                                   init_api_nodes=False)) or [])
            if hook_breaker is not None:
                hook_breaker.restore_functions()
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(old_level)
    status, error, pack_nodes = _pack_status(link, handler.records, load_nodes and load_custom_nodes)
    if status == "failed":
        logging.getLogger(__name__).error("ComfyUI-TLoRA failed to import in-process:\n%s", error)
    info = HostInfo(comfy_dir=cdir, base_dir=base, server=srv, pack_dir=link, pack_status=status,
                    pack_error=error, pack_nodes=pack_nodes, extras_failed=extras_failed,
                    log=handler.records)
    _state["host"] = info
    return info


def _pack_status(link: Optional[Path], records: list[str], attempted: bool) -> tuple[str, Optional[str], list[str]]:
    """Classify the pack's import from nodes.LOADED_MODULE_DIRS and the captured log."""
    import nodes
    if link is None:
        return "absent", f"no entry in {comfy_dir() / 'custom_nodes'} points at {ROOT}", []
    if not attempted:
        return "skipped", None, []
    if not (ROOT / "__init__.py").is_file():
        return "absent", f"{ROOT}/__init__.py does not exist yet: ComfyUI cannot import the pack", []
    if link.name in getattr(nodes, "LOADED_MODULE_DIRS", {}):
        rel = f"custom_nodes.{link.name}"
        ids = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                     if getattr(v, "RELATIVE_PYTHON_MODULE", None) == rel)
        return "loaded", None, ids
    # ComfyUI logs the traceback, then "Cannot import <path> module for custom nodes: <e>".
    for i, rec in enumerate(records):
        if rec.startswith("Cannot import") and str(link) in rec:
            tb = records[i - 1] if i > 0 and "Traceback" in records[i - 1] else ""
            return "failed", f"{tb}\n{rec}".strip(), []
    return "failed", "ComfyUI did not load the pack and logged no reason", []


def host() -> HostInfo:
    """The HostInfo of this process (raises if `setup_host` has not run)."""
    if _state["host"] is None:
        raise HostError("call comfy_host.setup_host(base_dir) first")
    return _state["host"]


# --------------------------------------------------------------------------- running graphs

@dataclasses.dataclass
class PromptResult:
    """Outcome of `run_prompt`."""

    prompt_id: str
    ok: bool                                  # validated and executed without error
    validation_error: Optional[dict]          # validate_prompt's error dict (None when valid)
    node_errors: dict                         # per-node validation errors
    outputs: dict[str, list]                  # node id -> that node's output values (tensors, models...)
    ui: dict[str, dict]                       # node id -> UI output (what /history shows)
    messages: list[tuple[str, dict]]          # executor status messages (execution_start, ..._error)
    events: list[tuple[Any, Any, Any]]        # everything sent to the (stub) server during the run

    @property
    def error(self) -> Optional[dict]:
        """The execution_error (or execution_interrupted) message, if any."""
        for name, data in self.messages:
            if name in ("execution_error", "execution_interrupted"):
                return data
        return None

    @property
    def interrupted(self) -> bool:
        """True when the run was cancelled."""
        return any(name == "execution_interrupted" for name, _ in self.messages)

    def describe(self) -> str:
        """Human-readable failure summary for assertion messages."""
        if self.validation_error is not None:
            return f"validation failed: {self.validation_error}\nnode errors: {self.node_errors}"
        err = self.error
        if err is None:
            return "ok"
        tb = "".join(err.get("traceback", []) or [])
        return (f"{err.get('node_type')} (node {err.get('node_id')}) raised "
                f"{err.get('exception_type')}: {err.get('exception_message')}\n{tb}")


def validate(graph: dict, prompt_id: Optional[str] = None) -> tuple[bool, Optional[dict], list, dict]:
    """ComfyUI's `execution.validate_prompt` (async in 0.3.75, sync in older) -> (ok, error, outputs, node_errors)."""
    import execution
    fn = execution.validate_prompt
    nparams = len(inspect.signature(fn).parameters)
    pid = prompt_id or str(uuid.uuid4())
    res = fn(pid, graph, None) if nparams >= 3 else fn(graph)
    if inspect.isawaitable(res):
        res = _run_coro(res)
    return tuple(res)  # type: ignore[return-value]


def new_executor(cache: str = "classic") -> Any:
    """A fresh `execution.PromptExecutor` bound to the stub server ("classic"/"none"/"lru")."""
    import execution
    srv = host().server
    ct = {"classic": execution.CacheType.CLASSIC, "none": execution.CacheType.NONE,
          "lru": execution.CacheType.LRU}[cache]
    try:
        # The keys main.py passes (0.33 reads "ram_inactive" too; older hosts ignore what they do not read).
        return execution.PromptExecutor(srv, cache_type=ct, cache_args={"lru": 8 if cache == "lru" else 0, "ram": 0,
                                                                       "ram_inactive": 0})
    except TypeError:  # older signature without cache_args
        return execution.PromptExecutor(srv, cache_type=ct)


def _cached_outputs(executor: Any, node_ids: Iterable[str]) -> dict[str, list]:
    """Read each node's outputs back from the executor's output cache."""
    out: dict[str, list] = {}
    for nid in node_ids:
        try:
            entry = executor.caches.outputs.get(nid)
        except Exception:
            entry = None
        if inspect.isawaitable(entry):
            entry = _run_coro(entry)
        if entry is None:
            continue
        values = getattr(entry, "outputs", entry)  # CacheEntry(ui, outputs) in 0.3.75; a list before
        # Each output is a list over ComfyUI's list-execution; plain nodes give one item.
        out[str(nid)] = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
    return out


def run_prompt(graph: dict, *, client_id: Optional[str] = None, executor: Any = None,
               extra_data: Optional[dict] = None, prompt_id: Optional[str] = None,
               outputs: Optional[list[str]] = None) -> PromptResult:
    """Validate and execute an API-format graph in this process, like the server's worker does.

    Uses a fresh executor (no cache from earlier runs) unless `executor` is given. `outputs`
    restricts which output nodes run (default: every OUTPUT_NODE that validates). ComfyUI
    refuses graphs without an output node and runs only what output nodes depend on; the
    values of every node that ran come back in `PromptResult.outputs` (add a PreviewImage or
    PreviewAny to reach a node whose result you want).
    """
    h = host()
    srv = h.server
    pid = prompt_id or str(uuid.uuid4())
    if hasattr(srv, "trigger_on_prompt") and srv.on_prompt_handlers:
        graph = srv.trigger_on_prompt({"prompt": graph, "client_id": client_id}).get("prompt", graph)
    ok, err, good_outputs, node_errors = validate(graph, pid)
    if not ok:
        return PromptResult(pid, False, err, node_errors, {}, {}, [], [])
    ex = executor or new_executor()
    extra = dict(extra_data or {})
    if client_id is not None:
        extra["client_id"] = client_id
    start = len(getattr(srv, "events", []))
    srv.last_prompt_id = pid
    ex.execute(graph, pid, extra, list(outputs) if outputs is not None else list(good_outputs))
    hist = getattr(ex, "history_result", {}) or {}
    events = list(getattr(srv, "events", [])[start:])
    return PromptResult(pid, bool(ex.success) and not any(
        n in ("execution_error", "execution_interrupted") for n, _ in ex.status_messages),
        None, node_errors, _cached_outputs(ex, graph.keys()), dict(hist.get("outputs", {})),
        list(ex.status_messages), events)


def node_class(class_type: str) -> Any:
    """The registered node class for `class_type` (KeyError lists close matches)."""
    import nodes
    try:
        return nodes.NODE_CLASS_MAPPINGS[class_type]
    except KeyError:
        close = [k for k in nodes.NODE_CLASS_MAPPINGS if class_type.lower() in k.lower()][:10]
        raise KeyError(f"node {class_type!r} not registered; similar: {close}") from None


def free_models() -> None:
    """Unload every model ComfyUI keeps loaded (what POST /free does), then collect garbage."""
    import gc
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def interrupt(value: bool = True) -> None:
    """Request cancellation of the running in-process prompt (what POST /interrupt does)."""
    import nodes
    nodes.interrupt_processing(value)
