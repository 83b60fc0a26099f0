"""The TLoRA file: safetensors with `<module>.<suffix>` keys and string metadata (docs/FORMAT.md).

Reading never unpickles: the header is parsed and checked here before safetensors maps
the data, and anything that is not a well-formed safetensors file is rejected with a
TLoRAFormatError whose one-line message names the problem (and the module, when one
module's tensors are at fault).
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import arch as arch_mod
from .adapter import PROBES, R_PART, SUFFIX_PATTERN, T_PART, ModuleAdapter
from .errors import TLoRAError, TLoRAFormatError
from .fileio import atomic_write, parse_json

FORMAT_VERSION = "1"
SUFFIX_MARK = ".tlora_"
# Reserved metadata keys: written by save_file, never taken from the caller's metadata.
RESERVED_METADATA = ("tlora.version", "tlora.config")
# Float dtypes a file may hold (safetensors names); anything else is rejected on load.
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# How our files name their method where a card shows it (docs/FORMAT.md section 6): never "tlora" alone.
NETWORK_MODULE = "transformed_lora"
METHOD = "transformed LoRA (TLoRA, arXiv 2501.08727)"  # also how the webui extension's lines name it
METHOD_DESCRIPTION = f"{METHOD}, not T-LoRA (timestep-dependent LoRA)"
# A header larger than this is not a TLoRA file (ours are a few hundred kB at most).
MAX_HEADER_BYTES = 64 * 1024 * 1024
# Nor is a file with more metadata entries than this (ours write about 45; kohya's LoRAs about 60):
# 100,000 keys made every card, node text and history entry that showed them megabytes long.
MAX_METADATA_ENTRIES = 4096


# ----- keys ------------------------------------------------------------------------------
def split_key(key: str) -> tuple[str, str]:
    """`<module prefix>.<tlora suffix>` -> (prefix, suffix); TLoRAFormatError if not a TLoRA key."""
    cut = key.rfind(SUFFIX_MARK)
    if cut <= 0:
        raise TLoRAFormatError(f"key {key!r} is not a TLoRA tensor name (expected "
                               f"'<module>.tlora_t.<d>', '<module>.tlora_r.up', ... or '<module>.tlora_scale')")
    return key[:cut], key[cut + 1:]


def is_tlora_key(key: str) -> bool:
    """True when key is `<prefix>.<known TLoRA suffix>`."""
    cut = key.rfind(SUFFIX_MARK)
    return cut > 0 and bool(SUFFIX_PATTERN.match(key[cut + 1:]))


def is_tlora_state_dict(keys: Iterable[str]) -> bool:
    """True when any key is a TLoRA tensor name (how hosts detect a TLoRA file)."""
    return any(is_tlora_key(k) for k in keys)


# ----- header ----------------------------------------------------------------------------
def _sniff_non_safetensors(head: bytes) -> str | None:
    """Name well-known non-safetensors formats from the first bytes, to say what the file is."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a torch.save/PyTorch checkpoint?)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "a Python pickle"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy array file"
    return None


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """(parsed safetensors header, header length, file size), checked against the file size."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the read below forever
            raise TLoRAFormatError(f"{path}: not a regular file (a FIFO, device or folder)")
        size = info.st_size
        with open(path, "rb") as f:
            head = f.read(9)
            # A safetensors header opens with "{" after its length, whose low byte may be 0x80 (a pickle's mark).
            sniffed = None if head[8:9] == b"{" else _sniff_non_safetensors(head)
            head = head[:8]
            if sniffed:
                raise TLoRAFormatError(f"{path}: not a safetensors file but {sniffed}; TLoRA "
                                       f"files are safetensors and are never unpickled")
            if len(head) < 8:
                raise TLoRAFormatError(f"{path}: truncated or empty file ({size} bytes; a "
                                       f"safetensors file starts with an 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise TLoRAFormatError(
                    f"{path}: not a valid safetensors file (header length {length} does not fit "
                    f"the {size}-byte file: truncated, corrupted or another format)")
            f.seek(8)
            raw = f.read(length)
    except OSError as exc:
        raise TLoRAFormatError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        header = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise TLoRAFormatError(f"{path}: corrupted safetensors header (not valid JSON: {err})") from None
    if not isinstance(header, dict):
        raise TLoRAFormatError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_bytes = size - 8 - length
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise TLoRAFormatError(f"{path}: corrupted metadata (must map strings to strings)")
            if len(info) > MAX_METADATA_ENTRIES:
                raise TLoRAFormatError(f"{path}: {len(info):,} metadata entries; an adapter file has a few dozen "
                                       f"(at most {MAX_METADATA_ENTRIES:,} are read)")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            count = math.prod(int(s) for s in shape)
            if any(int(s) < 0 for s in shape) or not 0 <= start <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TLoRAFormatError(f"{path}: corrupted header entry for tensor {key!r}") from None
        if dtype not in _ITEMSIZE:
            raise TLoRAFormatError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if end - start != count * _ITEMSIZE[dtype] or end > data_bytes:
            raise TLoRAFormatError(f"{path}: tensor {key!r} does not fit the file (truncated or corrupted: "
                                   f"bytes {start}..{end} of {data_bytes})")
    return header, length, size


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's string metadata (header only; tensors are not read)."""
    header, _, _ = read_header(path)
    return dict(header.get("__metadata__", {}))


# ----- load ------------------------------------------------------------------------------
@dataclass
class TLoRAFile:
    """A loaded TLoRA file: adapters keyed by module prefix, raw metadata, parsed config."""

    adapters: dict[str, ModuleAdapter]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    file_bytes: int = 0

    def num_params(self) -> int:
        """Stored parameters over all modules (scales excluded)."""
        return sum(a.num_params() for a in self.adapters.values())


def check_version(path: str, metadata: Mapping[str, Any]) -> None:
    """TLoRAFormatError unless the file's tlora.version is one this reader knows (absent: version 1)."""
    version = str(metadata.get("tlora.version", FORMAT_VERSION))
    if version != FORMAT_VERSION:
        if version.isdigit() and int(version) > int(FORMAT_VERSION):
            raise TLoRAFormatError(f"{path}: written in TLoRA format version {version}; this reader "
                                   f"supports version {FORMAT_VERSION} (update ComfyUI-TLoRA)")
        raise TLoRAFormatError(f"{path}: unknown tlora.version {version[:40]!r}")


def _parse_config(path: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    check_version(path, metadata)
    text = metadata.get("tlora.config")
    if text is None:
        return {}
    try:
        config = parse_json(text)
    except ValueError as err:
        raise TLoRAFormatError(f"{path}: metadata tlora.config is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise TLoRAFormatError(f"{path}: metadata tlora.config must be a JSON object")
    return config


def _check_against_arch(adapters: Mapping[str, ModuleAdapter], arch_name: Any) -> None:
    """Modules the named base architecture knows must fit its weight shapes."""
    if not isinstance(arch_name, str) or arch_name not in arch_mod.ARCHS:
        return
    table = arch_mod.all_modules(arch_name)
    from_kohya = arch_mod.kohya_map(arch_name)
    for prefix, adapter in adapters.items():
        shape = table.get(prefix) or table.get(from_kohya.get(prefix, ""))
        if shape is not None:
            try:
                adapter.check_fits(shape)
            except TLoRAError as exc:
                raise TLoRAFormatError(f"{exc} (the {arch_name} weight shape)") from None


def load(path: str | os.PathLike) -> TLoRAFile:
    """Load and validate a TLoRA file (safetensors only) into a TLoRAFile."""
    path = os.fspath(path)
    header, length, size = read_header(path)
    metadata = dict(header.get("__metadata__", {}))
    keys = [k for k in header if k != "__metadata__"]
    if not keys or not is_tlora_state_dict(keys):
        raise TLoRAFormatError(f"{path}: no TLoRA tensors in this file (keys end in .tlora_t.*, "
                               f".tlora_r.* or .tlora_scale; is it a LoRA or another adapter kind?)")
    for key in keys:
        if key.rfind(SUFFIX_MARK) <= 0:
            raise TLoRAFormatError(f"{path}: unknown key {key!r} (not a TLoRA tensor name "
                                   f"'<module>.tlora_...'; mixed adapter files are not supported)")
        prefix, suffix = split_key(key)
        dtype = header[key]["dtype"]
        if dtype not in FILE_DTYPES:
            raise TLoRAFormatError(f"{prefix}: tensor {suffix!r} has dtype {dtype}; TLoRA tensors are "
                                   f"float32, float16, bfloat16 or float64")
    config = _parse_config(path, metadata)
    try:
        with open(path, "rb") as f:
            tensors = _st_load(f.read())
    except OSError as exc:
        raise TLoRAFormatError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # safetensors' own checks (overlapping offsets, ...)
        raise TLoRAFormatError(f"{path}: corrupted safetensors file ({str(exc).splitlines()[0]})") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        prefix, suffix = split_key(key)
        grouped.setdefault(prefix, {})[suffix] = tensors[key]
    twice = duplicate_modules(grouped)
    if twice:
        raise TLoRAFormatError(f"{path}: module {twice[0][0]} is given twice (also as {twice[0][1]}); loaders "
                               f"would apply one copy or the other: keep one name per module")
    adapters = {}
    for prefix, group in grouped.items():
        adapter = ModuleAdapter(group, name=prefix)
        if adapter.in_channels and adapter.fan_in and adapter.fan_in % adapter.in_channels:
            raise TLoRAFormatError(f"{prefix}: transform width {adapter.in_channels} does not divide "
                                   f"the residual fan-in {adapter.fan_in}")
        adapters[prefix] = adapter
    _check_against_arch(adapters, config.get("arch"))
    return TLoRAFile(adapters, metadata, config, path, size)


# What other adapter kinds store for a module `x` as `x.<suffix>` (ComfyUI's weight adapters and its
# loader's diff/set/norm patches; kohya, LyCORIS, PEFT and diffusers files use these): each patches
# x's weight as a TLoRA of x does, so a host would apply one and drop the other.
FOREIGN_SUFFIXES = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora.up.weight", "lora.down.weight", "lora_A",
    "lora_B", "lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight",
    "lora_linear_layer.up.weight", "lora_linear_layer.down.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a",
    "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
    "lokr_t2", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks", "oft_diag", "diff", "set_weight",
    "w_norm")


def foreign_keys(prefix: str, keys: Container[str]) -> list[str]:
    """Keys of another adapter kind for module `prefix` (a few lookups in `keys`, no scan)."""
    return [f"{prefix}.{suffix}" for suffix in FOREIGN_SUFFIXES if f"{prefix}.{suffix}" in keys]


# Suffixes at least one of which every TLoRA module has (its scale, or the first core of a part).
TLORA_PROBES = PROBES


def has_tlora_module(prefix: str, keys: Container[str]) -> bool:
    """Whether `keys` hold a TLoRA module under this prefix (a few lookups, no scan)."""
    return any(f"{prefix}.{probe}" in keys for probe in TLORA_PROBES)


def check_one_adapter_per_weight(prefix: str, keys: Container[str]) -> None:
    """TLoRAFormatError when module `prefix`'s weight is also given under another name or by another adapter kind.

    The rule every loader applies (ours, ComfyUI's registered adapter, the webuis'): hosts keep one
    patch per weight, so either file would lose a half without a word.
    """
    names = sorted(arch_mod.same_weight_names(prefix))
    twice = next((n for n in names if has_tlora_module(n, keys)), None)
    if twice is not None:
        generic, other = sorted((prefix, twice), key=lambda n: n.startswith(("lora_unet_", "lora_te")))
        raise TLoRAFormatError(f"module {generic} is given twice (also as {other}); loaders would apply one copy or "
                               f"the other: keep one name per module")
    clash = next((k for n in (prefix, *names) for k in foreign_keys(n, keys)), None)
    if clash is not None:
        raise TLoRAFormatError(f"module {prefix} also has {clash}, another adapter's tensor for the same weight: "
                               f"a loader would apply one and drop the other; save the LoRA and the TLoRA as two files")


def duplicate_modules(prefixes: Iterable[str]) -> list[tuple[str, str]]:
    """(generic name, other name) of each module a file names twice (e.g. generic and kohya-style)."""
    names = set(prefixes)
    return sorted((p, alias) for p in names for alias in arch_mod.aliases(p) if alias in names)


def load_file(path: str | os.PathLike) -> dict[str, ModuleAdapter]:
    """Load and validate a TLoRA file: {module prefix: ModuleAdapter}."""
    return load(path).adapters


# ----- save ------------------------------------------------------------------------------
def _kind_counts(adapters: Iterable[ModuleAdapter], part: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in adapters:
        kind = str(getattr(a, part))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def summarize(adapters: Mapping[str, ModuleAdapter]) -> dict[str, Any]:
    """Module count, params and per-kind breakdown of a set of adapters (JSON-able)."""
    by_kind: dict[str, int] = {}
    transform_params = residual_params = 0
    for a in adapters.values():
        t = sum(v.numel() for k, v in a.tensors.items() if k.startswith(T_PART))
        r = sum(v.numel() for k, v in a.tensors.items() if k.startswith(R_PART))
        transform_params, residual_params = transform_params + t, residual_params + r
        if t:
            by_kind[str(a.transform)] = by_kind.get(str(a.transform), 0) + t
        if r:
            by_kind[str(a.residual)] = by_kind.get(str(a.residual), 0) + r
    return {"modules": len(adapters), "params": transform_params + residual_params,
            "transform_params": transform_params, "residual_params": residual_params,
            "params_by_kind": by_kind,
            "transform_kinds": _kind_counts(adapters.values(), "transform"),
            "residual_kinds": _kind_counts(adapters.values(), "residual")}


def _metadata_value(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    raise TypeError(f"metadata {key!r}: cannot store a {type(value).__name__} (use str, number, list or dict)")


def build_metadata(adapters: Mapping[str, ModuleAdapter], metadata: Mapping[str, Any] | None = None,
                   config: Mapping[str, Any] | None = None, title: str = "TLoRA adapter",
                   dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """The string metadata save_file writes (tlora.*, modelspec.*, ss_* and the caller's keys)."""
    return metadata_from_summary(summarize(adapters), metadata, config, title, dtype)


def metadata_from_summary(summary: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                          config: Mapping[str, Any] | None = None, title: str = "TLoRA adapter",
                          dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Metadata from a `summarize` result (shared with the planner's file-size estimate)."""
    cfg: dict[str, Any] = dict(config or {})
    # The caller names what was asked for; the counts always describe what is stored.
    for part in ("transform", "residual"):
        kinds = summary[f"{part}_kinds"]
        if part not in cfg:
            cfg[part] = next(iter(kinds)) if len(kinds) == 1 else "mixed"
    cfg.update(summary)
    cfg["format_version"] = int(FORMAT_VERSION)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    arch_name = cfg.get("arch")
    known = isinstance(arch_name, str) and arch_name in arch_mod.ARCHS
    out: dict[str, str] = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch_mod.modelspec_architecture(arch_name) if known else "unknown/transformed-lora",
        "modelspec.implementation": "ComfyUI-TLoRA",
        "modelspec.title": str(cfg.get("title") or title),
        # What a card shows beside the title; "tlora" alone is T-LoRA (timestep LoRA) in LyCORIS and other tools.
        "modelspec.description": METHOD_DESCRIPTION,
        # Not "tlora": a T-LoRA trainer writes that (with ordinary LoRA keys). Readers never rely on this value.
        "ss_network_module": NETWORK_MODULE,
        "ss_network_args": json.dumps({"transform": str(cfg["transform"]), "residual": str(cfg["residual"])}),
    }
    if "alpha" in cfg:
        out["ss_network_alpha"] = _metadata_value("alpha", cfg["alpha"])
    ranks = {kind.partition(":")[2] or "0" for kind in summary["residual_kinds"]}
    if len(ranks) == 1:
        out["ss_network_dim"] = ranks.pop()
    if known:
        out["ss_base_model_version"] = arch_mod.ARCHS[arch_name].base_version
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings (got {key!r})")
        if key in RESERVED_METADATA:
            raise ValueError(f"metadata {key!r} is written by save_file; pass settings in config=")
        out[key] = _metadata_value(key, value)
    out["tlora.version"] = FORMAT_VERSION
    out["tlora.config"] = json.dumps(cfg, sort_keys=True)
    return out


def state_dict(adapters: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{`<prefix>.<suffix>`: contiguous CPU tensor in dtype} for a dict of adapters."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"cannot save as {dtype}; use one of {', '.join(map(str, SAVE_DTYPES))}")
    out: dict[str, torch.Tensor] = {}
    for prefix, adapter in adapters.items():
        if not isinstance(prefix, str) or not prefix or SUFFIX_MARK in prefix or prefix.startswith("tlora_"):
            raise TLoRAFormatError(f"invalid module prefix {prefix!r}")
        for suffix, tensor in adapter.tensors.items():
            value = tensor.detach().to("cpu", dtype).contiguous().clone()  # clone: no shared storage
            if not bool(torch.isfinite(value).all()):
                raise TLoRAFormatError(f"{prefix}: tensor {suffix!r} overflows {dtype} (values too large)")
            out[f"{prefix}.{suffix}"] = value
    return out


def save_file(adapters: Mapping[str, Any], path: str | os.PathLike,
              metadata: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
              dtype: torch.dtype = torch.float32, replace: bool = True) -> None:
    """Write adapters ({module prefix: ModuleAdapter or TLoRAModule}) atomically as safetensors.

    replace=False never replaces an existing file (FileExistsError; see fileio.atomic_write).
    """
    path = os.fspath(path)
    # TLoRAModule (training) exports through to_adapter(); ModuleAdapter is stored as is.
    adapters = {k: (v.to_adapter() if hasattr(v, "to_adapter") else v) for k, v in adapters.items()}
    if not adapters:
        raise TLoRAFormatError("nothing to save: no adapters")
    bad = [k for k, v in adapters.items() if not isinstance(v, ModuleAdapter)]
    if bad:
        raise TypeError(f"save_file expects ModuleAdapter values ({bad[0]!r} is {type(adapters[bad[0]]).__name__})")
    title = os.path.splitext(os.path.basename(path))[0] or "TLoRA adapter"
    data = _st_save(state_dict(adapters, dtype), metadata=build_metadata(adapters, metadata, config, title, dtype))
    atomic_write(path, data, replace=replace)
