"""Ordinary LoRA files: reading their modules as weight deltas, writing kohya-style ones.

A LoRA module `x` adds `(alpha / rank) up @ down` to its weight (ComfyUI's, kohya's and diffusers'
rule; `alpha` absent: scale 1), with `up` (O, r) and `down` (r, fan_in), conv factors as
(O, r, 1, 1) and (r, C, kh, kw). Written files use kohya's keys `<name>.lora_up.weight`,
`<name>.lora_down.weight`, `<name>.alpha` under kohya names (tlora/arch.py), what every host's
stock LoRA loader reads; the safetensors checks of a file read here are tlora/format.py's.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as _st_save
from torch import Tensor

from .errors import TLoRAFormatError
from .fileio import atomic_write
from .format import read_header

# (up suffix, down suffix) of the LoRA key styles hosts read (ComfyUI's weight_adapter/lora.py list).
STYLES = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
          (".lora.up.weight", ".lora.down.weight"), ("_lora.up.weight", "_lora.down.weight"),
          (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
          (".lora_B.default.weight", ".lora_A.default.weight"), (".lora_B", ".lora_A"))
# Keys of other adapter kinds and LoRA variants that a plain up @ down would misread.
UNSUPPORTED = (".lora_mid.weight", ".dora_scale", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks",
               ".oft_diag", ".diff", ".set_weight", ".w_norm", ".a1.weight")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoRAModule:
    """One LoRA module: its delta is scale * up @ down (factors as stored, conv-shaped or not)."""

    up: Tensor
    down: Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA's rank (rows of down)."""
        return int(self.down.shape[0])

    def delta(self, shape: tuple[int, ...]) -> Tensor:
        """The float64 weight delta, shaped like the weight."""
        return (self.scale * (self.up.double().flatten(1) @ self.down.double().flatten(1))).reshape(shape)


def is_lora_keys(keys: Any) -> bool:
    """Whether a file's keys hold LoRA modules of any style above."""
    return any(k.endswith(up) for k in keys for up, _ in STYLES)


def read_lora(path: str | os.PathLike) -> dict[str, LoRAModule]:
    """{module prefix: LoRAModule} of a LoRA file; TLoRAFormatError naming the problem otherwise."""
    from safetensors import safe_open
    path = os.fspath(path)
    header, _, _ = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    odd = next((k for k in keys for s in UNSUPPORTED if k.endswith(s)), None)
    if odd is not None:
        raise TLoRAFormatError(f"{path}: {odd} is not a plain LoRA tensor (LoCon-Tucker, DoRA, LoHa, LoKr, OFT or a "
                               f"diff patch); only up @ down LoRAs are read")
    out: dict[str, LoRAModule] = {}
    with safe_open(path, framework="pt") as f:
        for key in keys:
            style = next(((u, d) for u, d in STYLES if key.endswith(u)), None)
            if style is None:
                continue
            prefix = key[:-len(style[0])]
            down_key = prefix + style[1]
            if down_key not in header:
                raise TLoRAFormatError(f"{path}: {prefix} has {key} but no {down_key}")
            up, down = f.get_tensor(key), f.get_tensor(down_key)
            for name, t in ((key, up), (down_key, down)):
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise TLoRAFormatError(f"{path}: {name} is not a finite float tensor")
            if up.dim() not in (2, 4) or down.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
                raise TLoRAFormatError(f"{path}: {prefix}: up {tuple(up.shape)} and down {tuple(down.shape)} "
                                       f"do not chain as (O, r) @ (r, fan_in)")
            scale = 1.0
            if prefix + ".alpha" in header:
                scale = float(f.get_tensor(prefix + ".alpha")) / down.shape[0]
            out[prefix] = LoRAModule(up, down, scale)
    if not out:
        raise TLoRAFormatError(f"{path}: no LoRA modules (keys ending .lora_up.weight/.lora_down.weight, "
                               f".lora_B.weight/.lora_A.weight, ...)")
    return out


def lora_state_dict(modules: Mapping[str, tuple[Tensor, Tensor]], shapes: Mapping[str, tuple[int, ...]],
                    dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Kohya keys for {name: (up (O, r), down (r, fan_in))}, alpha = rank (scale 1), conv factors conv-shaped."""
    out: dict[str, Tensor] = {}
    for name, (up, down) in modules.items():
        shape, rank = shapes[name], int(down.shape[0])
        if len(shape) == 4:
            up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
        for suffix, t in ((".lora_up.weight", up), (".lora_down.weight", down)):
            value = t.detach().to("cpu", dtype).contiguous()
            if not bool(torch.isfinite(value).all()):
                raise TLoRAFormatError(f"{name}: {suffix[1:]} overflows {dtype} (save as float32)")
            out[name + suffix] = value
        out[name + ".alpha"] = torch.tensor(float(rank), dtype=dtype)
    return out


def save_lora(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any],
              replace: bool = True) -> None:
    """Write a LoRA state dict with string metadata (non-strings as JSON), atomically (tlora/fileio.py).

    replace=False never replaces an existing file (FileExistsError).
    """
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    atomic_write(os.fspath(path), _st_save(dict(tensors), metadata=meta), replace=replace)
