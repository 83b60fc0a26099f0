"""Tiny SD1.5/SDXL-shaped models, CLIP and TAESD VAE built with ComfyUI's own classes, seeded.

ComfyUI's ops (`comfy.ops.disable_weight_init`) skip parameter init, so a freshly built model
holds uninitialised memory. `init_module_` fills EVERY parameter deterministically from
(seed, parameter name): same seed -> bit-identical weights, independent of build order.

    from harness import tiny_models as tm
    m = tm.tiny_sd15(seed=0)                 # TinyModel: .patcher (ModelPatcher), .model (BaseModel)
    pos = m.cond(seed=1); neg = m.cond(seed=2)
    latent = tm.sample(m.patcher, seed=3, positive=pos, negative=neg)   # [1, 4, 8, 8]

Needs ComfyUI importable (`comfy_host.ensure_importable()`, done here on first use); it does
not need `setup_host` or node loading.
"""
from __future__ import annotations

import copy

import dataclasses
import math
import os
import zlib
from typing import Any, Optional

from . import comfy_host

# Hidden size of tiny text encoders; SD15 tiny context_dim defaults to the same width.
TINY_CLIP_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4}
SDXL_ADM_EXTRA = 6 * 256  # SDXL.encode_adm appends six 256-wide Timestep embeddings (sizes/crops)


def _torch() -> Any:
    """Import torch only after ComfyUI has been made importable (main.py warns otherwise)."""
    comfy_host.ensure_importable()
    import torch
    return torch


# --------------------------------------------------------------------------- seeded init

def _param_seed(seed: int, name: str) -> int:
    """Per-parameter seed: stable across processes (crc32, not hash())."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63 - 1)


def init_module_(module: Any, seed: int, *, gain: float = 1.0, bias_std: float = 0.02,
                 embed_std: float = 0.02, prefix: str = "") -> Any:
    """Initialise every parameter of `module` in place from (seed, name); returns the module.

    Norm weights 1 / biases 0; embeddings N(0, embed_std); other >=2-D weights
    N(0, (gain / sqrt(fan_in))^2) (variance-preserving, so deep stacks stay finite);
    biases N(0, bias_std^2); remaining 0-/1-D parameters: 1 for names ending in
    weight/scale, else 0. Buffers are left alone (ComfyUI computes them deterministically).
    """
    torch = _torch()
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            is_norm = isinstance(mod, norm_types) or "norm" in type(mod).__name__.lower()
            is_embed = isinstance(mod, torch.nn.Embedding)
            for pname, p in mod.named_parameters(recurse=False):
                full = prefix + (f"{mod_name}.{pname}" if mod_name else pname)
                gen = torch.Generator().manual_seed(_param_seed(seed, full))
                if is_norm:
                    val = torch.ones(p.shape) if pname == "weight" else torch.zeros(p.shape)
                elif is_embed:
                    val = torch.randn(p.shape, generator=gen) * embed_std
                elif p.ndim >= 2:
                    fan_in = p[0].numel()
                    val = torch.randn(p.shape, generator=gen) * (gain / math.sqrt(max(fan_in, 1)))
                elif pname == "bias":
                    val = torch.randn(p.shape, generator=gen) * bias_std
                elif pname.endswith(("weight", "scale")):
                    val = torch.ones(p.shape)
                else:
                    val = torch.zeros(p.shape)
                p.copy_(val.to(dtype=p.dtype, device=p.device))
    return module


def state_fingerprint(module_or_sd: Any) -> dict[str, Any]:
    """name -> tensor copy of a module's (or state dict's) tensors, for equality checks."""
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


# --------------------------------------------------------------------------- diffusion models

@dataclasses.dataclass
class TinyModel:
    """A built model: `patcher` (comfy.model_patcher.ModelPatcher) wrapping `model` (BaseModel)."""

    patcher: Any
    model: Any
    config: Any               # the comfy.supported_models config instance used
    context_dim: int
    pooled_dim: Optional[int]  # SDXL: width of the pooled text embedding; None for SD15
    seed: int

    def cond(self, seed: int = 0, tokens: int = 77, batch: int = 1, width: int = 64,
             height: int = 64) -> list:
        """Random conditioning in ComfyUI's format ([[tensor, {extras}]]) for this model."""
        torch = _torch()
        gen = torch.Generator().manual_seed(int(seed))
        c = torch.randn((batch, tokens, self.context_dim), generator=gen)
        extra: dict[str, Any] = {}
        if self.pooled_dim is not None:
            extra = {"pooled_output": torch.randn((batch, self.pooled_dim), generator=gen),
                     "width": width, "height": height, "target_width": width, "target_height": height}
        return [[c, extra]]

    def attention_modules(self) -> list[str]:
        """Names (under diffusion_model) of Linear layers to_q/to_k/to_v/to_out.0 in attention blocks."""
        return [n for n, _ in self.model.diffusion_model.named_modules()
                if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]


def sd15_unet_config(model_channels: int = 32, context_dim: int = 64, channel_mult: tuple = (1, 2),
                     num_res_blocks: int = 1, transformer_depth: int = 1, in_channels: int = 4) -> dict:
    """A UNet config in the form `comfy.model_detection.detect_unet_config` produces for SD1.x."""
    levels = len(channel_mult)
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": in_channels, "out_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": [transformer_depth] * (levels * num_res_blocks),
        "transformer_depth_output": [transformer_depth] * (levels * (num_res_blocks + 1)),
        "channel_mult": list(channel_mult), "transformer_depth_middle": transformer_depth,
        "use_linear_in_transformer": False, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def sdxl_unet_config(model_channels: int = 32, context_dim: int = 64, pooled_dim: int = 32,
                     channel_mult: tuple = (1, 2), num_res_blocks: int = 1,
                     transformer_depth: tuple = (0, 1)) -> dict:
    """An SDXL-shaped UNet config (linear proj, label embedding, no attention at level 0 like SDXL)."""
    levels = len(channel_mult)
    td = list(transformer_depth)
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": pooled_dim + SDXL_ADM_EXTRA,
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": [d for d in td for _ in range(num_res_blocks)],
        # UNetModel pops from the end for the deepest output block first.
        "transformer_depth_output": [d for d in td for _ in range(num_res_blocks + 1)],
        "channel_mult": list(channel_mult), "transformer_depth_middle": max(td),
        "use_linear_in_transformer": True, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _build(config_cls_name: str, unet_config: dict, seed: int, head_channels: Optional[int],
           dtype: Any = None) -> tuple[Any, Any, Any]:
    """Instantiate `comfy.supported_models.<name>(unet_config)`, its BaseModel and a ModelPatcher."""
    torch = _torch()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = getattr(sm, config_cls_name)(unet_config)
    if head_channels is not None:
        # SDXL's default 64-channel heads do not divide a 32-channel tiny model.
        cfg.unet_config["num_heads"] = -1
        cfg.unet_config["num_head_channels"] = head_channels
    dtype = dtype or torch.float32
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    init_module_(model, seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    if hasattr(patcher, "cached_patcher_init"):
        # What ComfyUI's own loaders register (0.33): how to load this model afresh. TrainLoraNode's
        # deep clone and the non-dynamic delegate reload through it; seeded init gives the same weights.
        patcher.cached_patcher_init = (_reload, (config_cls_name, copy.deepcopy(unet_config), seed,
                                                 head_channels, dtype))
    return cfg, model, patcher


def _reload(config_cls_name: str, unet_config: dict, seed: int, head_channels: Optional[int], dtype: Any,
            disable_dynamic: bool = False) -> Any:
    """A fresh patcher of the same tiny model (the `cached_patcher_init` factory; CPU patchers are never dynamic)."""
    return _build(config_cls_name, copy.deepcopy(unet_config), seed, head_channels, dtype)[2]


def tiny_sd15(seed: int = 0, *, model_channels: int = 32, context_dim: int = 64,
              channel_mult: tuple = (1, 2), transformer_depth: int = 1) -> TinyModel:
    """SD1.5-shaped UNet (~1 M params), eps-prediction, attention at every level; seeded init."""
    ucfg = sd15_unet_config(model_channels, context_dim, channel_mult, 1, transformer_depth)
    cfg, model, patcher = _build("SD15", ucfg, seed, head_channels=None)
    return TinyModel(patcher, model, cfg, context_dim, None, seed)


def tiny_sdxl(seed: int = 0, *, model_channels: int = 32, context_dim: int = 64, pooled_dim: int = 32,
              channel_mult: tuple = (1, 2), transformer_depth: tuple = (0, 1)) -> TinyModel:
    """SDXL-shaped UNet (linear-proj transformers, ADM label embedding); seeded init."""
    ucfg = sdxl_unet_config(model_channels, context_dim, pooled_dim, channel_mult, 1, transformer_depth)
    cfg, model, patcher = _build("SDXL", ucfg, seed, head_channels=16)
    return TinyModel(patcher, model, cfg, context_dim, pooled_dim, seed)


# --------------------------------------------------------------------------- transformer denoisers

def _mmdit_config(depth: int, in_channels: int = 16, adm: int = 2048, context: int = 4096, patches: int = 192,
                  qk_norm: Optional[str] = None, self_attn_blocks: tuple = ()) -> dict:
    """An MMDiT (SD3/SD3.5) config in the form comfy.model_detection produces (hidden = 64 x depth)."""
    cfg = {"in_channels": in_channels, "patch_size": 2, "out_channels": in_channels, "depth": depth,
           "input_size": None, "adm_in_channels": adm,
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": context, "out_features": 64 * depth}},
           "num_patches": patches * patches, "pos_embed_max_size": patches, "pos_embed_scaling_factor": None,
           "x_block_self_attn_layers": list(self_attn_blocks)}
    if qk_norm:
        cfg["qk_norm"] = qk_norm
    return cfg


def _flux_config(hidden: int = 3072, depth: int = 19, single: int = 38, context: int = 4096, vec: int = 768,
                 guidance: bool = True) -> dict:
    """A Flux config in the form comfy.model_detection produces (heads = hidden / 128, as it derives them)."""
    cfg = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": vec,
           "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": hidden // 128,
           "depth": depth, "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000,
           "qkv_bias": True, "guidance_embed": guidance}
    from comfy.ldm.flux.model import FluxParams
    if "txt_ids_dims" in getattr(FluxParams, "__dataclass_fields__", {}):  # 0.12: a required field
        cfg["txt_ids_dims"] = []
    return cfg


# Released models as ComfyUI detects them: (supported_models class, config maker) per tlora.arch name.
DIT_FULL = {
    "flux": ("Flux", lambda: _flux_config()),
    "sd3": ("SD3", lambda: _mmdit_config(24)),
    "sd35-medium": ("SD3", lambda: _mmdit_config(24, qk_norm="rms", self_attn_blocks=tuple(range(13)))),
    "sd35-large": ("SD3", lambda: _mmdit_config(38, qk_norm="rms")),
    "qwen-image": ("QwenImage", lambda: {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60}),
}
# Tiny twins with every module kind of the family (Flux: 1 double + 1 single block, guidance;
# SD3.5-medium-like: 2 joint blocks, the first with attn2, the last context block pre-only).
DIT_TINY = {
    "flux": ("Flux", lambda: _flux_config(hidden=128, depth=1, single=1, context=64, vec=32)),
    # context 4096: ComfyUI's SD3 text encoder pads CLIP-L + CLIP-G to 4096 columns whatever their width.
    "sd3": ("SD3", lambda: _mmdit_config(2, adm=32, context=4096, patches=16, qk_norm="rms", self_attn_blocks=(0,))),
    "qwen-image": ("QwenImage", lambda: {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1,
                                         "attention_head_dim": 32, "num_attention_heads": 2,
                                         "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}),
}
# (context width, pooled width or None) of each tiny twin's conditioning.
DIT_TINY_COND = {"flux": (64, 32), "sd3": (4096, 32), "qwen-image": (64, None)}


def dit_on_meta(family: str) -> Any:
    """The released model's diffusion model built by the host on the meta device (names and shapes only)."""
    import comfy.supported_models as sm
    name, make = DIT_FULL[family]
    return getattr(sm, name)(make()).get_model({}, device=_torch().device("meta")).diffusion_model


def tiny_dit(family: str, seed: int = 0) -> TinyModel:
    """A tiny Flux / SD3 / Qwen-Image from the host's own classes (supported_models config); seeded init."""
    name, make = DIT_TINY[family]
    cfg, model, patcher = _build(name, make(), seed, head_channels=None)
    torch = _torch()
    dm = model.diffusion_model
    if getattr(dm, "pos_embed", None) is not None:  # MMDiT's is torch.empty (a checkpoint fills it): seed it
        gen = torch.Generator().manual_seed(_param_seed(seed, "pos_embed"))
        with torch.no_grad():
            dm.pos_embed.copy_(torch.randn(dm.pos_embed.shape, generator=gen) * 0.02)
    context, pooled = DIT_TINY_COND[family]
    return TinyModel(patcher, model, cfg, context, pooled, seed)


# --------------------------------------------------------------------------- text encoder

def tiny_clip(seed: int = 0, kind: str = "sd15", *, hidden: int = 64, layers: int = 3,
              dtype: Any = None) -> Any:
    """A `comfy.sd.CLIP` with ComfyUI's real SD1 (or SDXL) tokenizer and a tiny seeded encoder.

    sd15: CLIP-L-shaped, width `hidden` (conditioning [B, 77, hidden]; pair with
    tiny_sd15(context_dim=hidden)). sdxl: clip_l + clip_g of width hidden//2 each, so the
    context is `hidden` wide and the pooled output hidden//2 (pair with tiny_sdxl defaults).
    `layers` must be >= 3 for sdxl (both encoders read the penultimate layer, asserted by
    ComfyUI). Uses the per-model config override `<clip>_model_config` in model_options (0.3.75's
    SDClipModel); raises if ComfyUI ignored it.
    """
    _torch()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base as smb
    small = dict(TINY_CLIP_CONFIG, num_hidden_layers=layers)
    if kind == "sd15":
        target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        opts = {"clip_l_model_config": dict(small, hidden_size=hidden, intermediate_size=2 * hidden)}
        expect = {"clip_l": hidden}
    elif kind == "sdxl":
        half = hidden // 2
        target = smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        part = dict(small, hidden_size=half, intermediate_size=2 * half, num_attention_heads=2)
        opts = {"clip_l_model_config": dict(part), "clip_g_model_config": dict(part, projection_dim=half)}
        expect = {"clip_l": half, "clip_g": half}
    elif kind == "flux":
        # CLIP-L (pooled -> vec_in, 32 wide) + T5 (sequence -> txt_in, `hidden` wide), ComfyUI's real tokenizers.
        import comfy.text_encoders.flux
        target = smb.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip())
        opts = {"clip_l_model_config": dict(small, hidden_size=32, intermediate_size=64, num_attention_heads=2),
                "t5xxl_model_config": {"d_model": hidden, "d_ff": 2 * hidden, "d_kv": 16, "num_heads": 4,
                                       "num_layers": 2}}
        expect = {"clip_l": 32}
    elif kind == "sd3":
        # CLIP-L + CLIP-G, 16 wide each (pooled 32), no T5: the conditioning is padded to 4096 by the host.
        import comfy.text_encoders.sd3_clip
        target = smb.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                comfy.text_encoders.sd3_clip.sd3_clip(t5=False))
        part = dict(small, hidden_size=16, intermediate_size=32, num_attention_heads=2)
        opts = {"clip_l_model_config": dict(part), "clip_g_model_config": dict(part, projection_dim=16)}
        expect = {"clip_l": 16, "clip_g": 16}
    else:
        raise ValueError(f"kind must be 'sd15', 'sdxl', 'flux' or 'sd3', not {kind!r}")
    if dtype is not None:
        opts["dtype"] = dtype
    clip = comfy.sd.CLIP(target, model_options=opts)
    enc = clip.cond_stage_model
    for name, width in expect.items():
        got = getattr(enc, name).transformer.text_model.embeddings.token_embedding.weight.shape[1]
        if got != width:
            raise comfy_host.HostError(f"this ComfyUI ignored {name}_model_config (width {got}, wanted {width})")
    init_module_(enc, seed)
    return clip


def encode_text(clip: Any, text: str) -> list:
    """Conditioning for `text`, exactly as the CLIPTextEncode node builds it."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


# --------------------------------------------------------------------------- VAE (TAESD)

def taesd_state_dict(seed: int = 0, latent_channels: int = 4, out_gain: float = 0.25) -> dict:
    """Seeded weights for ComfyUI's TAESD (keys `taesd_encoder.*`, `taesd_decoder.*`, vae_scale/shift).

    The decoder's last conv is scaled by `out_gain` with bias 0.5 so decoded pixels sit around
    mid-grey with visible variation instead of clamping to black/white.
    """
    torch = _torch()
    import comfy.taesd.taesd as taesd
    m = taesd.TAESD(latent_channels=latent_channels)
    init_module_(m, seed)
    last = m.taesd_decoder[-1]
    with torch.no_grad():
        last.weight.mul_(out_gain)
        last.bias.fill_(0.5)
        m.vae_scale.fill_(1.0)
        m.vae_shift.fill_(0.0)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def tiny_vae(seed: int = 0, latent_channels: int = 4) -> Any:
    """A `comfy.sd.VAE` around a seeded TAESD (4 latent channels, or 16 for Flux/SD3; 8x down/up-scale)."""
    _torch()
    import comfy.sd
    return comfy.sd.VAE(sd=taesd_state_dict(seed, latent_channels=latent_channels))


# --------------------------------------------------------------------------- sampling

def empty_latent(width: int = 64, height: int = 64, batch: int = 1, channels: int = 4) -> Any:
    """Zeros latent like EmptyLatentImage (width/height in pixels, 8x downscale)."""
    torch = _torch()
    return torch.zeros([batch, channels, height // 8, width // 8])


def sample(patcher: Any, seed: int, positive: list, negative: Optional[list] = None, *,
           latent: Any = None, width: int = 64, height: int = 64, steps: int = 2, cfg: float = 2.0,
           sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0) -> Any:
    """Sample a latent with ComfyUI's own `comfy.sample.sample` (what KSampler runs); deterministic.

    Noise comes from `comfy.sample.prepare_noise(latent, seed)` on the CPU, so the same
    (weights, patches, seed, conds) give a bit-identical result. Returns the latent tensor.
    """
    torch = _torch()
    import comfy.sample
    if latent is None:
        latent = empty_latent(width, height)
    if negative is None:
        negative = [[torch.zeros_like(positive[0][0]), dict(positive[0][1])]]
    if hasattr(comfy.sample, "fix_empty_latent_channels"):
        latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent, denoise=denoise, disable_pbar=True, seed=seed)


# --------------------------------------------------------------------------- single-file checkpoint

CHECKPOINT_FORMAT_VERSION = 1  # bump when the checkpoint's content changes (it is part of the cache name)
CACHE_DIR = comfy_host.ROOT / ".cache"


def default_checkpoint_path(seed: int = 0) -> os.PathLike:
    """Where the cached harness checkpoint for `seed` lives (.cache/ is ignored by git)."""
    return CACHE_DIR / f"tlora-tiny-sd15-s{seed}-v{CHECKPOINT_FORMAT_VERSION}.safetensors"


def sd15_checkpoint_state_dict(seed: int = 0, dtype: str = "fp16") -> dict:
    """State dict of a stock-loadable SD1.5 checkpoint: full-width shallow UNet, TAESD, full CLIP-L.

    ComfyUI's detection needs model_channels 320 / context_dim 768 (SD15 config match) and a
    spatial transformer (attn2.to_k gives the context width); the UNet has one level with one
    res block (~26 M params). `first_stage_model.taesd_*` keys make comfy.sd.VAE build a TAESD.
    The text encoder must be the full CLIP-L shape SD1ClipModel builds (~123 M params).
    Keys are produced by ComfyUI's own `process_*_state_dict_for_saving` of the SD15 config.
    """
    torch = _torch()
    import comfy.sd1_clip
    import comfy.supported_models as sm
    tdtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ucfg = sd15_unet_config(model_channels=320, context_dim=768, channel_mult=(1,), transformer_depth=1)
    cfg = sm.SD15(ucfg)
    # Built directly in the stored dtype (init draws fp32 and casts): no fp32 copy of the
    # ~150 M parameters is ever held, which keeps the peak memory around 0.5 GB.
    cfg.set_inference_dtype(tdtype, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    init_module_(model.diffusion_model, seed, prefix="unet.")
    out: dict = {}
    out.update(cfg.process_unet_state_dict_for_saving(dict(model.diffusion_model.state_dict())))
    del model
    out.update(cfg.process_vae_state_dict_for_saving(taesd_state_dict(seed)))
    te = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=tdtype)
    init_module_(te, seed, prefix="te.")
    out.update(cfg.process_clip_state_dict_for_saving(dict(te.state_dict())))
    del te
    return {k: v.detach().to(tdtype).contiguous() for k, v in out.items()}


def check_checkpoint_detection(sd: dict) -> str:
    """Name of the config stock ComfyUI detects for `sd` (raises unless SD15 with a TAESD VAE)."""
    _torch()
    import comfy.model_detection
    unet_keys = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    cfg = comfy.model_detection.model_config_from_unet(unet_keys, "model.diffusion_model.")
    name = type(cfg).__name__ if cfg is not None else None
    if name != "SD15":
        raise comfy_host.HostError(f"checkpoint detected as {name}, not SD15")
    if "first_stage_model.taesd_decoder.1.weight" not in sd:
        raise comfy_host.HostError("checkpoint lacks the TAESD keys comfy.sd.VAE detects")
    return name


def ensure_checkpoint(path: Optional[os.PathLike] = None, seed: int = 0, force: bool = False,
                      dtype: str = "fp16") -> os.PathLike:
    """Write the harness checkpoint to `path` (default: the .cache path) unless it exists; returns it.

    Written to a temporary name and renamed, so concurrent sessions never see half a file.
    """
    from pathlib import Path
    from safetensors.torch import save_file
    dest = Path(path) if path is not None else Path(default_checkpoint_path(seed))
    if dest.is_file() and not force:
        return dest
    sd = sd15_checkpoint_state_dict(seed, dtype)
    check_checkpoint_detection(sd)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    meta = {"tlora.harness": "tiny-sd15", "tlora.seed": str(seed),
            "tlora.format_version": str(CHECKPOINT_FORMAT_VERSION), "tlora.dtype": dtype}
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; other tools may read the cache
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest
