"""Fixtures for real-host tests: in-process ComfyUI, the harness checkpoint, one server per session.

Defined in tests/support/fixtures.py (on the product's `harness` package) so other suites
(browser tests) can reuse them; `tm` is shared by the host tests that need the pack loaded.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# tests/conftest.py has bound our `tests` package already (ComfyUI ships its own `tests`).
from tests.support.fixtures import (  # noqa: E402,F401  (fixtures and hooks are found by name)
    comfy_host,
    comfy_server,
    harness_checkpoint,
    host_checkpoint,
    loras_dir,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_makereport,
)


@pytest.fixture(scope="module")
def tm(comfy_host):
    """harness.tiny_models, once the in-process host is up with the pack loaded."""
    comfy_host.require_pack()
    from harness import tiny_models
    return tiny_models
