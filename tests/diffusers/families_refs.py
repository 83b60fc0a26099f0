"""The ComfyUI side of the newer families' cross-host checks (run in .venv by diffusers_refs.run_in_comfy).

ComfyUI's twin of a tiny diffusers transformer (the host's own class at the same widths) is given the
diffusers weights, its fused weights assembled from their diffusers rows: Z-Image through ComfyUI's
own key map (`comfy.utils.z_image_to_diffusers`), Wan through the name mapping that
tests/diffusers/test_families_names.py holds to diffusers' own checkpoint conversion (ComfyUI has no
diffusers map for Wan). Then a TLoRA file is applied by ComfyUI's stock LoraLoaderModelOnly and by our
loader; their patched weights go back in diffusers' keys and rows.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TWINS = {  # ComfyUI configs at the widths of harness/tiny_diffusers.py's *_TINY transformers
    "flux2": ("Flux2", {"image_model": "flux2", "axes_dim": [8, 8, 8, 8], "num_heads": 2, "mlp_ratio": 3.0, "theta": 2000,
                        "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
                        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
                        "patch_size": 1, "in_channels": 128, "hidden_size": 64, "context_in_dim": 96,
                        "vec_in_dim": None, "depth": 1, "depth_single_blocks": 1, "guidance_embed": False}),
    "chroma": ("Chroma", {"image_model": "chroma", "axes_dim": [8, 12, 12], "num_heads": 2, "mlp_ratio": 4.0,
                          "theta": 10000, "out_channels": 64, "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2,
                          "in_channels": 64, "hidden_size": 64, "context_in_dim": 32, "vec_in_dim": None, "depth": 1,
                          "depth_single_blocks": 1, "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 2}),
    "qwenimage": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1,
                                "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                                "axes_dims_rope": (8, 12, 12)}),
    "zimage": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                          "n_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
                          "axes_lens": [64, 64, 64], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                          "z_image_modulation": True, "time_scale": 1000.0, "n_refiner_layers": 1, "multiple_of": 1}),
    "wan": ("WAN21_T2V", {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": 16, "num_heads": 2,
                          "ffn_dim": 128, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256,
                          "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
                          "in_dim": 16, "text_dim": 32}),
}


def comfy_family_patch(out_dir: str, kind: str, diffusers_weights: str, tlora_path: str, strength: float) -> None:
    """Patched weights (stock loader and ours) of ComfyUI's twin holding the diffusers weights, in diffusers' keys."""
    import torch
    from safetensors.torch import load_file, save_file

    from harness import comfy_host as ch
    from harness import tiny_models as tm
    from tests.host import tlora_refs as R
    out = Path(out_dir)
    ch.setup_host(out / "host", threads=1).require_pack()
    import comfy.utils
    from tlora import arch, diffusers_names
    cls_name, config = TWINS[kind]
    from harness import tiny_families as tf
    _, model, patcher = tm._build(cls_name, tf._host_params(dict(config)), 0, head_channels=None)
    dm = model.diffusion_model
    if kind == "zimage":
        key_map = comfy.utils.z_image_to_diffusers({"n_layers": 1, "dim": 64, "n_refiner_layers": 1})
    elif kind in ("flux2", "chroma"):  # ComfyUI's own Flux map (Flux.2's fused single-block names included)
        key_map = comfy.utils.flux_to_diffusers({"depth": 1, "depth_single_blocks": 1, "hidden_size": 64})
    elif kind == "qwenimage":  # ComfyUI's Qwen-Image has diffusers' names
        key_map = {k: k for k in dm.state_dict()}
    else:
        table = arch.Arch("wan", arch.WanConfig(64, 128, 1, 16, 16, 32), (), "", "", "")
        key_map = {}
        for path, (generic, pieces) in diffusers_names.diffusers_sources(table).items():
            key = generic.removeprefix(arch.UNET_PREFIX) + ".weight"
            key_map[path.removeprefix("transformer.") + ".weight"] = key if pieces is None else \
                (key, (0, pieces[0][0], pieces[0][1]))
    weights = {k: v.clone() for k, v in dm.state_dict().items()}
    given = load_file(diffusers_weights)
    used = {k: v for k, v in key_map.items() if k in given and isinstance(v, (str, tuple)) and
            (isinstance(v, str) or v[1] is not None) and (v if isinstance(v, str) else v[0]) in weights}
    # Weights no adapter touches may differ in shape between the two implementations (Z-Image's timestep MLP).
    used = {k: v for k, v in used.items() if isinstance(v, tuple) or weights[v].shape == given[k].shape}
    for key, to in used.items():
        if isinstance(to, str):
            weights[to].copy_(given[key])
        else:
            weights[to[0]].narrow(*to[1]).copy_(given[key])
    dm.load_state_dict(weights)

    def as_diffusers(sd: dict) -> dict:
        return {k: (sd[to] if isinstance(to, str) else sd[to[0]].narrow(*to[1])).contiguous() for k, to in used.items()}
    shutil.copy(tlora_path, ch.models_dir("loras") / f"trained_{kind}.safetensors")
    keys = [f"diffusion_model.{k}" for k in weights]
    for label, loader in (("stock", R.stock_model_only), ("ours", R.tlora_model_only)):
        patched = R.patched_weights(loader(patcher, f"trained_{kind}.safetensors", strength), keys)
        save_file(as_diffusers({k.removeprefix("diffusion_model."): v for k, v in patched.items()}),
                  str(out / f"patched_{label}.safetensors"))
    save_file(as_diffusers(weights), str(out / "base.safetensors"))
    assert torch.isfinite(torch.cat([v.flatten() for v in weights.values()])).all()
