"""Run by the webui's extension installer: checks what the core needs (the webui ships it all)."""
import importlib.util
import sys

MISSING = [name for name in ("torch", "safetensors", "einops") if importlib.util.find_spec(name) is None]
if MISSING:
    print(f"[TLoRA] missing packages: {', '.join(MISSING)}; run: {sys.executable} -m pip install "
          + " ".join(MISSING), file=sys.stderr)

