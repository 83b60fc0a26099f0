"""Which of a model's weights an adapter targets, by rule on a live module's dotted path: the role
of each denoiser weight (`role_of`), the groups each targets preset takes (`preset_groups`) and the
membership test the trainers and the tables share (`path_in_groups`).

The rules work on any model a host loads (a DiT's or a UNet's paths under its root, a CLIP's under
its own), table or not; `tlora.arch`'s tables are generated to agree with them (held by tests on
the hosts' own model classes). `tlora.arch` re-exports these names.
"""
from __future__ import annotations

import re

PRESETS = ("attn", "attn-ff", "all-linear")

# Groups each preset takes (see the module docstring).
_PRESET_GROUPS = {
    "attn": ("attn",),
    "attn-ff": ("attn", "ff"),
    "all-linear": ("attn", "ff", "proj", "mod", "embed"),  # UNets have no mod/embed rows
}
_TE_PRESET_GROUPS = {
    "attn": ("te_attn",),
    "attn-ff": ("te_attn", "te_mlp"),
    "all-linear": ("te_attn", "te_mlp"),
}
# Rules on a live module's dotted path under its root (a denoiser, a CLIP): what a trainer
# adapts on a model it was handed, table or not. The denoiser's weights are sorted into roles by
# `role_of` (below); the text encoders' and the UNets' convs by these patterns.
GROUP_PATTERNS = {
    "conv": re.compile(r"(^|\.)(in_layers\.2|out_layers\.3|skip_connection|op|upsample\.conv|"
                       r"[0-9]+\.conv)$"
                       r"|(^|\.)resnets\.\d+\.(conv1|conv2|conv_shortcut)$"),  # diffusers' UNet2DConditionModel
    "te_attn": re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
    "te_mlp": re.compile(r"(^|\.)mlp\.(fc1|fc2)$"),
}
ROLES = ("attn", "ff", "proj", "mod", "embed")

# Role rules (checked in this order on a weight's path; one role per weight):
# * none: a UNet's timestep/label embeddings and its ResBlocks' emb_layers (they act on the timestep,
#   not on image tokens; kohya-style trainers leave them out too);
# * proj: a SpatialTransformer's proj_in/proj_out (UNets only; a DiT's root proj_out is an embedder);
# * mod: any path segment naming a modulation (`img_mod`, `modulation`, `adaLN_modulation`,
#   `double_stream_modulation_img`, `adaln_modulation_mlp`, Wan's `time_projection`, Krea 2's `tproj`)
#   or an adaptive norm's linear (`norm_out.linear`, `norm1_context.linear`, `final_norm.linear`);
# * attn: any segment naming an attention (`attn`, `attn1`, `img_attn`, `self_attn`, `cross_attn`,
#   `attention`, `self_attention`: its q/k/v/qkv/out/gate projections whatever they are called), and the
#   fused single-stream block weights `<blocks>.N.linear1/linear2` (Flux, Flux.2, Chroma, HunyuanImage:
#   q, k, v and MLP-in in one weight, attention-out and MLP-out in the other);
# * ff: inside a repeated block (a path with a numbered segment before its end), a segment naming an
#   MLP (`mlp`, `img_mlp`, `ffn`, `ff`, `ff_i`, `ff_context`, `feed_forward`, `experts`, `shared_experts`);
#   an `mlp` outside blocks is a timestep/text embedder's (`t_embedder.mlp.0`) and goes to embed;
# * embed: every other linear (patch/text/timestep embedders, final projections, guidance approximators).
_NO_ROLE = re.compile(r"(^|\.)(time_embed|label_emb|emb_layers)(\.|$)")
_PROJ = re.compile(r"(^|\.)(input_blocks|output_blocks)\.\d+\.\d+\.(proj_in|proj_out)$"
                   r"|(^|\.)middle_block\.\d+\.(proj_in|proj_out)$|(^|\.)attentions\.\d+\.(proj_in|proj_out)$")
_MOD_SEGMENT = re.compile(r"((img|txt)_)?mod(ulation)?(_\w+)?|\w*_mod(ulation)?(_\w+)?|\w*ada_?ln\w*"
                          r"|tproj|time_projection", re.IGNORECASE)
_NORM_LINEAR = re.compile(r"(^|\.)\w*norm\w*\.linear$", re.IGNORECASE)
_ATTN_SEGMENT = re.compile(r"\w*(attn|attention)\w*", re.IGNORECASE)
_FUSED_SINGLE = re.compile(r"\.\d+\.linear[12]$")
_FF_SEGMENT = re.compile(r"(\w+_)?(mlp|ffn|ff|feed_forward|experts|shared_experts)(_\w+)?", re.IGNORECASE)
_IN_BLOCK = re.compile(r"(^|\.)\d+\.")


def role_of(path: str, conv: bool = False) -> str | None:
    """The role (`attn`, `ff`, `proj`, `mod`, `embed`) of a denoiser weight at this path, None for none.

    `conv`: the module is a convolution: only a SpatialTransformer's 1x1 proj_in/out has a role
    (`proj`); ResBlock convs are the separate `conv` group (`with_convs`).
    """
    if _NO_ROLE.search(path) or GROUP_PATTERNS["conv"].search(path):
        return None
    if _PROJ.search(path):
        return "proj"
    if conv:
        return None
    segments = path.split(".")
    if any(_MOD_SEGMENT.fullmatch(seg) for seg in segments) or _NORM_LINEAR.search(path):
        return "mod"
    if any(_ATTN_SEGMENT.fullmatch(seg) for seg in segments) or _FUSED_SINGLE.search(path):
        return "attn"
    if _IN_BLOCK.search(path) and any(_FF_SEGMENT.fullmatch(seg) for seg in segments[:-1]):
        return "ff"
    return "embed"


def preset_groups(preset: str, text_encoder: bool = False, with_convs: bool = False) -> tuple[str, ...]:
    """The module groups a targets preset takes (text encoder: its CLIP groups only)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown targets preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if text_encoder:
        return _TE_PRESET_GROUPS[preset]
    return _PRESET_GROUPS[preset] + (("conv",) if with_convs else ())


def path_in_groups(path: str, groups: tuple[str, ...], conv: bool = False) -> bool:
    """Whether a dotted module path (under a denoiser or CLIP root) belongs to one of these groups."""
    if any(g in GROUP_PATTERNS and GROUP_PATTERNS[g].search(path) for g in groups):
        return True
    role = role_of(path, conv)
    return role is not None and role in groups
