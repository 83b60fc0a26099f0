"""Narrow training twins of ComfyUI's SD1.5 UNet and TAESD, and their exact embedding at full width.

Why: stock ComfyUI detects a checkpoint as SD1.5 only at model_channels 320 / context 768, but
a 320-wide UNet trains about ten times too slowly on two shared CPU cores. So the default model
is trained as a `width`-wide twin built from ComfyUI's own classes, whose normalisations compute
exactly the statistics the 320-wide network computes when the extra channels are zero. The
trained weights are then placed into 320-wide tensors (`embed_unet`): the wide network computes
the same function up to float rounding (checked by tests/host/test_default_model.py).

Placements are seeded and deliberately unstructured: the real channels of every stream sit at
random positions (within each GroupNorm group where a GroupNorm reads the stream), and every
attention head's query/key and value spaces are turned by a random orthogonal matrix, so the
wide attention weights are dense on their head side. Without this the real channels would form
a Kronecker-aligned block, which would flatter tensorised adapters in the benchmarks.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

WIDE = 320            # SD1.5 model_channels (what checkpoint detection requires)
CONTEXT = 768         # CLIP-L width (SD1.5 context_dim)
HEADS = 8             # SD15 config: num_heads 8, so 40-dim heads at full width
GROUPS = 32           # every GroupNorm in the SD1.5 UNet uses 32 groups
TAESD_WIDE = 64       # TAESD's fixed conv width
LATENT_CHANNELS = 4

# The UNet config our checkpoint has; it is what comfy.model_detection infers from the keys.
SD15_SHALLOW_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": WIDE,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": CONTEXT, "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_heads": HEADS, "num_head_channels": -1,
}


# --------------------------------------------------------------------------- padded norms

class PaddedGroupNorm(nn.Module):
    """GroupNorm over `num_channels` real channels of groups that are `1/ratio` times wider, the rest zero."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 dtype: Any = None, device: Any = None, *, ratio: float = 1.0):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.ratio = num_groups, num_channels, eps, ratio
        self.weight = nn.Parameter(torch.ones(num_channels, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_channels, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        xg = x.reshape(b, self.num_groups, -1)
        r = self.ratio
        # Zero channels pull the wide mean towards 0 and add (1 - r) * mean^2 to the variance.
        mean = r * xg.mean(-1, keepdim=True)
        var = r * (xg - mean).pow(2).mean(-1, keepdim=True) + (1 - r) * mean.pow(2)
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


class PaddedLayerNorm(nn.Module):
    """LayerNorm over the last axis as if it were `1/ratio` times wider with zeros in the rest."""

    def __init__(self, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, dtype: Any = None, device: Any = None, *, ratio: float = 1.0):
        super().__init__()
        n = normalized_shape if isinstance(normalized_shape, int) else int(normalized_shape[-1])
        self.eps, self.ratio = eps, ratio
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        r = self.ratio
        mean = r * x.mean(-1, keepdim=True)
        var = r * (x - mean).pow(2).mean(-1, keepdim=True) + (1 - r) * mean.pow(2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def padded_operations(ratio: float) -> type:
    """A ComfyUI `operations` namespace whose GroupNorm/LayerNorm are the padded ones for `ratio`."""
    import comfy.ops

    def bind(cls: type) -> Callable[..., nn.Module]:
        def make(*args: Any, **kwargs: Any) -> nn.Module:
            return cls(*args, ratio=ratio, **kwargs)
        return make

    class Operations(comfy.ops.disable_weight_init):
        GroupNorm = bind(PaddedGroupNorm)
        LayerNorm = bind(PaddedLayerNorm)

    return Operations


# --------------------------------------------------------------------------- seeded init

def _zero_init(name: str) -> bool:
    """Layers that start at zero so every residual branch starts as the identity (standard for UNets)."""
    return bool(re.search(r"(out_layers\.3|proj_out|^out\.2)\.(weight|bias)$", name))


def init_params_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded init of every parameter: norms 1/0, zero-init output layers, N(0, 1/fan_in) weights, zero biases."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() <= 1:
                is_norm_scale = leaf == "weight"
                p.copy_(torch.ones_like(p) if is_norm_scale and not _zero_init(name) else torch.zeros_like(p))
            elif _zero_init(name):
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return module


# --------------------------------------------------------------------------- narrow UNet

def build_narrow_unet(width: int, seed: int = 0) -> nn.Module:
    """A `width`-wide ComfyUI UNetModel that computes what its 320-wide embedding computes."""
    if width % GROUPS or width > WIDE or (width // HEADS) < 1:
        raise ValueError(f"width must be a multiple of {GROUPS} and at most {WIDE} (got {width})")
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    ops = padded_operations(width / WIDE)
    cfg = dict(SD15_SHALLOW_UNET, model_channels=width)
    net = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=ops)
    # The wide model embeds the timestep with 320 sinusoids; the twin must read the same ones.
    net.time_embed[0] = ops.Linear(WIDE, 4 * width)
    net.model_channels = WIDE
    return init_params_(net, seed)


def _grouped(narrow: int, wide: int, groups: int, gen: torch.Generator) -> Tensor:
    """Selection (wide x narrow): narrow group g's channels at random positions inside wide group g."""
    m = torch.zeros(wide, narrow, dtype=torch.float64)
    gn, gw = narrow // groups, wide // groups
    for g in range(groups):
        pos = torch.randperm(gw, generator=gen)[:gn].sort().values + g * gw
        m[pos, torch.arange(g * gn, (g + 1) * gn)] = 1
    return m


def _free(narrow: int, wide: int, gen: torch.Generator) -> Tensor:
    """Selection (wide x narrow) at random positions (for streams only LayerNorm/elementwise ops read)."""
    m = torch.zeros(wide, narrow, dtype=torch.float64)
    m[torch.randperm(wide, generator=gen)[:narrow].sort().values, torch.arange(narrow)] = 1
    return m


def _heads(narrow: int, wide: int, gen: torch.Generator) -> Tensor:
    """Per-head orthonormal embedding (wide x narrow): head h's dims turned into all of wide head h."""
    m = torch.zeros(wide, narrow, dtype=torch.float64)
    dn, dw = narrow // HEADS, wide // HEADS
    for h in range(HEADS):
        q, _ = torch.linalg.qr(torch.randn(dw, dw, generator=gen, dtype=torch.float64))
        m[h * dw:(h + 1) * dw, h * dn:(h + 1) * dn] = q[:, :dn]
    return m


def _blockdiag(a: Tensor, b: Tensor) -> Tensor:
    return torch.block_diag(a, b)


_RES = re.compile(r"^(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\.(.+)$")
_TF = re.compile(r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.(.+)$")


class UNetEmbedding:
    """The seeded stream placements of a `width`-wide twin inside the 320-wide UNet."""

    def __init__(self, width: int, seed: int = 0):
        self.width, self.seed = width, seed
        self.gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        self.streams: dict[str, Tensor] = {}
        eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
        self.streams.update({"latent": eye(LATENT_CHANNELS), "sinusoid": eye(WIDE), "context": eye(CONTEXT)})
        self.streams["S"] = _grouped(width, WIDE, GROUPS, self.gen)
        self.streams["S+S"] = _blockdiag(self.streams["S"], self.streams["S"])
        self.streams["temb_hidden"] = _free(4 * width, 4 * WIDE, self.gen)
        self.streams["temb"] = _free(4 * width, 4 * WIDE, self.gen)
        self.q_scale = math.sqrt((WIDE // HEADS) / (width // HEADS))

    def stream(self, name: str) -> Tensor:
        """The (wide x narrow) embedding of a stream, created on first use (deterministic order)."""
        if name not in self.streams:
            w = self.width
            kind = name.rsplit(":", 1)[-1]
            if kind == "hidden":
                self.streams[name] = _grouped(w, WIDE, GROUPS, self.gen)
            elif kind == "x":
                self.streams[name] = _free(w, WIDE, self.gen)
            elif kind in ("q1", "v1", "q2", "v2"):
                self.streams[name] = _heads(w, WIDE, self.gen)
            elif kind == "ff":
                self.streams[name] = _free(4 * w, 4 * WIDE, self.gen)
            elif kind == "geglu":
                f = self.stream(name[:-len("geglu")] + "ff")
                self.streams[name] = _blockdiag(f, f)
            else:
                raise KeyError(name)
        return self.streams[name]

    def axes(self, key: str, narrow_shape: tuple[int, ...]) -> tuple[list[str], float]:
        """Stream names of a parameter's leading axes, and a scale (to_q absorbs the head-width change)."""
        if key.startswith("time_embed.0."):
            return (["temb_hidden", "sinusoid"] if key.endswith("weight") else ["temb_hidden"]), 1.0
        if key.startswith("time_embed.2."):
            return (["temb", "temb_hidden"] if key.endswith("weight") else ["temb"]), 1.0
        if key.startswith("input_blocks.0.0."):
            return (["S", "latent"] if key.endswith("weight") else ["S"]), 1.0
        if key.startswith("out.0."):
            return ["S"], 1.0
        if key.startswith("out.2."):
            return (["latent", "S"] if key.endswith("weight") else ["latent"]), 1.0
        m = _RES.match(key)
        if m:
            block, rest = m.groups()
            hid = block + ":hidden"
            inp = "S+S" if block.startswith("output_blocks") else "S"
            table = {
                "in_layers.0.weight": [inp], "in_layers.0.bias": [inp],
                "in_layers.2.weight": [hid, inp], "in_layers.2.bias": [hid],
                "emb_layers.1.weight": [hid, "temb"], "emb_layers.1.bias": [hid],
                "out_layers.0.weight": [hid], "out_layers.0.bias": [hid],
                "out_layers.3.weight": ["S", hid], "out_layers.3.bias": ["S"],
                "skip_connection.weight": ["S", inp], "skip_connection.bias": ["S"],
            }
            return table[rest], 1.0
        m = _TF.match(key)
        if m:
            block, rest = m.groups()
            x = block + ":x"
            tb = "transformer_blocks.0."
            table = {
                "norm.weight": ["S"], "norm.bias": ["S"],
                "proj_in.weight": [x, "S"], "proj_in.bias": [x],
                "proj_out.weight": ["S", x], "proj_out.bias": ["S"],
                tb + "norm1.weight": [x], tb + "norm1.bias": [x],
                tb + "norm2.weight": [x], tb + "norm2.bias": [x],
                tb + "norm3.weight": [x], tb + "norm3.bias": [x],
                tb + "attn1.to_q.weight": [block + ":q1", x], tb + "attn1.to_k.weight": [block + ":q1", x],
                tb + "attn1.to_v.weight": [block + ":v1", x],
                tb + "attn1.to_out.0.weight": [x, block + ":v1"], tb + "attn1.to_out.0.bias": [x],
                tb + "attn2.to_q.weight": [block + ":q2", x], tb + "attn2.to_k.weight": [block + ":q2", "context"],
                tb + "attn2.to_v.weight": [block + ":v2", "context"],
                tb + "attn2.to_out.0.weight": [x, block + ":v2"], tb + "attn2.to_out.0.bias": [x],
                tb + "ff.net.0.proj.weight": [block + ":geglu", x], tb + "ff.net.0.proj.bias": [block + ":geglu"],
                tb + "ff.net.2.weight": [x, block + ":ff"], tb + "ff.net.2.bias": [x],
            }
            scale = self.q_scale if rest.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) else 1.0
            return table[rest], scale
        raise KeyError(f"no embedding rule for UNet parameter {key!r} {narrow_shape}")

    def embed(self, narrow_sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """The 320-wide state dict (float32) of a trained twin's state dict (keys as diffusion_model's)."""
        out = {}
        for key in sorted(narrow_sd):
            t = narrow_sd[key].detach().to(torch.float64)
            names, scale = self.axes(key, tuple(t.shape))
            mats = [self.stream(n) for n in names]
            out[key] = (_apply_axes(t, mats) * scale).to(torch.float32).contiguous()
        return out


    def prepare(self, keys: list[str]) -> "UNetEmbedding":
        """Create every stream the way `embed` does (sorted keys): placements depend on creation order."""
        for key in sorted(keys):
            for name in self.axes(key, ())[0]:
                self.stream(name)
        return self

    def extract(self, key: str, wide: Tensor) -> Tensor:
        """The twin's tensor inside a wide one (exact inverse of `embed`: the streams have orthonormal columns)."""
        names, scale = self.axes(key, tuple(wide.shape))
        mats = [self.stream(n).transpose(0, 1) for n in names]
        return (_apply_axes(wide.detach().to(torch.float64), mats) / scale).to(torch.float32).contiguous()

    def indices(self, name: str) -> Tensor:
        """Wide positions of a selection stream's narrow channels (raises for rotated streams)."""
        mat = self.stream(name)
        if not bool(((mat == 0) | (mat == 1)).all()) or not bool((mat.sum(0) == 1).all()):
            raise ValueError(f"stream {name!r} is not a plain channel selection")
        return mat.argmax(0)


def _apply_axes(t: Tensor, mats: list[Tensor]) -> Tensor:
    """Multiply axis i of t by mats[i] (wide x narrow) for each given leading axis."""
    for axis, mat in enumerate(mats):
        if t.shape[axis] != mat.shape[1]:
            raise ValueError(f"axis {axis} has {t.shape[axis]} entries, stream has {mat.shape[1]}")
        t = torch.tensordot(mat, t.movedim(axis, 0), dims=1).movedim(0, axis)
    return t


# --------------------------------------------------------------------------- hybrid wide UNet

def _timestep_block() -> type:
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepBlock
    return TimestepBlock


def hybridize_resblocks(unet: nn.Module, width: int, seed: int = 0) -> list[str]:
    """Swap the wide UNet's ResBlocks for their exact narrow twins (in place); returns the paths swapped.

    A speed-up for experiments that adapt attention layers only (about half the compute of the
    wide model is in its 320-channel convolutions). Exact because every ResBlock reads and writes
    the zero-padded main stream, whose padded channels no attention adapter can reach (proj_out
    maps them to zero). Not for adapters on convolutions or for fine-tuning non-attention weights.
    """
    narrow = build_narrow_unet(width, seed)
    emb = UNetEmbedding(width, seed).prepare(list(narrow.state_dict()))
    wide_sd = unet.state_dict()
    base = _timestep_block()

    class HybridResBlock(base):  # type: ignore[misc, valid-type]
        """A narrow ResBlock reading/writing the real channels of the wide stream."""

        def __init__(self, block: nn.Module, idx_in: Tensor, idx_out: Tensor, idx_temb: Tensor):
            super().__init__()
            self.block = block
            self.register_buffer("idx_in", idx_in, persistent=False)
            self.register_buffer("idx_out", idx_out, persistent=False)
            self.register_buffer("idx_temb", idx_temb, persistent=False)

        def forward(self, x: Tensor, emb_t: Tensor) -> Tensor:
            y = self.block(x.index_select(1, self.idx_in), emb_t.index_select(1, self.idx_temb))
            out = y.new_zeros((y.shape[0], WIDE) + tuple(y.shape[2:]))
            return out.index_copy(1, self.idx_out, y)

    swapped = []
    for path, module in list(narrow.named_modules()):
        if type(module).__name__ != "ResBlock":
            continue
        # Only this block's weights are read, so adapters elsewhere (renamed keys) do not matter.
        module.load_state_dict({k: emb.extract(f"{path}.{k}", wide_sd[f"{path}.{k}"])
                                for k in module.state_dict()})
        parent_path, _, child = path.rpartition(".")
        stream_in = "S+S" if path.startswith("output_blocks") else "S"
        hybrid = HybridResBlock(module, emb.indices(stream_in), emb.indices("S"), emb.indices("temb"))
        parent = unet.get_submodule(parent_path)
        parent[int(child)] = hybrid.to(next(unet.parameters()).dtype)
        swapped.append(path)
    return swapped


# --------------------------------------------------------------------------- narrow TAESD

class _Clamp(nn.Module):
    """TAESD's soft latent clamp (tanh scaled to +-3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, **kw: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Block(nn.Module):
    """TAESD residual block: three 3x3 convs with ReLUs plus identity skip, then ReLU (same key names)."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


# Trained residual blocks per resolution stage (the rest are exactly ReLUs, i.e. zero convs):
# full TAESD has 1/3/3/3 (encoder, 64->8 px) and 3/3/3/1 (decoder, 8->64 px) blocks; a slim
# twin keeps the cheap low-resolution ones and trains about 4x faster.
SLIM_BLOCKS = {"encoder": (0, 1, 1, 2), "decoder": (2, 1, 1, 0)}
FULL_BLOCKS = {"encoder": (1, 3, 3, 3), "decoder": (3, 3, 3, 1)}


def _blocks(w: int, stage_total: int, trained: int) -> list[nn.Module]:
    """A stage's blocks: `trained` real ones first, then ReLUs standing in for zero-conv blocks."""
    return [_Block(w) if i < trained else nn.ReLU() for i in range(stage_total)]


def _encoder(w: int, latent: int, trained: tuple[int, ...]) -> nn.Sequential:
    """TAESD encoder topology (3 stride-2 stages) at width w; indices match ComfyUI's keys."""
    layers: list[nn.Module] = [_conv(3, w), *_blocks(w, 1, trained[0])]
    for stage in range(3):
        layers += [_conv(w, w, stride=2, bias=False), *_blocks(w, 3, trained[stage + 1])]
    layers.append(_conv(w, latent))
    return nn.Sequential(*layers)


def _decoder(w: int, latent: int, trained: tuple[int, ...]) -> nn.Sequential:
    """TAESD decoder topology (3 nearest x2 upsamplings) at width w; indices match ComfyUI's keys."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent, w), nn.ReLU()]
    for stage in range(3):
        layers += [*_blocks(w, 3, trained[stage]), nn.Upsample(scale_factor=2), _conv(w, w, bias=False)]
    layers += [*_blocks(w, 1, trained[3]), _conv(w, 3)]
    return nn.Sequential(*layers)


class NarrowTAESD(nn.Module):
    """A `width`-wide (optionally slim) TAESD; `embed_taesd` zero-pads it to ComfyUI's TAESD exactly.

    A block whose three convs are zero computes relu(0 + x) = relu(x), so the untrained blocks of a
    slim twin are ReLUs here and zero tensors in the exported file.
    """

    def __init__(self, width: int = 32, latent_channels: int = LATENT_CHANNELS, seed: int = 0,
                 blocks: Optional[dict] = None):
        super().__init__()
        blocks = blocks or SLIM_BLOCKS
        self.width = width
        self.taesd_encoder = _encoder(width, latent_channels, tuple(blocks["encoder"]))
        self.taesd_decoder = _decoder(width, latent_channels, tuple(blocks["decoder"]))
        gen = torch.Generator().manual_seed(int(seed) + 101)
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / p[0].numel()))
                else:
                    p.zero_()
            for m in self.modules():
                if isinstance(m, _Block):  # residual branches start at zero: every block starts as a ReLU
                    m.conv[-1].weight.zero_()
            self.taesd_encoder[-1].weight.mul_(0.3)
            # Decoded pixels start at mid-grey instead of deep in the [0, 1] clamp.
            self.taesd_decoder[-1].weight.mul_(0.1)
            self.taesd_decoder[-1].bias.fill_(0.5)

    def encode(self, images01: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, 4, H/8, W/8) latents (the UNet's latent space)."""
        return self.taesd_encoder(images01)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> (B, 3, H, W) images, nominally in [0, 1] (unclamped)."""
        return self.taesd_decoder(latents)


def taesd_shapes(latent_channels: int = LATENT_CHANNELS) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ComfyUI's TAESD state dict (the full 64-wide network)."""
    full = NarrowTAESD.__new__(NarrowTAESD)
    nn.Module.__init__(full)
    full.taesd_encoder = _encoder(TAESD_WIDE, latent_channels, FULL_BLOCKS["encoder"])
    full.taesd_decoder = _decoder(TAESD_WIDE, latent_channels, FULL_BLOCKS["decoder"])
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def embed_taesd(narrow_sd: dict[str, Tensor], width: int, latent_scale: float,
                latent_channels: int = LATENT_CHANNELS) -> dict[str, Tensor]:
    """ComfyUI TAESD state dict from a narrow one: channels zero-padded to 64, missing blocks zero,
    plus vae_scale/vae_shift.

    ComfyUI's TAESD decodes `(raw - shift) * scale` and SD1.5's latent format multiplies raw latents
    by `latent_scale` (0.18215) before the UNet, so vae_scale = latent_scale makes the UNet's
    latent space exactly the narrow encoder's output space.
    """
    out: dict[str, Tensor] = {}
    for key, shape in taesd_shapes(latent_channels).items():
        wide = torch.zeros(shape, dtype=torch.float32)
        t = narrow_sd.get(key)
        if t is not None:
            wide[tuple(slice(0, s) for s in t.shape)] = t.detach().float()
        out[key] = wide
    unknown = set(narrow_sd) - set(out)
    if unknown:
        raise KeyError(f"narrow TAESD has keys ComfyUI's TAESD lacks: {sorted(unknown)[:5]}")
    out["vae_scale"] = torch.tensor(float(latent_scale))
    out["vae_shift"] = torch.tensor(0.0)
    return out
