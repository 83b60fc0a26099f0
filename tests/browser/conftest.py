"""Browser tests: real ComfyUI (0.3.75, 0.12.1) + its frontend package, Debian's chromium driven by Playwright.

On 0.12.1 (frontend 1.37) every test runs in both node designs: the classic canvas nodes and
the modern one (`Comfy.VueNodes.Enabled`: nodes are DOM elements).

No browser is ever downloaded: chromium comes from apt (`/usr/bin/chromium`, or TLORA_CHROMIUM).
A missing chromium or Playwright FAILS these tests (they are part of `make test`), it never
skips them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The harness' session fixtures (one ComfyUI server for this directory, the cached checkpoint).
from tests.support.fixtures import comfy_server, harness_checkpoint, neutralize_pack_root_package  # noqa: E402,F401

from harness import comfy_host as ch  # noqa: E402
from tests.browser.comfy_page import CHROMIUM_FLAGS, INIT_SCRIPT, VIEWPORT, ComfyPage, ConsoleLog  # noqa: E402

# The modern node design came with the 0.12-era frontend; 0.3.75's is tested as users run it.
NODE_DESIGNS = ("classic", "vue") if ch.host_version() >= (0, 12) else ("classic",)

CHROMIUM = os.environ.get("TLORA_CHROMIUM", "/usr/bin/chromium")


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    """Mark browser tests; keep pytest from importing the pack root (see tests/support/fixtures.py)."""
    neutralize_pack_root_package(items)
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.browser)


def pytest_configure(config: Any) -> None:
    """Register the marker."""
    config.addinivalue_line("markers", "browser: drives ComfyUI's web UI in chromium (slow)")


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    """Playwright's sync API, after checking that chromium and Playwright are really installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.fail(f"Playwright for Python is not installed ({err}); run `make bootstrap`", pytrace=False)
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no chromium at {CHROMIUM}: run `make bootstrap` (it does `apt-get install -y chromium`) "
                    f"or set TLORA_CHROMIUM", pytrace=False)
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(params=NODE_DESIGNS)
def node_design(request: Any) -> str:
    """Which node design the UI shows (a user setting)."""
    return request.param


@pytest.fixture
def ui(playwright: Any, comfy_server: Any, tmp_path: Path, request: Any, node_design: str) -> Iterator[ComfyPage]:
    """A fresh chromium profile with ComfyUI's UI open; console errors are checked by each test."""
    comfy_server.assert_pack_imported()
    # A first visit opens the templates browser over the canvas (new-user onboarding).
    status, _ = comfy_server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    assert status == 200, f"could not store a user setting ({status})"
    status, _ = comfy_server.request("POST", "/settings/Comfy.VueNodes.Enabled", node_design == "vue")
    assert status == 200, f"could not store the node design setting ({status})"
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        viewport=VIEWPORT, timeout=120_000)
    try:
        context.add_init_script(INIT_SCRIPT)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(60_000)
        console = ConsoleLog(page, comfy_server.url)
        comfy = ComfyPage(page, comfy_server, console, node_design)
        comfy.open()
        yield comfy
        if getattr(request.node, "rep_call_failed", False):
            comfy.screenshot(f"failed_{request.node.name}")  # what the page looked like when it failed
    finally:
        context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """Remember failures (for a screenshot) and attach the server log tail to failing browser tests."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call_failed = rep.failed
    if rep.failed and "ui" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        title = "ComfyUI server log (tail)"
        if server is not None and not any(t == title for t, _ in rep.sections):  # the host conftest may add it too
            rep.sections.append((title, server.log_tail(60)))
