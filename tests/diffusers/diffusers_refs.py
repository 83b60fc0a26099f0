"""Helpers for the diffusers apply tests: tiny transformers from configs, the ComfyUI side of the cross-host check.

The dense references are tests/host/tlora_refs.py's (float64 W0 T + s Delta from the file's
tensors with plain torch; they never call the pack). `comfy_side` runs in `.venv/bin/python`
(ComfyUI 0.3.75 in-process, our loader node) and writes: the checkpoint ComfyUI's own classes
save, the TLoRA file (generic names) and the weights ComfyUI patches with it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
COMFY_PYTHON = ROOT / ".venv" / "bin" / "python"
STRENGTH = 0.7

# diffusers configs of the tiny twins ComfyUI builds in harness/tiny_models.py.
SD15_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=8, norm_num_groups=32)
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 14, 14))
SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
           pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def seeded(seed: int, build: Any) -> Any:
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():  # diffusers zero-inits some output layers: give every weight values
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.abs().sum()):
                p.normal_(0, 0.02)
    return model.eval()


def write_config(folder: Path, cls: Any, config: dict) -> Path:
    """A local folder with the config.json of `cls(**config)` (what from_single_file reads offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    full = dict(config, _class_name=cls.__name__)
    (folder / "config.json").write_text(json.dumps(full))
    return folder


def run_in_comfy(call: str, timeout: int = 300) -> None:
    """Run `from tests.diffusers.diffusers_refs import ...; <call>` in the ComfyUI environment (.venv)."""
    name = call.split("(", 1)[0]
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.diffusers.diffusers_refs import {name}; {call}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([str(COMFY_PYTHON), "-c", code], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ComfyUI side failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_comfy_side(out: Path, timeout: int = 300) -> dict[str, Any]:
    """Run `comfy_side` in the ComfyUI environment (one process for every family); returns what it wrote."""
    run_in_comfy(f"comfy_side({str(out)!r})", timeout)
    return json.loads((out / "comfy_side.json").read_text())


# --------------------------------------------------------------------------- runs in .venv (ComfyUI)
def comfy_side(out_dir: str) -> None:
    """Per family: checkpoint by ComfyUI's classes, a generic-name TLoRA file, ComfyUI's patched weights; key maps."""
    from harness import comfy_host as ch
    out = Path(out_dir)
    ch.setup_host(out / "host", threads=1).require_pack()
    written: dict[str, Any] = {family: _comfy_family(out, family) for family in ("sd15", "sd3")}
    written["maps"] = _comfy_maps()
    (out / "comfy_side.json").write_text(json.dumps(written))


def _comfy_maps() -> dict[str, dict[str, Any]]:
    """ComfyUI's own diffusers key maps (comfy.utils) of the released models: {diffusers weight: [key, rows]}."""
    import comfy.utils

    from tlora import arch
    maps: dict[str, dict[str, Any]] = {}
    for name, a in arch.ARCHS.items():
        cfg = a.denoiser
        if isinstance(cfg, arch.UNetConfig):
            raw = comfy.utils.unet_to_diffusers({
                "num_res_blocks": list(cfg.num_res_blocks), "channel_mult": list(cfg.channel_mult),
                "transformer_depth": list(cfg.transformer_depth), "transformer_depth_middle": cfg.transformer_depth_middle,
                "transformer_depth_output": list(cfg.transformer_depth_output)})
        elif isinstance(cfg, arch.FluxConfig):
            raw = comfy.utils.flux_to_diffusers({"depth": cfg.depth, "depth_single_blocks": cfg.depth_single,
                                                 "hidden_size": cfg.hidden})
        elif isinstance(cfg, arch.MMDiTConfig):
            raw = comfy.utils.mmdit_to_diffusers({"depth": cfg.depth})
        else:
            continue
        entries = {}
        for key, value in raw.items():
            if not key.endswith(".weight"):
                continue
            if isinstance(value, str):
                entries[key] = [value, None]
            elif len(value) > 2 or value[1] is None:  # (key, None, swap_scale_shift)
                entries[key] = [value[0], "swap"]
            else:
                entries[key] = [value[0], [value[1][1], value[1][2]]]
        maps[name] = entries
    return maps


def _comfy_family(out: Path, family: str) -> dict[str, str]:
    from safetensors.torch import save_file

    from harness import comfy_host as ch
    from harness import tiny_models as tm
    from tests.host import tlora_refs as R
    from tlora import arch
    if family == "sd15":
        t = tm.tiny_sd15(seed=0)  # model_channels 32, channel_mult (1, 2), one res block, depth 1, context 64
        table = arch.unet_modules(arch.UNetConfig(32, (1, 2), (1, 1), (1, 1), 1, (1, 1, 1, 1), 64, False))
        # ComfyUI's CLIP-L twin (its transformer.text_model names are the HF ones diffusers uses).
        clip = tm.tiny_clip(seed=1, kind="sd15", hidden=64, layers=2)
        table += arch.text_encoder_modules(arch.TextEncoderConfig("clip_l", 2, 64, 128, "lora_te_"))
    elif family == "sd3":
        t, clip = tm.tiny_dit("sd3", seed=0), None  # depth 2 (hidden 128), attn2 in block 0, pre-only last context
        table = arch.MMDiTConfig(2, self_attn_blocks=(0,), adm=32).modules()
    else:
        raise ValueError(family)
    sd = t.model.state_dict()
    shapes = {name: shape for name, shape, _ in table}
    for name, shape in shapes.items():
        if name.startswith("diffusion_model."):
            assert tuple(sd[f"{name}.weight"].shape) == tuple(shape), name
    adapters = R.random_adapters(shapes, seed=7)
    lora_name = f"xhost_{family}.safetensors"
    R.write_tlora(ch.models_dir("loras") / lora_name, adapters)
    (out / lora_name).write_bytes((ch.models_dir("loras") / lora_name).read_bytes())
    ckpt = {k: v.contiguous() for k, v in t.config.process_unet_state_dict_for_saving(
        dict(t.model.diffusion_model.state_dict())).items()}
    unet_keys = [f"{p}.weight" for p in shapes if p.startswith("diffusion_model.")]
    if clip is not None:
        model, clip2 = R.tlora_full(t.patcher, clip, lora_name, STRENGTH, STRENGTH)
        te_sd = clip.cond_stage_model.state_dict()
        te_keys = {f"{p}.weight": "clip_l." + p.removeprefix("text_encoders.clip_l.") + ".weight"
                   for p in shapes if p.startswith("text_encoders.")}
        patched_te = R.clip_patched_weights(clip2, list(te_keys.values()))
        ckpt.update({f"cond_stage_model.{k.removeprefix('clip_l.')}": v.contiguous()
                     for k, v in te_sd.items() if k.startswith("clip_l.transformer.")})
    else:
        model, te_keys, patched_te = R.tlora_model_only(t.patcher, lora_name, STRENGTH), {}, {}
    patched = R.patched_weights(model, unet_keys)
    dump = {k: v.contiguous() for k, v in patched.items()}
    dump.update({generic: patched_te[key].contiguous() for generic, key in te_keys.items()})
    save_file(ckpt, str(out / f"ckpt_{family}.safetensors"))
    save_file(dump, str(out / f"patched_{family}.safetensors"))
    return {"ckpt": str(out / f"ckpt_{family}.safetensors"), "tlora": str(out / lora_name),
            "patched": str(out / f"patched_{family}.safetensors")}


# The KL VAE of the full single-file checkpoint below, as ComfyUI's ddconfig and as diffusers' config.
KL_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
                       num_res_blocks=1, attn_resolutions=[], dropout=0.0)
KL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=1, norm_num_groups=32, sample_size=64)


def sd15_config_folder(folder: Path) -> Path:
    """A local diffusers folder describing comfy_sd15_patch's checkpoint (what from_single_file reads offline)."""
    from diffusers import AutoencoderKL

    from harness import tiny_diffusers as td
    pipe = td.sd15(unet=SD15_UNET)
    pipe.register_modules(vae=AutoencoderKL(**KL_VAE))
    td.save(pipe, folder)
    return folder


def comfy_sd15_patch(out_dir: str, tlora_path: str = "") -> None:
    """A full SD1.5-format checkpoint from ComfyUI's classes (tiny UNet, KL VAE, CLIP-L; seeded: the same weights
    every call); with a TLoRA file, also the UNet weights ComfyUI's TLoRA loader patches with it at strength
    STRENGTH (`patched.safetensors`)."""
    import shutil

    from safetensors.torch import save_file

    from harness import comfy_host as ch
    from harness import tiny_models as tm
    from tests.host import tlora_refs as R
    from tlora import format as tformat
    out = Path(out_dir)
    ch.setup_host(out / "host", threads=1).require_pack()
    from comfy.ldm.models.autoencoder import AutoencoderKL
    t = tm.tiny_sd15(seed=0)
    ckpt = dict(t.config.process_unet_state_dict_for_saving(dict(t.model.diffusion_model.state_dict())))
    vae = tm.init_module_(AutoencoderKL(ddconfig=dict(KL_VAE_DDCONFIG), embed_dim=4), 3)
    ckpt.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    clip = tm.tiny_clip(seed=1, kind="sd15", hidden=64, layers=2)
    ckpt.update({"cond_stage_model." + k.removeprefix("clip_l."): v for k, v in clip.cond_stage_model.state_dict().items()
                 if k.startswith("clip_l.transformer.")})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(out / "ckpt_sd15.safetensors"))
    if tlora_path:
        shutil.copy(tlora_path, ch.models_dir("loras") / "trained.safetensors")
        keys = [f"{k}.weight" for k in tformat.load(tlora_path).adapters]
        patched = R.patched_weights(R.tlora_model_only(t.patcher, "trained.safetensors", STRENGTH), keys)
        save_file({k: v.contiguous() for k, v in patched.items()}, str(out / "patched.safetensors"))


def comfy_dit_patch(out_dir: str, family: str, diffusers_weights: str, tlora_path: str) -> None:
    """ComfyUI's tiny Flux or SD3 twin given a diffusers transformer's weights through ComfyUI's own key map
    (`comfy.utils.flux_to_diffusers` / `mmdit_to_diffusers`: fused q/k/v and linear1 assembled from their
    diffusers rows), patched by our TLoRA loader with the file at STRENGTH; the patched weights are written back
    in diffusers' keys and rows (`patched_diffusers.safetensors`), with the unpatched ones
    (`base_diffusers.safetensors`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from harness import comfy_host as ch
    from harness import tiny_models as tm
    from tests.host import tlora_refs as R
    out = Path(out_dir)
    ch.setup_host(out / "host", threads=1).require_pack()
    import comfy.utils  # importable once the host is set up
    t = tm.tiny_dit(family, seed=0)
    dm = t.model.diffusion_model
    if family == "flux":
        key_map = comfy.utils.flux_to_diffusers({"depth": len(dm.double_blocks),
                                                 "depth_single_blocks": len(dm.single_blocks),
                                                 "hidden_size": dm.hidden_size})
    else:
        key_map = comfy.utils.mmdit_to_diffusers({"depth": len(dm.joint_blocks)})
    weights = {k: v.clone() for k, v in dm.state_dict().items()}
    given = load_file(diffusers_weights)
    used = {k: v for k, v in key_map.items() if k in given and isinstance(v, (str, tuple)) and
            (isinstance(v, str) or v[1] is not None)}  # the swapped final modulation is not needed here
    # Some shapes differ (Flux's per-head norms: 1 head of 128 in ComfyUI's twin, 4 of 32 in the diffusers one;
    # SD3's context embedder: ComfyUI pads text to 4096): no adapter touches them, the adapted linears are compared.
    used = {k: v for k, v in used.items() if isinstance(v, tuple) or weights[v].shape == given[k].shape}
    for key, to in used.items():
        if isinstance(to, str):
            weights[to].copy_(given[key])
        else:
            dim, offset, size = to[1]
            weights[to[0]].narrow(dim, offset, size).copy_(given[key])
    dm.load_state_dict(weights)

    def as_diffusers(sd: dict) -> dict:
        return {k: (sd[to] if isinstance(to, str) else sd[to[0]].narrow(*to[1])).contiguous() for k, to in used.items()}
    shutil.copy(tlora_path, ch.models_dir("loras") / f"trained_{family}.safetensors")
    patched = R.patched_weights(R.tlora_model_only(t.patcher, f"trained_{family}.safetensors", STRENGTH),
                                [f"diffusion_model.{k}" for k in weights])
    save_file(as_diffusers({k.removeprefix("diffusion_model."): v for k, v in patched.items()}),
              str(out / "patched_diffusers.safetensors"))
    save_file(as_diffusers(weights), str(out / "base_diffusers.safetensors"))


def run_comfy_sd15_patch(out: Path, tlora_path: str = "", timeout: int = 300) -> None:
    """comfy_sd15_patch in the ComfyUI environment."""
    run_in_comfy(f"comfy_sd15_patch({str(out)!r}, {tlora_path!r})", timeout)


if __name__ == "__main__":  # pragma: no cover - manual use
    comfy_side(sys.argv[1])
