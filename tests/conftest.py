"""Shared test setup: the repository root is importable (the `tlora` core is host-free).

It also binds this repository's `tests` package (a namespace package: tests/ has no
__init__.py) before anything can put ComfyUI on sys.path. ComfyUI ships a regular `tests`
package, which would otherwise win wherever ComfyUI stands on sys.path once
harness.comfy_host.ensure_importable() has run, and imports such as `tests.host.tlora_refs`
would then fail.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tests  # noqa: E402,F401  (binds our `tests` package, see above)

if os.path.join(ROOT, "tests") not in list(getattr(tests, "__path__", [])):
    raise ImportError(f"`tests` resolved to {tests!r}, not {os.path.join(ROOT, 'tests')}: "
                      "something put another `tests` package first on sys.path")
