"""Run by ComfyUI-Manager after `pip install -r requirements.txt`: checks, never installs torch."""
import importlib.util
import sys

MISSING = [name for name in ("torch", "safetensors", "einops") if importlib.util.find_spec(name) is None]
if MISSING:
    print(f"[ComfyUI-TLoRA] missing packages: {', '.join(MISSING)}; "
          f"run: {sys.executable} -m pip install -r requirements.txt", file=sys.stderr)
    sys.exit(1)
print("[ComfyUI-TLoRA] dependencies present")
