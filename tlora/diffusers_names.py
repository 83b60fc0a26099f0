"""The one name mapping between ComfyUI's generic module names and diffusers module paths.

Host-free (nothing from diffusers or ComfyUI is imported): the tables are built from
`tlora.arch` (`all_modules(arch)` and the family configs) by the rules of diffusers' own
single-file conversion (`loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
`convert_flux_transformer_checkpoint_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`)
and of ComfyUI's inverse maps (`comfy/utils.py` `unet_to_diffusers`, `flux_to_diffusers`,
`mmdit_to_diffusers`).

Diffusers paths are component-prefixed as in a pipeline: `unet.` (SD1.5, SDXL),
`transformer.` (Flux, SD3/SD3.5, Qwen-Image), `text_encoder.` (CLIP-L), `text_encoder_2.`
(SDXL's and SD3's CLIP-G). A bare model's module path is the part after the component.

One generic module can cover several diffusers modules: the fused weights Flux and SD3 keep
as one matrix (`img_attn.qkv` -> `attn.to_q`, `to_k`, `to_v`; Flux `single_blocks.N.linear1`
-> `attn.to_q`, `to_k`, `to_v`, `proj_mlp`) are row blocks in diffusers. Each diffusers module
takes a list of row pieces `(offset, count)` of the generic weight, concatenated in order
(`None` = the whole weight):

* `diffusers_rows(arch)`: every mapping, pieces as tuples. A row *permutation* appears only on
  the shift/scale modulations that diffusers stores swapped (`swap_scale_shift`): Flux and SD3
  `final_layer.adaLN_modulation.1` -> `norm_out.linear` and SD3's last, pre-only
  `context_block.adaLN_modulation.1` -> `norm1_context.linear`, which take generic rows
  (h..2h) then (0..h).
* `diffusers_map(arch)`: the contiguous view (one `(offset, count)` slice or None per diffusers
  module), what a trainer needs; the swapped modulations are left out of it and listed with
  the reason by `unmapped(arch)`.

`arch` is a name of `tlora.arch.ARCHS` (the released models) or an `Arch` built for a live model
of any size (a diffusers host builds one from the model's config). Every module of
`tlora.arch.all_modules(arch)` (every preset, with convs and text encoders) is
in `diffusers_rows` for sd15, sdxl, flux, sd3, sd35-medium, sd35-large and qwen-image.
Not tabled at all (no generic names in `tlora.arch` either): T5 (Flux/SD3 `text_encoder_2` /
`text_encoder_3`), Qwen2.5-VL, conv_in/conv_out, time/label embeddings of the UNets, SD3's
`x_embedder` patch conv.
"""
from __future__ import annotations

import re
from functools import lru_cache

from . import arch as arch_mod
from . import arch_families as families

Piece = tuple[int, int]
Target = tuple[str, tuple[Piece, ...] | None]  # (diffusers path, row pieces of the generic weight or None)

DENOISER_COMPONENT = {"sd15": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer",
                      "sd35-medium": "transformer", "sd35-large": "transformer", "qwen-image": "transformer",
                      "flux2-dev": "transformer", "flux2-klein-4b": "transformer", "flux2-klein-9b": "transformer",
                      "chroma": "transformer", "z-image": "transformer", "wan22-5b": "transformer",
                      "wan22-14b": "transformer", "ernie-image": "transformer"}
# CLIP encoders as a diffusers pipeline names its components (T5 / Qwen2.5-VL are not tabled).
TEXT_ENCODER_COMPONENT = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
SWAPPED = "diffusers stores its shift/scale halves swapped (swap_scale_shift): not a contiguous slice"

_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resolve(arch: str | arch_mod.Arch) -> arch_mod.Arch:
    """An architecture by name (`tlora.arch.ARCHS`) or an `Arch` built for a live model (any size)."""
    return arch if isinstance(arch, arch_mod.Arch) else arch_mod._arch(arch)


def denoiser_component(arch: str | arch_mod.Arch) -> str:
    """`unet` or `transformer`: the pipeline component holding this architecture's denoiser."""
    return "unet" if isinstance(_resolve(arch).denoiser, arch_mod.UNetConfig) else "transformer"


def _unet_blocks(cfg: arch_mod.UNetConfig) -> tuple[dict[int, tuple[str, bool]], dict[int, str]]:
    """ComfyUI input/output block index -> diffusers prefix (and whether it is a sampler)."""
    inputs: dict[int, tuple[str, bool]] = {}
    n = 1
    levels = len(cfg.channel_mult)
    for level in range(levels):
        for j in range(cfg.num_res_blocks[level]):
            inputs[n] = (f"down_blocks.{level}.{{}}.{j}", False)
            n += 1
        if level != levels - 1:
            inputs[n] = (f"down_blocks.{level}.downsamplers.0", True)
            n += 1
    outputs: dict[int, str] = {}
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks[level] + 1):
            outputs[n] = f"up_blocks.{up}.{{}}.{j}|up_blocks.{up}.upsamplers.0"
            n += 1
    return inputs, outputs


def _unet_path(cfg: arch_mod.UNetConfig, path: str) -> str:
    """diffusers UNet2DConditionModel path of a ComfyUI UNet module path (without `diffusion_model.`)."""
    inputs, outputs = _unet_blocks(cfg)
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{index // 2}.{_RESNET[rest]}"
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)", path)
    if m is None:
        raise ValueError(f"not a UNet block module: {path}")
    kind, block, index, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        prefix, sampler = inputs[block]
        if sampler:
            if rest != "op":
                raise ValueError(f"unexpected downsampler module {path}")
            return f"{prefix}.conv"
        if index == 0:
            return f"{prefix.format('resnets')}.{_RESNET[rest]}"
        return f"{prefix.format('attentions')}.{rest}"
    blocks, upsampler = outputs[block].split("|")
    if index == 0:
        return f"{blocks.format('resnets')}.{_RESNET[rest]}"
    if rest == "conv":  # output_blocks.N.1.conv (no attention) or .2.conv (after one)
        return f"{upsampler}.conv"
    return f"{blocks.format('attentions')}.{rest}"


def _row_blocks(names: list[str], h: int) -> list[Target]:
    """Consecutive h-row blocks of a fused weight, one diffusers weight each (q, k, v of a fused qkv)."""
    return [(n, ((i * h, h),)) for i, n in enumerate(names)]


def _double_block_targets(path: str, h: int, block: dict[str, str]) -> list[Target] | None:
    """A Flux-style double block's weight: its fused qkv as q/k/v rows, else the one diffusers weight `block`
    names; None when the path is not in a double block."""
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", path)
    if m is None:
        return None
    b, rest = f"transformer_blocks.{m.group(1)}", m.group(2)
    if rest == "img_attn.qkv":
        return _row_blocks([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], h)
    if rest == "txt_attn.qkv":
        return _row_blocks([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], h)
    return [(f"{b}.{block[rest]}", None)]


def _flux_targets(cfg: arch_mod.FluxConfig, path: str) -> list[Target]:
    h, mlp = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
    basic = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
    if path in basic:
        return [(basic[path], None)]
    if path == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", ((h, h), (0, h)))]
    block = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
             "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
             "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
             "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
    double = _double_block_targets(path, h, block)
    if double is not None:
        return double
    m = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", path)
    if m:
        b, rest = f"single_transformer_blocks.{m.group(1)}", m.group(2)
        if rest == "linear1":
            return _row_blocks([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], h) + \
                [(f"{b}.proj_mlp", ((3 * h, mlp),))]
        single = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
        return [(f"{b}.{single[rest]}", None)]
    raise ValueError(f"not a Flux module: {path}")


def _mmdit_targets(cfg: arch_mod.MMDiTConfig, path: str) -> list[Target]:
    h = 64 * cfg.depth
    basic = {"t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
             "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
    if path in basic:
        return [(basic[path], None)]
    if path == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", ((h, h), (0, h)))]
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)", path)
    if m is None:
        raise ValueError(f"not an MMDiT module: {path}")
    i, stream, rest = int(m.group(1)), m.group(2), m.group(3)
    b = f"transformer_blocks.{i}"
    if stream == "x_block":
        if rest in ("attn.qkv", "attn2.qkv"):
            a = rest.split(".")[0]
            return _row_blocks([f"{b}.{a}.to_q", f"{b}.{a}.to_k", f"{b}.{a}.to_v"], h)
        block = {"attn.proj": "attn.to_out.0", "attn2.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj",
                 "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm1.linear"}
        return [(f"{b}.{block[rest]}", None)]
    if rest == "attn.qkv":
        return _row_blocks([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], h)
    if rest == "adaLN_modulation.1" and i == cfg.depth - 1:  # the pre-only context block: AdaLayerNormContinuous
        return [(f"{b}.norm1_context.linear", ((h, h), (0, h)))]
    block = {"attn.proj": "attn.to_add_out", "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2",
             "adaLN_modulation.1": "norm1_context.linear"}
    return [(f"{b}.{block[rest]}", None)]


def _flux2_targets(cfg: families.Flux2Config, path: str) -> list[Target]:
    """Flux.2 (diffusers Flux2Transformer2DModel): q/k/v slices of the double blocks' qkv; the single blocks'
    fused linear1/linear2 are whole diffusers weights (attn.to_qkv_mlp_proj, attn.to_out)."""
    h = cfg.hidden
    basic = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
             "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
             "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
             "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
             "single_stream_modulation.lin": "single_stream_modulation.linear"}
    if path in basic:
        return [(basic[path], None)]
    if path == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", ((h, h), (0, h)))]
    block = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
             "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
             "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
    double = _double_block_targets(path, h, block)
    if double is not None:
        return double
    m = re.fullmatch(r"single_blocks\.(\d+)\.(linear1|linear2)", path)
    if m:
        sub = "attn.to_qkv_mlp_proj" if m.group(2) == "linear1" else "attn.to_out"
        return [(f"single_transformer_blocks.{m.group(1)}.{sub}", None)]
    raise ValueError(f"not a Flux.2 module: {path}")


def _chroma_targets(cfg: families.ChromaConfig, path: str) -> list[Target]:
    """Chroma (diffusers ChromaTransformer2DModel): Flux.1's slices without modulations, the guidance MLP."""
    h = cfg.hidden
    basic = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
             "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
             "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"}
    if path in basic:
        return [(basic[path], None)]
    m = re.fullmatch(r"distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)", path)
    if m:
        return [(f"distilled_guidance_layer.layers.{m.group(1)}.linear_{1 if m.group(2) == 'in_layer' else 2}",
                 None)]
    flux = arch_mod.FluxConfig(h, cfg.depth, cfg.depth_single, 4.0, cfg.in_channels, cfg.context, 768, False)
    return _flux_targets(flux, path)


def _zimage_targets(cfg: families.ZImageConfig, path: str) -> list[Target]:
    """Z-Image (diffusers ZImageTransformer2DModel, ComfyUI's z_image_to_diffusers): to_q/k/v slices of qkv."""
    d = cfg.dim
    basic = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
             "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"}
    if path in basic:
        return [(basic[path], None)]
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.attention\.(qkv|out)", path)
    if m:
        if m.group(2) == "out":
            return [(f"{m.group(1)}.attention.to_out.0", None)]
        return [(f"{m.group(1)}.attention.to_{p}", ((i * d, d),)) for i, p in enumerate("qkv")]
    return [(path, None)]  # feed_forward.w1/2/3, adaLN_modulation.0, t_embedder, cap_embedder: same names


_WAN = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}


def _wan_targets(path: str) -> list[Target]:
    """Wan (diffusers WanTransformer3DModel): self/cross attention as attn1/attn2, q/k/v/o as to_q/../to_out.0."""
    if path in _WAN:
        return [(_WAN[path], None)]
    m = re.fullmatch(r"blocks\.(\d+)\.(self_attn|cross_attn|ffn)\.(.+)", path)
    if m is None:
        raise ValueError(f"not a Wan module: {path}")
    b, part, rest = f"blocks.{m.group(1)}", m.group(2), m.group(3)
    if part == "ffn":
        return [(f"{b}.ffn.{'net.0.proj' if rest == '0' else 'net.2'}", None)]
    attn = "attn1" if part == "self_attn" else "attn2"
    return [(f"{b}.{attn}.{ {'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'o': 'to_out.0'}[rest]}", None)]


def _targets(a: arch_mod.Arch, generic: str) -> list[Target]:
    if generic.startswith(arch_mod.TE_PREFIX):
        name, sep, rest = generic[len(arch_mod.TE_PREFIX):].partition(".transformer.")
        if not sep or name not in TEXT_ENCODER_COMPONENT:
            raise ValueError(f"not a CLIP module: {generic}")
        return [(f"{TEXT_ENCODER_COMPONENT[name]}.{rest}", None)]
    path = generic.removeprefix(arch_mod.UNET_PREFIX)
    component = denoiser_component(a)
    cfg = a.denoiser
    if isinstance(cfg, arch_mod.UNetConfig):
        found = [(_unet_path(cfg, path), None)]
    elif isinstance(cfg, arch_mod.FluxConfig):
        found = _flux_targets(cfg, path)
    elif isinstance(cfg, arch_mod.MMDiTConfig):
        found = _mmdit_targets(cfg, path)
    elif isinstance(cfg, families.Flux2Config):
        found = _flux2_targets(cfg, path)
    elif isinstance(cfg, families.ChromaConfig):
        found = _chroma_targets(cfg, path)
    elif isinstance(cfg, families.ZImageConfig):
        found = _zimage_targets(cfg, path)
    elif isinstance(cfg, families.WanConfig):
        found = _wan_targets(path)
    else:  # Qwen-Image, ERNIE-Image: ComfyUI uses the diffusers names
        found = [(path, None)]
    return [(f"{component}.{p}", pieces) for p, pieces in found]


@lru_cache(maxsize=None)
def _rows_of(a: arch_mod.Arch) -> tuple[tuple[str, tuple[Target, ...]], ...]:
    generics = [name for name, _, _ in a.denoiser_modules()]
    for te in a.text_encoders:
        generics += [name for name, _, _ in arch_mod.text_encoder_modules(te)]
    return tuple((generic, tuple(_targets(a, generic))) for generic in generics)


def _rows(arch: str | arch_mod.Arch) -> tuple[tuple[str, tuple[Target, ...]], ...]:
    return _rows_of(_resolve(arch))


def diffusers_rows(arch: str | arch_mod.Arch) -> dict[str, list[Target]]:
    """{generic name: [(diffusers path, row pieces or None)]} for every module of the architecture."""
    return {generic: list(targets) for generic, targets in _rows(arch)}


def diffusers_map(arch: str | arch_mod.Arch) -> dict[str, list[tuple[str, Piece | None]]]:
    """{generic name: [(diffusers path, (row offset, row count) or None = whole)]}: the contiguous mappings.

    The swapped modulations (see `unmapped`) are left out.
    """
    out: dict[str, list[tuple[str, Piece | None]]] = {}
    for generic, targets in _rows(arch):
        if all(pieces is None or len(pieces) == 1 for _, pieces in targets):
            out[generic] = [(path, None if pieces is None else pieces[0]) for path, pieces in targets]
    return out


def unmapped(arch: str | arch_mod.Arch) -> dict[str, str]:
    """{generic name: why}: modules of `all_modules(arch)` that `diffusers_map` leaves out."""
    contiguous = diffusers_map(arch)
    return {generic: SWAPPED for generic, _ in _rows(arch) if generic not in contiguous}


def _inverse(arch: str | arch_mod.Arch) -> dict[str, str]:
    return _inverse_of(_resolve(arch))


@lru_cache(maxsize=None)
def _inverse_of(arch: arch_mod.Arch) -> dict[str, str]:
    return {path: generic for generic, targets in _rows(arch) for path, pieces in targets if pieces is None}


def generic_name(arch: str | arch_mod.Arch, diffusers_path: str) -> str | None:
    """The generic name of a component-prefixed diffusers module that is one whole generic weight.

    None when the module is a slice of a fused generic weight (Flux/SD3 q, k, v, `proj_mlp`), a
    row permutation of one (the swapped modulations) or unknown.
    """
    return _inverse(arch).get(diffusers_path)


def diffusers_sources(arch: str | arch_mod.Arch) -> dict[str, tuple[str, tuple[Piece, ...] | None]]:
    """{diffusers path: (generic name, row pieces or None)}: where every mapped diffusers module comes from."""
    return {path: (generic, pieces) for generic, targets in _rows(arch) for path, pieces in targets}



def whole_weight_aliases(archs: "tuple[str, ...] | list[str]", weight_keys: "set[str] | dict") -> dict[str, str]:
    """{diffusers path: weight key} of a live model's whole weights, for files named as diffusers names them.

    ComfyUI's key maps read diffusers names for some families (Flux, SD3, Z-Image: the row slices
    of fused weights among them) but not for others (Wan: `transformer.blocks.0.attn1.to_q`, what
    diffusers and ai-toolkit write). `archs` are the tables of the live model's family (any depth:
    only names whose weight the live model has count); sliced names are left to the host's map.
    """
    out: dict[str, str] = {}
    for arch in archs:
        for generic, targets in _rows(arch):
            weight_key = generic + ".weight"
            if weight_key not in weight_keys or len(targets) != 1 or targets[0][1] is not None:
                continue
            out.setdefault(targets[0][0], weight_key)
    return out


def kohya_aliases(key_map: dict) -> dict:
    """kohya-style forms (`lora_unet_` + the path with underscores) of a host key map's bare dotted names.

    ComfyUI's key map reads some families' diffusers-style names bare (DiffSynth's `layers.0.attention.to_q`
    for Z-Image) but not their kohya forms, which musubi-tuner writes for the families it trains on
    diffusers-style modules (`lora_unet_layers_0_attention_to_q`). Each such form points where its dotted
    name points; a form the map already has is left to the map.
    """
    out = {}
    for name, target in key_map.items():
        if "." not in name or name.startswith(("diffusion_model.", "transformer.", "unet.", "text_encoders.",
                                                "lora_", "lycoris_")) or name.endswith((".bias", ".weight")):
            continue
        alias = "lora_unet_" + name.replace(".", "_")
        if alias not in key_map:
            out[alias] = target
    return out
