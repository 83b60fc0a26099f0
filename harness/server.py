"""ComfyUI as a real server in a subprocess: start, wait, talk HTTP/websocket, stop, read its log.

    from harness.server import ComfyServer
    with ComfyServer(base_dir, checkpoints={"tiny.safetensors": ckpt}) as srv:
        pid = srv.post_prompt(graph, client_id="c1")
        entry = srv.wait_history(pid, timeout=60)      # /history/<pid> entry, raises on timeout
        assert history_ok(entry), history_error(entry)

The process runs `main.py --cpu --listen 127.0.0.1 --port N --base-directory B
--database-url sqlite:///B/comfy.db --disable-api-nodes --disable-auto-launch` from the host
ComfyUI with the repository's venv python; stdout+stderr go to B/comfy.log. HTTP uses the
standard library; the websocket reader uses aiohttp (a ComfyUI requirement).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]  # the repository (harness/ is one level down)
DEFAULT_COMFY_DIR = Path(os.environ.get("TLORA_COMFY_DIR", ROOT / ".host" / "ComfyUI"))
PACK_LINK_NAME = "ComfyUI-TLoRA"


class ServerError(RuntimeError):
    """The server failed to start, died, or did not answer; the message ends with its log tail."""


class PromptRejected(ServerError):
    """POST /prompt answered 400 (validation failed); `.response` holds error and node_errors."""

    def __init__(self, response: dict) -> None:
        """Keep the server's JSON answer."""
        self.response = response
        super().__init__(f"prompt rejected: {json.dumps(response, indent=1)[:4000]}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_python() -> str:
    """The python that runs ComfyUI subprocesses: this interpreter when it is a virtualenv's.

    Each ComfyUI host has an environment of its own (.venv for 0.33.0, .venv-comfy-0.12 for
    0.12.1, .venv-comfy-0.3 for 0.3.75): a test run under one starts servers with the same one. Outside a virtualenv,
    the repository's .venv.
    """
    if sys.prefix != sys.base_prefix:
        return sys.executable
    p = ROOT / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def ensure_checkpoint(seed: int = 0, timeout: float = 300.0) -> Path:
    """Path of the cached harness checkpoint, built by tools/make_checkpoint.py in a subprocess if missing.

    A subprocess keeps the ~0.5 GB build (and the ComfyUI imports) out of the caller, so
    server-only users (demo, browser tests) never import ComfyUI themselves.
    """
    res = subprocess.run([venv_python(), str(ROOT / "tools" / "make_checkpoint.py"), "--seed", str(seed)],
                         capture_output=True, text=True, timeout=timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise ServerError(f"make_checkpoint.py failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return Path(lines[-1])


def history_ok(entry: dict) -> bool:
    """True when a /history entry finished successfully."""
    st = entry.get("status", {}) or {}
    return st.get("status_str") == "success" and bool(st.get("completed", False))


def history_error(entry: dict) -> Optional[dict]:
    """The execution_error / execution_interrupted message data of a /history entry, if any."""
    for msg in (entry.get("status", {}) or {}).get("messages", []) or []:
        if msg and msg[0] in ("execution_error", "execution_interrupted"):
            return msg[1]
    return None


class ComfyServer:
    """One ComfyUI server process on a free port with its own base directory."""

    def __init__(self, base_dir: os.PathLike, *, comfy_dir: Optional[os.PathLike] = None,
                 python: Optional[str] = None, port: Optional[int] = None,
                 checkpoints: Optional[dict[str, os.PathLike]] = None,
                 extra_args: Iterable[str] = (), env: Optional[dict[str, str]] = None) -> None:
        """Prepare (not start) a server; `checkpoints` maps file names to files linked into models/checkpoints."""
        self.base_dir = Path(base_dir).resolve()
        self.comfy_dir = Path(comfy_dir or DEFAULT_COMFY_DIR).resolve()
        self.python = python or venv_python()
        self.port = port
        self.checkpoints = dict(checkpoints or {})
        self.extra_args = list(extra_args)
        # TLORA_FRONTEND_ROOT: serve another frontend build (make test's pass on the newest frontend).
        frontend = os.environ.get("TLORA_FRONTEND_ROOT")
        if frontend and "--front-end-root" not in self.extra_args:
            self.extra_args += ["--front-end-root", str(Path(frontend).resolve())]
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base_dir / "comfy.log"
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def loras_dir(self) -> Path:
        """models/loras of this server's base directory (drop LoRA files here)."""
        return self.base_dir / "models" / "loras"

    @property
    def output_dir(self) -> Path:
        """The server's output directory (SaveImage etc. write here)."""
        return self.base_dir / "output"

    def _prepare_base(self) -> None:
        """Create the base directory layout, link checkpoints and the host's custom_nodes."""
        if not (self.comfy_dir / "main.py").is_file():
            raise ServerError(f"no ComfyUI at {self.comfy_dir}: run `bash tools/bootstrap.sh`")
        for sub in ("models/checkpoints", "models/loras", "models/vae", "input", "output", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, src in self.checkpoints.items():
            dst = self.base_dir / "models" / "checkpoints" / name
            if not dst.exists():
                try:
                    dst.symlink_to(Path(src).resolve())
                except OSError:  # filesystems without symlinks
                    shutil.copy2(src, dst)
        # --base-directory also moves custom_nodes; ComfyUI crashes if that folder is missing,
        # and we want the host's (where bootstrap linked this pack), so link it.
        cn = self.base_dir / "custom_nodes"
        if not cn.exists():
            cn.symlink_to(self.comfy_dir / "custom_nodes", target_is_directory=True)

    def command(self) -> list[str]:
        """The argv used to start the server."""
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir),
                "--database-url", f"sqlite:///{self.base_dir / 'comfy.db'}",
                "--disable-api-nodes", "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 90.0) -> "ComfyServer":
        """Start the process and wait until /system_stats answers (retries once on a port clash)."""
        self._prepare_base()
        last: Optional[Exception] = None
        for _attempt in range(3):
            if self.port is None or _attempt > 0:
                self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except ServerError as e:
                last = e
                self.stop()
                if "address already in use" not in self.log_text().lower():
                    break
        raise last  # type: ignore[misc]

    def _spawn(self) -> None:
        """Popen main.py in its own process group, output appended to comfy.log."""
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        env.pop("PYTHONPATH", None)  # our repo's `nodes/` must not shadow ComfyUI's nodes.py
        env.update(self.env)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy_dir), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        """Poll /system_stats until it answers 200, the process dies, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode if self.proc else None} "
                                  f"during start-up\n{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/system_stats", timeout=2)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s\n{self.log_tail()}")

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Terminate the whole process group (SIGTERM, then SIGKILL); returns the exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        self.proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            rc = self.proc.poll()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return rc

    def __enter__(self) -> "ComfyServer":
        """Start on entering a with-block."""
        return self.start() if not self.alive() else self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Stop; on an exception print the log tail to stderr."""
        self.stop()
        if exc_type is not None:
            sys.stderr.write(f"\n--- ComfyUI log tail ({self.log_path}) ---\n{self.log_tail()}\n")

    # ------------------------------------------------------------------ log

    def log_text(self) -> str:
        """The whole server log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        """The last `lines` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Every 'IMPORT FAILED' line ComfyUI printed (custom nodes and comfy_extras)."""
        return [ln for ln in self.log_text().splitlines() if "IMPORT FAILED" in ln]

    def pack_import_error(self) -> Optional[str]:
        """None when our pack imported; else ComfyUI's IMPORT FAILED line plus the traceback it logged."""
        text = self.log_text()
        failed = [ln for ln in text.splitlines() if "IMPORT FAILED" in ln and PACK_LINK_NAME in ln]
        if not failed:
            return None
        lines = text.splitlines()
        start = next((i for i, ln in enumerate(lines) if f"{PACK_LINK_NAME}/__init__.py" in ln
                      or ("Cannot import" in ln and PACK_LINK_NAME in ln)), None)
        context = "\n".join(lines[max(0, (start or 0) - 30):(start or 0) + 3]) if start is not None else ""
        return "\n".join(failed) + ("\n" + context if context else "")

    def assert_pack_imported(self) -> None:
        """Fail with ComfyUI's traceback when the log says our pack did not import."""
        err = self.pack_import_error()
        if err is not None:
            raise AssertionError(f"ComfyUI could not import ComfyUI-TLoRA:\n{err}")
        if f"custom_nodes/{PACK_LINK_NAME}" not in self.log_text():
            raise AssertionError(f"ComfyUI did not try to load {PACK_LINK_NAME} (is it linked into "
                                 f"{self.comfy_dir / 'custom_nodes'}?)\n{self.log_tail()}")

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """HTTP request to the server; returns (status, parsed JSON or raw bytes). Never raises on 4xx/5xx."""
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """GET `path`, raising ServerError unless 200; returns the JSON."""
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} -> {status}: {body!r}\n{self.log_tail()}")
        return body

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<node_class> (that node's entry)."""
        if node_class is None:
            return self.get_json("/object_info", timeout=60)
        return self.get_json(f"/object_info/{urllib.parse.quote(node_class)}").get(node_class, {})

    def system_stats(self) -> dict:
        """GET /system_stats."""
        return self.get_json("/system_stats")

    def post_prompt(self, graph: dict, client_id: Optional[str] = None,
                    extra_data: Optional[dict] = None, prompt_id: Optional[str] = None) -> str:
        """POST /prompt with an API-format graph; returns the prompt_id (PromptRejected on 400)."""
        payload: dict[str, Any] = {"prompt": graph, "client_id": client_id or f"tlora-{uuid.uuid4().hex[:8]}"}
        if extra_data:
            payload["extra_data"] = extra_data
        if prompt_id:
            payload["prompt_id"] = prompt_id
        status, body = self.request("POST", "/prompt", payload)
        if status == 400 and isinstance(body, dict):
            raise PromptRejected(body)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise ServerError(f"POST /prompt -> {status}: {body!r}\n{self.log_tail()}")
        return str(body["prompt_id"])

    def history(self, prompt_id: str) -> Optional[dict]:
        """The /history/<prompt_id> entry, or None while it is queued/running."""
        body = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return body.get(prompt_id) if isinstance(body, dict) else None

    def wait_history(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.2) -> dict:
        """Poll /history until the prompt finished (success or error); returns its entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if not self.alive():
                raise ServerError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 60.0, client_id: Optional[str] = None) -> dict:
        """post_prompt + wait_history; returns the history entry (check with history_ok)."""
        return self.wait_history(self.post_prompt(graph, client_id), timeout)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """POST /interrupt (global, or only if `prompt_id` is the running one)."""
        status, body = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ServerError(f"POST /interrupt -> {status}: {body!r}")

    def queue(self) -> dict:
        """GET /queue: {'queue_running': [...], 'queue_pending': [...]}."""
        return self.get_json("/queue")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: drop cached models/outputs between tests that must not share them."""
        self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def events(self, client_id: Optional[str] = None) -> "EventReader":
        """A connected websocket reader for `client_id` (use as a context manager)."""
        return EventReader(self.url.replace("http://", "ws://"), client_id or f"tlora-{uuid.uuid4().hex[:8]}").start()


class EventReader:
    """Collects the server's websocket messages for one client id in a background thread.

    JSON messages are kept as dicts ({"type": ..., "data": ...}); binary ones (previews) as
    {"type": "binary", "event": <int>, "size": <bytes>}.
    """

    def __init__(self, ws_base: str, client_id: str) -> None:
        """Prepare a reader for ws_base/ws?clientId=client_id."""
        self.client_id = client_id
        self.url = f"{ws_base}/ws?clientId={urllib.parse.quote(client_id)}"
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._error: Optional[BaseException] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None

    def start(self, timeout: float = 10.0) -> "EventReader":
        """Connect (waits for the server's first 'status' message)."""
        self._thread = threading.Thread(target=self._run, name=f"ws-{self.client_id}", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout):
            raise ServerError(f"websocket {self.url} did not connect: {self._error!r}")
        if self._error is not None:
            raise ServerError(f"websocket {self.url} failed: {self._error!r}")
        return self

    def _run(self) -> None:
        """Thread body: own event loop, read until closed or stopped."""
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._read())
        except BaseException as e:  # recorded for the waiting test
            self._error = e
        finally:
            self._connected.set()
            with self._cond:
                self._cond.notify_all()
            self._loop.close()

    async def _read(self) -> None:
        """Connect with aiohttp and append every message."""
        import aiohttp
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=30) as ws:
                self._connected.set()
                stop_task = asyncio.ensure_future(self._stop.wait())
                while True:
                    recv = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({recv, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                    if stop_task in done:
                        recv.cancel()
                        break
                    msg = recv.result()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        item = json.loads(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        event = int.from_bytes(msg.data[:4], "big") if len(msg.data) >= 4 else -1
                        item = {"type": "binary", "event": event, "size": len(msg.data)}
                    else:
                        break
                    with self._cond:
                        self.messages.append(item)
                        self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        """Block until a message satisfying `predicate` arrived (also past ones); returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0 or (self._thread is not None and not self._thread.is_alive()):
                    raise TimeoutError(f"no matching websocket message in {timeout:.0f} s; "
                                       f"got types {[m.get('type') for m in self.messages][-30:]}")
                self._cond.wait(min(left, 0.5))

    def wait_done(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """Wait for the end of `prompt_id`: execution_success / _error / _interrupted (returned)."""
        ends = ("execution_success", "execution_error", "execution_interrupted")
        return self.wait_for(lambda m: m.get("type") in ends
                             and (m.get("data") or {}).get("prompt_id") == prompt_id, timeout)

    def of_type(self, type_: str, prompt_id: Optional[str] = None) -> list[dict]:
        """Data of all messages of `type_` (optionally only for `prompt_id`)."""
        with self._cond:
            return [m.get("data") for m in self.messages if m.get("type") == type_
                    and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]

    def close(self) -> None:
        """Disconnect and join the thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "EventReader":
        """Already connected by start()."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Disconnect."""
        self.close()
