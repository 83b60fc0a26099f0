"""A base model's weights by generic module name, read one weight at a time (conversions' base).

`WeightBase` is what tlora/convert.py needs of a base: every weight it has under its generic name
(`diffusion_model.<path>`, `text_encoders.<clip>.transformer.<path>`, docs/FORMAT.md), the other
names a file may use for one (kohya `lora_unet_...`/`lora_te*_...`, diffusers paths, which on Flux
and SD3 name row pieces of fused weights: tlora/diffusers_names.py), and a reader. Hosts build one
over a live model (nodes/convert_node.py, trainer/diffusers/export.py); `open_checkpoint` builds one
over a safetensors checkpoint, read lazily with safetensors' own `safe_open`: the file is opened
for each weight and closed again, so neither the file nor its page cache stays mapped and memory
holds one weight at a time whatever the checkpoint's size.

Checkpoint layouts read (what ComfyUI's save path and the released files use): the denoiser under
`model.diffusion_model.`, `diffusion_model.` or bare (a diffusion-model-only file); CLIP-L under
`cond_stage_model.` (SD1.x), `conditioner.embedders.0.` (SDXL) or `text_encoders.clip_l.`; CLIP-G
under `text_encoders.clip_g.` or in OpenCLIP form under `conditioner.embedders.1.model.` (SDXL:
q, k and v are row thirds of one `in_proj_weight`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import arch as arch_mod
from . import diffusers_names as names
from .errors import TLoRAError, TLoRAShapeError
from .format import read_header

Pieces = tuple[tuple[int, int], ...]
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Checkpoint prefixes of parts that are not the denoiser (skipped when the denoiser is stored bare).
OTHER_PARTS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.", "model_ema.",
               "clip_vision.")
TE_LAYOUTS = {"clip_l": ("text_encoders.clip_l.", "cond_stage_model.", "conditioner.embedders.0."),
              "clip_g": ("text_encoders.clip_g.",)}
OPEN_CLIP_G = "conditioner.embedders.1.model."
_OPEN_CLIP = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                        r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPEN_CLIP_NAMES = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                    "mlp.c_proj.weight": "mlp.fc2"}


@dataclass(frozen=True)
class Located:
    """Where a file's module lands: a generic weight and the rows it covers (None: the whole weight)."""

    generic: str
    pieces: Pieces | None = None

    def rows(self) -> Tensor | None:
        """The covered row indices in order (None for the whole weight)."""
        if self.pieces is None:
            return None
        return torch.cat([torch.arange(o, o + c) for o, c in self.pieces])


class WeightBase:
    """A base model's weights by generic name; `read(generic)` loads one (any float dtype)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Tensor],
                 aliases: Mapping[str, Located] | None = None, label: str = "the base", kohya_arch: str = "sdxl"):
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self._read, self.label, self.kohya_arch = read, label, kohya_arch
        self.aliases: dict[str, Located] = {}
        for generic in self.shapes:
            for alias in kohya_forms(generic):
                self.aliases.setdefault(alias, Located(generic))
        # A UNet's diffusers paths and kohya's names of them; SD1.x/2.x LoRAs use those (sd-scripts, every
        # host's loader; diffusers' SD1 loader reads no other), SDXL ones the ldm names above.
        self.kohya_names: dict[str, str] = {}
        unet = unet_config(self.shapes)
        if unet is not None:
            sdxl = f"{arch_mod.UNET_PREFIX}label_emb.0.0" in self.shapes
            for generic, ((path, _),) in names.diffusers_rows(arch_mod.Arch("unet", unet, (), "", "", "")).items():
                kohya = "lora_unet_" + path.removeprefix("unet.").replace(".", "_")
                self.aliases.setdefault(path, Located(generic))
                self.aliases.setdefault(kohya, Located(generic))
                if not sdxl:
                    self.kohya_names[generic] = kohya
        self.aliases.update(aliases or {})

    def locate(self, prefix: str) -> Located:
        """The weight (and rows) a file's module prefix names; TLoRAShapeError if the base has none."""
        if prefix in self.shapes:
            return Located(prefix)
        found = self.aliases.get(prefix)
        if found is None:
            raise TLoRAShapeError(f"{self.label} has no weight for module {prefix} (is it the base this file "
                                  f"was made for?)")
        return found

    def shape(self, located: Located) -> tuple[int, ...]:
        """Shape of the covered part of the weight (rows counted for a slice)."""
        shape = self.shapes[located.generic]
        if located.pieces is None:
            return shape
        return (sum(c for _, c in located.pieces),) + shape[1:]

    def weight(self, generic: str) -> Tensor:
        """The whole weight in float64 (read now; not kept)."""
        value = self._read(generic)
        if not value.is_floating_point():
            raise TLoRAError(f"{self.label}: weight {generic} is {value.dtype}, not a float weight")
        return value.detach().to("cpu", torch.float64)

    def kohya(self, generic: str) -> str:
        """The kohya name LoRA files give this weight: diffusers-layout for SD1.x/2.x UNets, else tlora/arch.py's."""
        return self.kohya_names.get(generic) or arch_mod.kohya_name(generic, self.kohya_arch)

    def modules(self, groups: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """{generic: shape} of the Linear/Conv weights in these module groups (tlora/arch.py's rules)."""
        groups, out = tuple(groups), {}
        # A CLIP's paths would match the denoiser's role rules (`self_attn` is an attention): its own groups only.
        te_groups = tuple(g for g in groups if g.startswith("te_"))
        denoiser_groups = tuple(g for g in groups if not g.startswith("te_"))
        for generic, shape in self.shapes.items():
            if generic.startswith(arch_mod.UNET_PREFIX):
                path, wanted = generic[len(arch_mod.UNET_PREFIX):], denoiser_groups
            else:
                path, wanted = generic.partition(".transformer.")[2], te_groups
            if len(shape) in (2, 4) and wanted and arch_mod.path_in_groups(path, wanted):
                out[generic] = shape
        return out


def kohya_forms(generic: str) -> list[str]:
    """Every kohya name ComfyUI maps to a generic weight (any released architecture's CLIP prefixes)."""
    if generic.startswith(arch_mod.UNET_PREFIX):
        return ["lora_unet_" + generic[len(arch_mod.UNET_PREFIX):].replace(".", "_")]
    clip, sep, rest = generic[len(arch_mod.TE_PREFIX):].partition(".transformer.")
    if not generic.startswith(arch_mod.TE_PREFIX) or not sep:
        return []
    flat = rest.replace(".", "_")
    return [f"{p}{flat}" for p in {"clip_l": ("lora_te_", "lora_te1_"), "clip_g": ("lora_te2_",)}.get(clip, ())]


# ----- checkpoints ------------------------------------------------------------------------------
def _index(header: Mapping[str, dict]) -> tuple[dict[str, tuple[str, tuple[int, int] | None, tuple]], str]:
    """{generic: (checkpoint key, rows or None, shape)} of every weight a checkpoint holds, and its denoiser prefix."""
    keys = [k for k in header if k != "__metadata__" and header[k].get("dtype") in FLOAT_DTYPES]
    prefix = next((p for p in DENOISER_PREFIXES if any(k.startswith(p) for k in keys)), "")
    out: dict[str, tuple[str, tuple[int, int] | None, tuple]] = {}
    for key in keys:
        shape = tuple(int(s) for s in header[key]["shape"])
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            if key.startswith(OPEN_CLIP_G):
                _open_clip(key, shape, out)
            continue
        if key.startswith(prefix) and (prefix or not key.startswith(OTHER_PARTS)):
            out[arch_mod.UNET_PREFIX + key[len(prefix):-len(".weight")]] = (key, None, shape)
            continue
        for clip, layouts in TE_LAYOUTS.items():
            part = next((p for p in layouts if key.startswith(p + "transformer.")), None)
            if part is not None:
                out[f"{arch_mod.TE_PREFIX}{clip}.{key[len(part):-len('.weight')]}"] = (key, None, shape)
        if key.startswith(OPEN_CLIP_G):
            _open_clip(key, shape, out)
    return out, prefix


def _open_clip(key: str, shape: tuple, out: dict) -> None:
    """SDXL's CLIP-G in OpenCLIP form: q/k/v as row thirds of in_proj_weight, the others renamed."""
    m = _OPEN_CLIP.fullmatch(key[len(OPEN_CLIP_G):])
    if m is None or len(shape) != 2:
        return
    layer = f"{arch_mod.TE_PREFIX}clip_g.transformer.text_model.encoder.layers.{m.group(1)}"
    if m.group(2) == "attn.in_proj_weight":
        width = shape[0] // 3
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{layer}.self_attn.{proj}"] = (key, (i * width, width), (width, shape[1]))
    else:
        out[f"{layer}.{_OPEN_CLIP_NAMES[m.group(2)]}"] = (key, None, shape)


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    return len({m.group(1) for k in shapes for m in [re.match(pattern, k)] if m})


def unet_config(shapes: Mapping[str, tuple]) -> arch_mod.UNetConfig | None:
    """The UNetConfig of an SD-style UNet read off its generic weight shapes (any size), None if it is not one.

    Levels and res blocks from where the downsampler convs (`input_blocks.N.0.op`) sit, widths from
    the res blocks' convs, transformer depths by counting blocks; kept only if its table is the weights'.
    """
    p = re.escape(arch_mod.UNET_PREFIX)
    u = arch_mod.UNET_PREFIX
    first = shapes.get(f"{u}input_blocks.1.0.in_layers.2")
    if first is None or len(first) != 4:
        return None
    mc, res, mults, depths, count = first[1], [], [], [], 0
    for i in (b for b in _blocks(shapes, rf"{p}input_blocks\.(\d+)\.") if b):  # block 0 is conv_in
        if f"{u}input_blocks.{i}.0.op" in shapes:
            res.append(count)
            count = 0
            continue
        out = shapes.get(f"{u}input_blocks.{i}.0.out_layers.3")
        if out is None:
            return None
        count += 1
        if count == 1:
            mults.append(out[0] // mc)
        depths.append(_count(shapes, rf"{p}input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
    res.append(count)
    outs = _blocks(shapes, rf"{p}output_blocks\.(\d+)\.")
    depth_out = [_count(shapes, rf"{p}output_blocks\.{j}\.1\.transformer_blocks\.(\d+)\.") for j in reversed(outs)]
    to_k = next((v for k, v in shapes.items() if k.endswith(".attn2.to_k")), (0, mc))
    proj = next((v for k, v in shapes.items() if k.endswith(".proj_in")), (mc, mc))
    cfg = arch_mod.UNetConfig(mc, tuple(mults), tuple(res), tuple(depths),
                              _count(shapes, rf"{p}middle_block\.1\.transformer_blocks\.(\d+)\."), tuple(depth_out),
                              to_k[1], len(proj) == 2)
    try:
        table = arch_mod.unet_modules(cfg)
    except (IndexError, ValueError, ZeroDivisionError):
        return None
    return cfg if all(shapes.get(name) == shape for name, shape, _ in table) else None


def _blocks(shapes: Mapping[str, tuple], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m}
    return sorted(found)


def detect_arch(shapes: Mapping[str, tuple]) -> arch_mod.Arch | None:
    """An `Arch` of a Flux or SD3/SD3.5 denoiser from its generic weight shapes (any size), else None.

    What the diffusers names of fused-weight slices need: their rows depend on the width and depth.
    """
    p = arch_mod.UNET_PREFIX
    doubles, singles = _blocks(shapes, rf"{re.escape(p)}double_blocks\.(\d+)\."), \
        _blocks(shapes, rf"{re.escape(p)}single_blocks\.(\d+)\.")
    if doubles and f"{p}img_in" in shapes:
        h, c = shapes[f"{p}img_in"]
        mlp = shapes.get(f"{p}double_blocks.0.img_mlp.0", (4 * h,))[0]
        cfg = arch_mod.FluxConfig(h, len(doubles), len(singles), mlp / h, c, shapes.get(f"{p}txt_in", (h, 4096))[1],
                                  shapes.get(f"{p}vector_in.in_layer", (h, 768))[1], f"{p}guidance_in.in_layer" in shapes)
        return arch_mod.Arch("flux", cfg, (), "", "", "")
    joints = _blocks(shapes, rf"{re.escape(p)}joint_blocks\.(\d+)\.")
    if joints:
        attn2 = tuple(i for i in joints if f"{p}joint_blocks.{i}.x_block.attn2.qkv" in shapes)
        return arch_mod.Arch("sd3", arch_mod.MMDiTConfig(len(joints), attn2), (), "", "", "")
    return None


def _diffusers_aliases(shapes: Mapping[str, tuple], arch: arch_mod.Arch | str | None) -> dict[str, Located]:
    """{diffusers path: Located} for the denoiser (when its family is known) and the CLIPs."""
    out: dict[str, Located] = {}
    if arch is not None:
        try:
            sources = names.diffusers_sources(arch)
        except (ValueError, KeyError):
            sources = {}
        out.update({path: Located(generic, pieces) for path, (generic, pieces) in sources.items()
                    if generic in shapes and generic.startswith(arch_mod.UNET_PREFIX)})
    for generic in shapes:
        clip, sep, rest = generic[len(arch_mod.TE_PREFIX):].partition(".transformer.")
        if generic.startswith(arch_mod.TE_PREFIX) and sep and clip in names.TEXT_ENCODER_COMPONENT:
            out[f"{names.TEXT_ENCODER_COMPONENT[clip]}.{rest}"] = Located(generic)
    return out


def open_checkpoint(path: str | os.PathLike, label: str | None = None, arch: str | None = None) -> WeightBase:
    """A `WeightBase` over a safetensors checkpoint (header read now, each weight when asked for).

    `arch` (a tlora.arch name) names the family for diffusers UNet names; Flux and SD3 are found
    from the shapes. Kohya CLIP names follow SD1.x (`lora_te_`) for an SD1.x layout, else SDXL's.
    """
    path = os.fspath(path)
    label = label or os.path.basename(path)
    if not os.path.exists(path):
        raise TLoRAError(f"base checkpoint {path} does not exist")
    header, _, _ = read_header(path)
    index, _ = _index(header)
    if not index:
        raise TLoRAError(f"{label}: no model weights found (not a checkpoint or diffusion model file)")
    shapes = {g: shape for g, (_, _, shape) in index.items()}

    def read(generic: str) -> Tensor:
        from safetensors import safe_open  # opened per weight: nothing of the file stays mapped
        key, rows, _ = index[generic]
        with safe_open(path, framework="pt") as f:
            if rows is None:
                return f.get_tensor(key)
            return f.get_slice(key)[rows[0]:rows[0] + rows[1]]

    family = detect_arch(shapes) or (arch if arch in arch_mod.ARCHS else None)
    kohya_arch = "sd15" if any(k.startswith("cond_stage_model.") for k in header) else "sdxl"
    return WeightBase(shapes, read, _diffusers_aliases(shapes, family), label, kohya_arch)
