"""pytest fixtures built on the product's `harness` package (imported by tests/host/conftest.py).

Session-scoped, so one in-process ComfyUI and ONE server serve the whole run:
  comfy_host         HostInfo of the in-process ComfyUI (base dir = a session temp dir)
  loras_dir          models/loras of the in-process host; files a test adds are removed after it
  harness_checkpoint path of the cached SD1.5-format checkpoint (.cache/, built once)
  host_checkpoint    its file name inside the in-process host's models/checkpoints
  comfy_server       a started ComfyServer (checkpoint linked as HARNESS_CKPT_NAME)
Marker `server`: tests that use comfy_server (deselect with -m "not server").
A failing test that used comfy_server gets the server's log tail in its report.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import comfy_host as _ch
from harness.server import ComfyServer, ServerError, ensure_checkpoint

HARNESS_CKPT_NAME = "tlora-tiny-sd15.safetensors"
ROOT = _ch.ROOT


def pytest_configure(config: Any) -> None:
    """Register the harness markers."""
    config.addinivalue_line("markers", "server: uses the session's ComfyUI server subprocess (slow start)")


def torch_threads() -> int:
    """Intra-op threads for tests (TLORA_TORCH_THREADS, default 1).

    On the shared 2-core machines a second torch thread spin-waits against other processes:
    tiny-model sampling measured ~10x slower with 2 threads than with 1 under load.
    """
    return max(1, int(os.environ.get("TLORA_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory: Any) -> _ch.HostInfo:
    """In-process ComfyUI (--cpu, nodes and the pack loaded); a failed pack import is logged, not raised."""
    return _ch.setup_host(tmp_path_factory.mktemp("comfy_host"), threads=torch_threads())


@pytest.fixture
def loras_dir(comfy_host: _ch.HostInfo) -> Iterator[Path]:
    """models/loras of the in-process host; files created by the test are deleted afterwards."""
    d = _ch.models_dir("loras")
    before = set(d.iterdir())
    yield d
    for p in set(d.iterdir()) - before:
        if p.is_file() or p.is_symlink():
            p.unlink()


@pytest.fixture(scope="session")
def harness_checkpoint() -> Path:
    """The cached checkpoint from tools/make_checkpoint.py (built in a subprocess when missing)."""
    from harness.tiny_models import default_checkpoint_path
    path = Path(default_checkpoint_path(0))
    if path.is_file():
        return path
    try:
        return ensure_checkpoint(0)
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def host_checkpoint(comfy_host: _ch.HostInfo, harness_checkpoint: Path) -> str:
    """ckpt_name under which CheckpointLoaderSimple finds the harness checkpoint in-process."""
    dst = _ch.models_dir("checkpoints") / HARNESS_CKPT_NAME
    if not dst.exists():
        dst.symlink_to(harness_checkpoint)
    return HARNESS_CKPT_NAME


_SERVERS: list[ComfyServer] = []


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: Any, harness_checkpoint: Path) -> Iterator[ComfyServer]:
    """One ComfyUI server for the session; stopped at the end, log tail printed if anything failed."""
    base = tmp_path_factory.mktemp("comfy_server")
    n = str(torch_threads())
    srv = ComfyServer(base, checkpoints={HARNESS_CKPT_NAME: harness_checkpoint},
                      env={"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    try:
        srv.start(timeout=float(os.environ.get("TLORA_SERVER_TIMEOUT", "90")))
    except Exception as e:
        pytest.fail(f"ComfyUI server did not start: {e}", pytrace=False)
    _SERVERS.append(srv)
    failed_before = _failed_count()
    yield srv
    srv.stop()
    if _failed_count() > failed_before:
        sys.stderr.write(f"\n--- ComfyUI server log tail ({srv.log_path}) ---\n{srv.log_tail(120)}\n")


_FAILED = {"n": 0}


def _failed_count() -> int:
    """Failures recorded by the report hook so far in this session."""
    return _FAILED["n"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """Count failures; attach the server log tail to failing tests that used comfy_server."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        _FAILED["n"] += 1
        if "comfy_server" in getattr(item, "fixturenames", ()) and _SERVERS:
            rep.sections.append(("ComfyUI server log (tail)", _SERVERS[-1].log_tail(60)))


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    """Mark comfy_server users with `server`; keep pytest from importing the pack root as a test package."""
    neutralize_pack_root_package(items)
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


def neutralize_pack_root_package(items: list) -> int:
    """Stop pytest's Package.setup from importing the repository root's __init__.py; returns nodes changed.

    The repository root is a ComfyUI custom-node package (root __init__.py with relative
    imports of ComfyUI-only modules). pytest >= 8 turns any rootdir with __init__.py into a
    `Package` whose setup() imports it as a test module (as `main`, with /work on sys.path),
    which fails or imports the pack a second time. It holds no test code, so skip that import.
    """
    changed = 0
    seen: set[int] = set()
    for item in items:
        for node in item.listchain():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, pytest.Package) and Path(node.path).resolve() == ROOT:
                node.setup = lambda: None  # type: ignore[method-assign]
                changed += 1
    return changed
