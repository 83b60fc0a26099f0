"""pytest support for the real-host tests of ComfyUI-TLoRA.

Modules:
  fixtures     -- pytest fixtures and hooks (imported by tests/host/conftest.py and
                  tests/browser/conftest.py), built on the product's `harness` package
                  (harness.comfy_host, harness.server, harness.tiny_models, harness.graphs)

Import this package as `tests.support` with the repository root on sys.path; tests/conftest.py
binds our `tests` package before `harness.comfy_host` can put ComfyUI's directory (which ships
its own `tests` package) in front. Nothing here imports torch or ComfyUI at import time.
"""
