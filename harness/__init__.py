"""The project's ComfyUI harness: a real ComfyUI host in-process or as a server, with tiny models.

Used by the demo (tools/demo.py), the proving ground (proving/), the benchmarks and the
tests; it is part of the product, and nothing in it imports the `tests` package.

Modules:
  comfy_host   -- the in-process ComfyUI host: make the installed ComfyUI (.host/ComfyUI, or
                  TLORA_COMFY_DIR) importable with --cpu, load its nodes and this pack, run
                  API-format graphs with ComfyUI's own executor
  server       -- the real HTTP server driver: start ComfyUI's `main.py` as a subprocess, talk
                  to it over HTTP and websocket, read its log, stop it
  tiny_models  -- tiny seeded SD1.5/SDXL models, CLIP and TAESD VAE built from the host's own
                  classes; sampling helpers; the cached stock-loadable harness checkpoint
  graphs       -- API-format graph builders (the plain dicts POST /prompt takes)

Import it with the repository root on sys.path (`from harness import comfy_host`). Nothing
here imports torch or ComfyUI at import time; `comfy_host.ensure_importable()` (called on
first use by the modules that need ComfyUI) puts ComfyUI first on sys.path. The pytest
fixtures built on these modules live in tests/support/fixtures.py.
"""
