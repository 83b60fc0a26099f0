"""Plan an adapter before training: per-module tensors, parameter counts and file size.

Counts are analytic (no tensors are made) from `adapter.layout`, the layout that
ModuleAdapter.create fills (including the diag fallback for transforms whose factors
stay wider than MAX_TRANSFORM_FACTOR).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import arch as arch_mod
from . import shapes as shapes_mod
from .adapter import R_IN, R_OUT, R_PART, T_CORE, T_DIAG, T_PART, layout
from .errors import TLoRAError
from .format import metadata_from_summary
from .functional import tr, trm
from .spec import DEFAULT_RESIDUAL, DEFAULT_TRANSFORM, Kind, parse_residual, parse_transform

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _header_bytes(entries: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], dtype_name: str,
                  itemsize: int) -> int:
    """Size of the safetensors header as the safetensors library writes it (compact JSON, 8-aligned)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in sorted(entries):
        end = offset + math.prod(entries[key]) * itemsize
        header[key] = {"dtype": dtype_name, "shape": list(entries[key]), "data_offsets": [offset, end]}
        offset = end
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return n + (-n) % 8


def plan(arch: str | None = "sd15", transform: str | Kind = DEFAULT_TRANSFORM, residual: str | Kind = DEFAULT_RESIDUAL,
         targets: str | Mapping[str, Sequence[int]] = "attn", shapes: str = "paper",
         text_encoder: bool = False, with_convs: bool = False, alpha: float = 1.0,
         dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Per-module and total parameters and file size of an adapter (JSON-able dict)."""
    t_req, r_req = parse_transform(transform), parse_residual(residual)
    if shapes not in shapes_mod.SHAPE_PRESETS:
        raise TLoRAError(f"unknown shapes preset {shapes!r}; expected one of {', '.join(shapes_mod.SHAPE_PRESETS)}")
    if isinstance(targets, str):
        if arch is None:
            raise TLoRAError("a targets preset needs an architecture")
        try:
            table = arch_mod.targets(arch, targets, text_encoder=text_encoder, with_convs=with_convs)
        except ValueError as exc:
            raise TLoRAError(str(exc)) from None
        targets_name = targets
    else:
        table = {str(k): tuple(int(s) for s in v) for k, v in targets.items()}
        targets_name = "custom"
    if not table:
        raise TLoRAError("no target modules")
    per_module, entries = [], {}
    summary = {"modules": 0, "params": 0, "transform_params": 0, "residual_params": 0,
               "params_by_kind": {}, "transform_kinds": {}, "residual_kinds": {}}
    for name, shape in table.items():
        t_kind, r_kind, tensors = layout(shape, t_req, r_req, shapes)
        t_params = sum(math.prod(s) for k, s in tensors.items() if k.startswith(T_PART))
        r_params = sum(math.prod(s) for k, s in tensors.items() if k.startswith(R_PART))
        if t_kind.kind == "trm":
            factors = [tensors[T_CORE.format(d)][0] for d in range(sum(k.startswith(T_PART) for k in tensors))]
            assert t_params == trm.num_params(factors, t_kind.rank)
        out_f = [s[0] for k, s in sorted(tensors.items()) if k.startswith(R_OUT.format(""))]
        in_f = [s[0] for k, s in sorted(tensors.items()) if k.startswith(R_IN.format(""))]
        if r_kind.kind == "tr":
            assert r_params == tr.num_params(out_f, in_f, r_kind.rank)
        summary["modules"] += 1
        summary["params"] += t_params + r_params
        summary["transform_params"] += t_params
        summary["residual_params"] += r_params
        for part, kind, count in (("transform", t_kind, t_params), ("residual", r_kind, r_params)):
            kinds = summary[f"{part}_kinds"]
            kinds[str(kind)] = kinds.get(str(kind), 0) + 1
            if count:
                summary["params_by_kind"][str(kind)] = summary["params_by_kind"].get(str(kind), 0) + count
        per_module.append({
            "name": name, "shape": list(shape), "transform": str(t_kind), "residual": str(r_kind),
            "transform_factors": ([tensors[T_DIAG][0]] if t_kind.kind == "diag" else
                                  [s[0] for k, s in tensors.items() if k.startswith(T_PART)]),
            "residual_out_factors": [tensors[R_OUT.format(d)][0] for d in range(len(out_f))],
            "residual_in_factors": [tensors[R_IN.format(d)][0] for d in range(len(in_f))],
            "params": t_params + r_params})
        entries.update({f"{name}.{k}": s for k, s in tensors.items()})
    config = {"arch": arch, "transform": str(t_req), "residual": str(r_req), "shapes": shapes,
              "targets": targets_name, "alpha": alpha, "text_encoder": text_encoder, "with_convs": with_convs}
    metadata = metadata_from_summary(summary, None, config, dtype=dtype)
    if dtype not in _DTYPE_NAMES:
        raise TLoRAError(f"cannot plan a file in {dtype}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    data_bytes = sum(math.prod(s) for s in entries.values()) * itemsize
    file_bytes = 8 + _header_bytes(entries, metadata, _DTYPE_NAMES[dtype], itemsize) + data_bytes
    return {**config, **summary, "file_bytes": file_bytes, "dtype": str(dtype).replace("torch.", ""),
            "per_module": per_module}
