"""Tiny twins of every model family ComfyUI samples (image and video DiTs), from the host's own classes.

Each twin is `comfy.supported_models.<Class>(config).get_model(...)` with a config in the form
`comfy.model_detection` produces for the released model, shrunk (one or two blocks, 64-256 wide),
every parameter seeded (harness/tiny_models.py `init_module_`). Text conditioning comes from the
tiny Flux CLIP (`tiny_models.tiny_clip(kind="flux")`: CLIP-L pooled 32 wide + T5 sequence 64 wide,
ComfyUI's real tokenizers): the LLM text encoders these families ship (Qwen3, Mistral, Gemma, umT5
...) are not what the tests are about, so every twin takes a 64-wide token sequence (and a 32-wide
pooled vector where the family has one). Latents come from a TAESD with the family's latent
channel count (16, 48 for Wan 2.2, 64 for HunyuanImage 2.1, 128 for Flux.2 / ERNIE-Image).

    from harness import tiny_families as tf
    twin = tf.tiny_family("flux2", seed=0)      # tiny_models.TinyModel
    tf.available()                              # families this host can build (older hosts lack some)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from . import comfy_host
from . import tiny_models as tm

CONTEXT, POOLED = 64, 32  # the tiny Flux CLIP's T5 width and CLIP-L pooled width


@dataclasses.dataclass(frozen=True)
class Family:
    """A family's twin: the host's supported_models class and a tiny detection-style config."""

    name: str  # our name (tlora.arch-style)
    host_class: str  # comfy.supported_models class
    config: Callable[[], dict]
    label: str  # what users call it
    video: bool = False  # a video model (trains on clips too)


def _flux2(guidance: bool) -> dict:
    # Klein-like (no guidance_in) or dev-like; the keys model_detection sets for Flux.2 (head 32 = 4 x 8 rope axes).
    return {"image_model": "flux2", "axes_dim": [8, 8, 8, 8], "num_heads": 2, "mlp_ratio": 3.0, "theta": 2000,
            "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
            "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
            "patch_size": 1, "in_channels": 128, "hidden_size": 64, "context_in_dim": CONTEXT, "vec_in_dim": None,
            "depth": 1, "depth_single_blocks": 1, "guidance_embed": guidance}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux2", "Flux2", lambda: _flux2(False), "Flux.2 (Klein-like: no guidance input)"),
    Family("chroma", "Chroma", lambda: {
        "image_model": "chroma", "axes_dim": [8, 12, 12], "num_heads": 2, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 64, "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2, "in_channels": 64,
        "hidden_size": 64, "context_in_dim": CONTEXT, "vec_in_dim": None, "depth": 1, "depth_single_blocks": 1,
        "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 1}, "Chroma"),
    # Z-Image's modulation is 256 wide whatever the width: the twin keeps dim 256 (one layer per stage).
    Family("z-image", "ZImage", lambda: {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": CONTEXT,
        "n_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32, "n_refiner_layers": 1,
        "multiple_of": 32}, "Z-Image"),
    Family("lumina2", "Lumina2", lambda: {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": CONTEXT,
        "n_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 1, "axes_dims": [8, 12, 12],
        "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0, "n_refiner_layers": 1,
        "multiple_of": 32}, "Lumina 2"),
    Family("wan21", "WAN21_T2V", lambda: _wan(16), "Wan 2.1 (T2V)", video=True),
    Family("wan22", "WAN22_T2V", lambda: _wan(48), "Wan 2.2 (TI2V 5B-like: 48-channel latents)", video=True),
    Family("hidream", "HiDream", lambda: {
        "image_model": "hidream", "attention_head_dim": 32, "axes_dims_rope": [16, 8, 8],
        "caption_channels": [CONTEXT, CONTEXT], "max_resolution": [32, 32], "in_channels": 16,
        "llama_layers": [0, 1], "num_attention_heads": 2, "num_routed_experts": 2, "num_activated_experts": 1,
        "num_layers": 1, "num_single_layers": 1, "out_channels": 16, "patch_size": 2, "text_emb_dim": POOLED},
        "HiDream"),
    Family("hunyuan-image-2.1", "HunyuanImage21", lambda: {
        "image_model": "hunyuan_video", "in_channels": 64, "patch_size": [1, 1], "out_channels": 64,
        "vec_in_dim": None, "axes_dim": [16, 16], "meanflow": False, "context_in_dim": CONTEXT, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
        "byt5": False, "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None,
        "meanflow_sum": False}, "HunyuanImage 2.1"),
    Family("krea2", "Krea2", lambda: {
        "image_model": "krea2", "features": 64, "channels": 16, "patch": 2, "layers": 1, "heads": 2, "kvheads": 1,
        "txtlayers": 1, "txtdim": CONTEXT, "txtheads": 2, "txtkvheads": 2}, "Krea 2"),
    Family("ernie-image", "ErnieImage", lambda: {
        "image_model": "ernie", "hidden_size": 64, "num_attention_heads": 2, "num_layers": 1,
        "ffn_hidden_size": 128, "in_channels": 128, "out_channels": 128, "text_in_dim": CONTEXT,
        "rope_axes_dim": (8, 12, 12)}, "ERNIE-Image"),
    # Anima's LLM adapter is fixed-size in the host (6 blocks at 1024, ~134 M parameters): the twin keeps it.
    Family("anima", "Anima", lambda: {
        "image_model": "anima", "max_img_h": 32, "max_img_w": 32, "max_frames": 8, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
        "concat_padding_mask": True, "crossattn_emb_channels": CONTEXT, "pos_emb_cls": "rope3d",
        "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
        "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 1, "num_heads": 2,
        "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
        "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}, "Anima"),
)}
# The twins tiny_models already has (Flux.1, SD3.5-like MMDiT, Qwen-Image), by the same names.
DIT_TWINS = {"flux": "Flux.1", "sd3": "SD3/SD3.5", "qwen-image": "Qwen-Image"}


def _wan(channels: int) -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "out_dim": channels, "num_heads": 2,
            "ffn_dim": 128, "num_layers": 1, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
            "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": channels, "text_dim": CONTEXT}


def _host_params(config: dict) -> dict:
    """The config without the keys this host's Flux/Chroma params do not know (0.3.75 predates txt_ids_dims...)."""
    import dataclasses as dc
    try:
        if config.get("image_model") in ("flux", "flux2"):
            from comfy.ldm.flux.model import FluxParams as params
        elif config.get("image_model") == "chroma":
            from comfy.ldm.chroma.model import ChromaParams as params
        else:
            return config
    except ImportError:
        return config
    known = {f.name for f in dc.fields(params)} if dc.is_dataclass(params) else None
    if known is None:
        return config
    return {k: v for k, v in config.items() if k in known or k == "image_model"}


def all_names() -> list[str]:
    """Every family with a twin: the tiny_models ones, then these."""
    return list(DIT_TWINS) + list(FAMILIES)


def missing_reason(name: str) -> Optional[str]:
    """Why this host cannot build the family's twin (it lacks the class), else None."""
    if name in DIT_TWINS:
        return None
    comfy_host.ensure_importable()
    import comfy.supported_models as sm
    if not hasattr(sm, FAMILIES[name].host_class):
        return f"{comfy_host.host_label()} has no {FAMILIES[name].host_class} model class ({FAMILIES[name].label})"
    return None


def available() -> list[str]:
    """Families this host can build."""
    return [n for n in all_names() if missing_reason(n) is None]


def tiny_family(name: str, seed: int = 0) -> Any:
    """A seeded tiny twin (tiny_models.TinyModel) of a family, conditioned by a 64-wide token sequence."""
    if name in DIT_TWINS:
        return tm.tiny_dit(name, seed)
    reason = missing_reason(name)
    if reason:
        raise comfy_host.HostError(reason)
    fam = FAMILIES[name]
    cfg, model, patcher = tm._build(fam.host_class, _host_params(fam.config()), seed, head_channels=None)
    return tm.TinyModel(patcher, model, cfg, CONTEXT, POOLED, seed)


def latent_channels(model: Any) -> int:
    """The channel count of the family's latents (its latent format)."""
    return int(model.latent_format.latent_channels)


def family_vae(model: Any, seed: int = 0) -> Any:
    """A seeded TAESD giving the family's latent channel count (128: the host's Flux.2 TAE, 2x2-packed 32 channels)."""
    tm._torch()
    import comfy.sd
    channels = latent_channels(model)
    sd = tm.taesd_state_dict(seed, latent_channels=channels)
    # ComfyUI reads a TAE's channel count from its file's metadata where the decoder's first conv does not say it.
    return comfy.sd.VAE(sd=sd, metadata={"tae_latent_channels": channels})


def text_clip(seed: int = 0) -> Any:
    """The text encoder the twins are conditioned by: the tiny Flux CLIP (CLIP-L + T5, real tokenizers)."""
    return tm.tiny_clip(seed=seed, kind="flux", hidden=CONTEXT)


def _flux2_full(hidden: int, depth: int, single: int, context: int, guidance: bool) -> dict:
    return dict(_flux2(guidance), axes_dim=[32, 32, 32, 32], num_heads=hidden // 128, hidden_size=hidden,
                context_in_dim=context, depth=depth, depth_single_blocks=single, yak_mlp=False, txt_norm=False)


def _wan_full(dim: int, ffn: int, layers: int, channels: int) -> dict:
    return dict(_wan(channels), dim=dim, ffn_dim=ffn, num_layers=layers, num_heads=dim // 128, text_dim=4096,
                text_len=512)


# Released models as ComfyUI's model_detection configures them, per tlora.arch name (tlora/arch_families.py).
FULL_CONFIGS: dict[str, tuple[str, Callable[[], dict]]] = {
    "flux2-dev": ("Flux2", lambda: _flux2_full(6144, 8, 48, 15360, True)),
    "flux2-klein-4b": ("Flux2", lambda: _flux2_full(3072, 5, 20, 7680, False)),
    "flux2-klein-9b": ("Flux2", lambda: _flux2_full(4096, 8, 24, 12288, False)),
    "chroma": ("Chroma", lambda: {
        "image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 64, "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2, "in_channels": 64,
        "hidden_size": 3072, "context_in_dim": 4096, "vec_in_dim": None, "depth": 19, "depth_single_blocks": 38,
        "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}),
    "z-image": ("ZImage", lambda: {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
        "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}),
    "wan22-5b": ("WAN22_T2V", lambda: _wan_full(3072, 14336, 30, 48)),
    "wan22-14b": ("WAN21_T2V", lambda: _wan_full(5120, 13824, 40, 16)),
    "ernie-image": ("ErnieImage", lambda: {"image_model": "ernie"}),
}


def family_on_meta(arch_name: str) -> Any:
    """A released model's diffusion model built by the host on the meta device (names and shapes only)."""
    import torch
    import comfy.supported_models as sm
    cls_name, make = FULL_CONFIGS[arch_name]
    if not hasattr(sm, cls_name):
        raise comfy_host.HostError(f"{comfy_host.host_label()} has no {cls_name} model class")
    return getattr(sm, cls_name)(_host_params(make())).get_model({}, device=torch.device("meta")).diffusion_model


def tiny_wan_vae(seed: int = 0, dim: int = 8) -> Any:
    """A `comfy.sd.VAE` around the host's own Wan 2.1 video VAE at a tiny width, seeded.

    A real video VAE: it reads an IMAGE batch as the frames of one clip and compresses time 4x
    (1 + 4k frames -> 1 + k latent frames), as ComfyUI's VAE Encode does with Wan's VAE.
    """
    tm._torch()
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd
    model = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    tm.init_module_(model, seed, gain=0.5)
    vae = comfy.sd.VAE(sd={k: v.detach().clone() for k, v in model.state_dict().items()})
    if getattr(vae, "latent_dim", 2) != 3:
        raise comfy_host.HostError("this ComfyUI did not read the tiny Wan VAE as a video VAE")
    return vae
