"""Real-host test harness for ComfyUI-TLoRA: in-process ComfyUI, tiny models, a server fixture.

Modules:
  comfy_host   -- make the installed ComfyUI (.host/ComfyUI) importable and run graphs in-process
  tiny_models  -- seeded tiny SD1.5/SDXL models, CLIP and TAESD VAE built in Python; sampling helpers
  server       -- start `main.py` as a subprocess and talk to it over HTTP and websocket
  fixtures     -- pytest fixtures built on the three (imported by tests/host/conftest.py)

Import this package as `tests.support` with the repository root on sys.path, before
`comfy_host` puts ComfyUI's directory in front (ComfyUI ships its own `tests` package).
Nothing here imports torch or ComfyUI at import time.
"""
