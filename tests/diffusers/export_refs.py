"""The ComfyUI side of the export cross-host test: runs in `.venv` (ComfyUI), called by test_export_diffusers.py.

`comfy_sd15(out)` writes a tiny SD1.5 checkpoint with the host's own save path (UNet + CLIP-L, the
twin tests/diffusers/diffusers_refs.py's SD15_UNET describes) and a TLoRA file on its attention
linears, a conv and CLIP projections (random adapters of every kind, tests/host/tlora_refs.py).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_comfy_sd15(out: Path, timeout: int = 300) -> dict:
    """Run `comfy_sd15` in the ComfyUI environment; returns {"ckpt": path, "tlora": path, "modules": [...]}."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.diffusers.export_refs import comfy_sd15; "
            f"comfy_sd15({str(out)!r})")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ComfyUI side failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "export_sd15.json").read_text())


def comfy_sd15(out_dir: str) -> None:
    """Checkpoint by ComfyUI's save path and a TLoRA file for it (runs in .venv)."""
    from harness import comfy_host as ch
    out = Path(out_dir)
    ch.setup_host(out / "host", threads=1)
    import comfy.sd

    from harness import tiny_models as tm
    from tests.host import tlora_refs as R
    t, clip = tm.tiny_sd15(seed=0), tm.tiny_clip(seed=1, kind="sd15", hidden=64, layers=2)
    sd = t.model.state_dict()
    paths = [p for p in t.attention_modules()][:6] + ["input_blocks.1.0.in_layers.2", "output_blocks.3.1.proj_in"]
    shapes = {f"diffusion_model.{p}": tuple(sd[f"diffusion_model.{p}.weight"].shape) for p in paths}
    te = clip.cond_stage_model.state_dict()
    for name in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc2"):
        key = f"clip_l.transformer.text_model.encoder.layers.1.{name}.weight"
        shapes[f"text_encoders.{key[:-len('.weight')]}"] = tuple(te[key].shape)
    R.write_tlora(out / "t_sd15.safetensors", R.random_adapters(shapes, seed=8))
    comfy.sd.save_checkpoint(str(out / "sd15.safetensors"), t.patcher, clip)
    (out / "export_sd15.json").write_text(json.dumps({"ckpt": str(out / "sd15.safetensors"),
                                                      "tlora": str(out / "t_sd15.safetensors"),
                                                      "modules": sorted(shapes)}))
