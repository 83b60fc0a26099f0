"""Fixtures for real-host tests: in-process ComfyUI, the harness checkpoint, one server per session.

Defined in tests/support/fixtures.py so other suites (browser tests, scripts) can reuse them.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# `tests` must be bound to this repository before comfy_host puts ComfyUI (which ships its
# own `tests` package) first on sys.path; importing tests.support here does exactly that.
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
