"""Run by ComfyUI-Manager after `pip install -r requirements.txt`: checks, never installs torch."""
import importlib.util
import sys

MISSING = [name for name in ("torch", "safetensors", "einops") if importlib.util.find_spec(name) is None]
if MISSING:
    print(f"[ComfyUI-TLoRA] missing packages: {', '.join(MISSING)}; "
          f"run: {sys.executable} -m pip install -r requirements.txt", file=sys.stderr)
    sys.exit(1)
print("[ComfyUI-TLoRA] dependencies present")

# Build the compiled CPU kernels now (about 2 s) rather than at the first training step, and
# say whether they are in use; without a C compiler the pack still works, on torch alone.
try:
    from tlora.functional import trm

    info = trm.native_status()
    state = f"in use ({info['threads']} threads)" if info["in_use"] else "not in use, torch engine instead"
    print(f"[ComfyUI-TLoRA] compiled CPU kernels {state}: {info['status']}")
except Exception as exc:  # informational only: never fail the install over it
    print(f"[ComfyUI-TLoRA] compiled CPU kernels not checked: {type(exc).__name__}: {exc}")
