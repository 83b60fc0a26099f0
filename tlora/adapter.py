"""The adapter of one weight: W(sigma) = W0 + sigma (W0 T + s Delta - W0).

A ModuleAdapter holds the tensors exactly as the file stores them (suffix -> tensor, see
docs/FORMAT.md), validates them, and computes patched weights in float32. Linear weights
are (O, I); conv weights (O, C, kh, kw): T acts on the C input channels at every kernel
tap, Delta covers the flattened (C, kh, kw) fan-in.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import shapes as shapes_mod
from .errors import TLoRAFormatError, TLoRAShapeError
from .functional import tr, trm
from .functional import weight as wside
from .spec import DEFAULT_RESIDUAL, DEFAULT_TRANSFORM, Kind, default_scale, parse_residual, parse_transform

# The file's tensor names (docs/FORMAT.md), the one place they are spelled: a module `m` stores
# `m.<suffix>`. Transform tensors start with T_PART, residual ones with R_PART.
T_PART, R_PART = "tlora_t.", "tlora_r."
T_CORE = T_PART + "{}"
T_DIAG = T_PART + "diag"
R_OUT = R_PART + "out.{}"
R_IN = R_PART + "in.{}"
R_UP = R_PART + "up"
R_DOWN = R_PART + "down"
SCALE = "tlora_scale"
# Suffixes at least one of which every TLoRA module has (its scale, or the first tensor of a part).
PROBES = (SCALE, T_CORE.format(0), T_DIAG, R_OUT.format(0), R_IN.format(0), R_UP, R_DOWN)

SUFFIX_PATTERN = re.compile(rf"^({re.escape(T_PART)}(\d+|diag)|{re.escape(R_PART)}((out|in)\.\d+|up|down)|{SCALE})$")
# Largest adapter entry accepted. Training moves entries by about the learning rate per step and
# keeps only adapters whose outputs are finite (trainer/guard.py); a file with entries of 1e30 (finite
# in float32) only ever gave NaN or black images, in every loader.
MAX_ABS_VALUE = 1e6
# A transform on a dimension whose factors still include one wider than this would be a
# huge dense core (large primes): such dimensions get the `diag` transform instead.
MAX_TRANSFORM_FACTOR = 256


def _numbered(tensors: Mapping[str, Tensor], pattern: str, name: str) -> list[Tensor]:
    cores = []
    while pattern.format(len(cores)) in tensors:
        cores.append(tensors[pattern.format(len(cores))])
    stray = [k for k in tensors if re.fullmatch(re.escape(pattern).replace(r"\{\}", r"\d+"), k)]
    if len(stray) != len(cores):
        raise TLoRAFormatError(f"{name}: core numbering of {pattern.format('<d>')} is not 0..D-1 "
                               f"(found {sorted(stray)})")
    return cores


def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def layout(weight_shape: Sequence[int], transform: str | Kind, residual: str | Kind,
           shapes: str = "paper") -> tuple[Kind, Kind, dict[str, tuple[int, ...]]]:
    """(transform kind, residual kind, {suffix: shape}) of a fresh adapter for a weight, in file order.

    The one owner of the layout: ModuleAdapter.create fills it and the planner counts it.
    A transform whose factors stay wider than MAX_TRANSFORM_FACTOR becomes `diag`.
    """
    t_kind, r_kind = parse_transform(transform), parse_residual(residual)
    if t_kind.kind == "none" and r_kind.kind == "none":
        raise TLoRAShapeError("an adapter needs a transform or a residual (both are none)")
    out_features, in_channels = int(weight_shape[0]), int(weight_shape[1])
    fan_in = _prod(weight_shape[1:])
    entries: dict[str, tuple[int, ...]] = {}
    if t_kind.kind == "trm":
        factors = shapes_mod.factorize(in_channels, shapes)
        if max(factors) > MAX_TRANSFORM_FACTOR:
            t_kind = Kind("diag")
        else:
            entries.update({T_CORE.format(d): (n, n, t_kind.rank, t_kind.rank) for d, n in enumerate(factors)})
    if t_kind.kind == "diag":
        entries[T_DIAG] = (in_channels,)
    if r_kind.kind == "tr":
        r = r_kind.rank
        entries.update({R_OUT.format(d): (n, r, r) for d, n in enumerate(shapes_mod.factorize(out_features, shapes))})
        entries.update({R_IN.format(d): (n, r, r) for d, n in enumerate(shapes_mod.factorize(fan_in, shapes))})
    elif r_kind.kind == "lora":
        entries[R_UP] = (out_features, r_kind.rank)
        entries[R_DOWN] = (r_kind.rank, fan_in)
    entries[SCALE] = ()
    return t_kind, r_kind, entries


def _factors(entries: Mapping[str, tuple[int, ...]], pattern: str) -> list[int]:
    """Leading sizes of the numbered entries `pattern.format(0..)` of a layout (the cores' factors)."""
    out = []
    while pattern.format(len(out)) in entries:
        out.append(entries[pattern.format(len(out))][0])
    return out


class ModuleAdapter:
    """A validated TLoRA adapter for one weight (tensors keyed by file suffix)."""

    def __init__(self, tensors: Mapping[str, Tensor], name: str = "<module>",
                 weight_shape: Sequence[int] | None = None):
        self.name = name
        self.tensors: dict[str, Tensor] = dict(tensors)
        self._validate()
        if weight_shape is not None:
            self.check_fits(weight_shape)

    # ----- construction -------------------------------------------------------------
    @classmethod
    def create(cls, weight_shape: Sequence[int], transform: str | Kind = DEFAULT_TRANSFORM,
               residual: str | Kind = DEFAULT_RESIDUAL, shapes: str = "paper", alpha: float = 1.0,
               generator: torch.Generator | None = None, name: str = "<module>",
               dtype: torch.dtype = torch.float32) -> "ModuleAdapter":
        """A fresh adapter for a weight: identity transform, zero residual (tensors as `layout` says)."""
        t_kind, r_kind, entries = layout(weight_shape, transform, residual, shapes)
        tensors: dict[str, Tensor] = {}
        if t_kind.kind == "trm":
            cores = trm.identity_cores(_factors(entries, T_CORE), t_kind.rank, dtype)
            tensors.update({T_CORE.format(d): c for d, c in enumerate(cores)})
        elif t_kind.kind == "diag":
            tensors[T_DIAG] = torch.ones(entries[T_DIAG], dtype=dtype)
        # Random draws in a fixed order (TR out cores, then in cores; LoRA down): seeded runs repeat.
        if r_kind.kind == "tr":
            out_cores, in_cores = tr.init_cores(_factors(entries, R_OUT), _factors(entries, R_IN),
                                                r_kind.rank, generator, dtype)
            tensors.update({R_OUT.format(d): c for d, c in enumerate(out_cores)})
            tensors.update({R_IN.format(d): c for d, c in enumerate(in_cores)})
        elif r_kind.kind == "lora":
            tensors[R_UP] = torch.zeros(entries[R_UP], dtype=dtype)
            fan_in = entries[R_DOWN][1]
            bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform(a=sqrt(5)) bound, as nn.Linear/PEFT
            tensors[R_DOWN] = (torch.rand(entries[R_DOWN], generator=generator, dtype=dtype) * 2 - 1) * bound
        tensors[SCALE] = torch.tensor(default_scale(r_kind, alpha), dtype=dtype)
        return cls(tensors, name=name, weight_shape=weight_shape)

    @classmethod
    def like(cls, source: "ModuleAdapter", tensors: Mapping[str, Tensor]) -> "ModuleAdapter":
        """`source` over moved copies of its tensors: names, shapes and dtypes checked, values not re-read.

        Hosts that rebuild a patch every time they move its weights (ComfyUI 0.33's dynamic VRAM
        casts them per use) would otherwise re-validate every layer at every step, reading every
        value back from the device. The copies hold the validated values, so the facts derived
        from them (kinds, factors, an identity start, the scale) carry over.
        """
        tensors = dict(tensors)
        # Another dtype may overflow (1e30 in float16) or round an identity start: validated anew.
        if tensors.keys() != source.tensors.keys() or any(
                not isinstance(v, Tensor) or tuple(v.shape) != tuple(source.tensors[k].shape)
                or v.dtype != source.tensors[k].dtype for k, v in tensors.items()):
            return cls(tensors, name=source.name)
        copy = cls.__new__(cls)
        copy.__dict__.update(source.__dict__)
        copy.tensors = tensors
        copy.transform_cores = [tensors[T_CORE.format(d)] for d in range(len(source.transform_cores))]
        copy.diag = tensors.get(T_DIAG)
        copy.out_cores = [tensors[R_OUT.format(d)] for d in range(len(source.out_cores))]
        copy.in_cores = [tensors[R_IN.format(d)] for d in range(len(source.in_cores))]
        copy.up, copy.down = tensors.get(R_UP), tensors.get(R_DOWN)
        return copy

    # ----- validation ---------------------------------------------------------------
    def _fail(self, problem: str) -> TLoRAFormatError:
        return TLoRAFormatError(f"{self.name}: {problem}")

    def _validate(self) -> None:
        t = self.tensors
        for key, value in t.items():
            if not SUFFIX_PATTERN.match(key):
                raise self._fail(f"unknown tensor {key!r}")
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise self._fail(f"tensor {key!r} must be floating point (got "
                                 f"{getattr(value, 'dtype', type(value).__name__)})")
            if value.numel() == 0:
                # A rank-0 LoRA or a 0-wide core would load as a silent no-op.
                raise self._fail(f"tensor {key!r} is empty (shape {tuple(value.shape)})")
            largest = float(value.detach().abs().max())  # NaN when any entry is NaN
            if not math.isfinite(largest):
                raise self._fail(f"tensor {key!r} has NaN or infinite values")
            if largest > MAX_ABS_VALUE:
                raise self._fail(f"tensor {key!r} has values up to {largest:.3g}; adapter entries beyond "
                                 f"{MAX_ABS_VALUE:.0e} make any model's weights overflow")
        # Transform.
        self.transform_cores = _numbered(t, T_CORE, self.name)
        self.diag = t.get(T_DIAG)
        if self.transform_cores and self.diag is not None:
            raise self._fail("has both a TRM transform and a diag transform")
        if self.transform_cores:
            rank = self.transform_cores[0].shape[-1] if self.transform_cores[0].dim() == 4 else 0
            for d, core in enumerate(self.transform_cores):
                if core.dim() != 4 or core.shape[0] != core.shape[1] or core.shape[2] != rank \
                        or core.shape[3] != rank or rank < 1:
                    raise self._fail(f"transform core {d} has shape {tuple(core.shape)}; expected "
                                     f"(n, n, R, R) with the same R for every core")
            self.transform = Kind("trm", int(rank))
            self.transform_factors = tuple(int(c.shape[0]) for c in self.transform_cores)
            # 1/R is inexact in floating point for R not a power of two, so an untouched
            # identity start is recognised exactly and then contributes exactly nothing.
            self.transform_is_identity = all(
                torch.equal(c, ref.to(c.dtype)) for c, ref in zip(
                    self.transform_cores, trm.identity_cores(self.transform_factors, int(rank))))
            self.in_channels: int | None = _prod(self.transform_factors)
        elif self.diag is not None:
            if self.diag.dim() != 1:
                raise self._fail(f"diag transform has shape {tuple(self.diag.shape)}; expected (I,)")
            self.transform = Kind("diag")
            self.transform_factors = (int(self.diag.shape[0]),)
            self.transform_is_identity = bool((self.diag == 1).all())
            self.in_channels = int(self.diag.shape[0])
        else:
            self.transform, self.transform_factors, self.in_channels = Kind("none"), (), None
            self.transform_is_identity = True
        # Residual.
        self.out_cores = _numbered(t, R_OUT, self.name)
        self.in_cores = _numbered(t, R_IN, self.name)
        self.up, self.down = t.get(R_UP), t.get(R_DOWN)
        has_tr, has_lora = bool(self.out_cores or self.in_cores), self.up is not None or self.down is not None
        if has_tr and has_lora:
            raise self._fail("has both a tensor-ring and a LoRA residual")
        self.out_features: int | None = None
        self.fan_in: int | None = None
        if has_tr:
            if not self.out_cores or not self.in_cores:
                raise self._fail("tensor-ring residual needs both tlora_r.out.* and tlora_r.in.* cores")
            rank = self.out_cores[0].shape[-1] if self.out_cores[0].dim() == 3 else 0
            for label, cores in (("out", self.out_cores), ("in", self.in_cores)):
                for d, core in enumerate(cores):
                    if core.dim() != 3 or core.shape[1] != rank or core.shape[2] != rank or rank < 1:
                        raise self._fail(f"residual {label} core {d} has shape {tuple(core.shape)}; "
                                         f"expected (n, R, R) with the same R for every core")
            self.residual = Kind("tr", int(rank))
            self.out_features = _prod([c.shape[0] for c in self.out_cores])
            self.fan_in = _prod([c.shape[0] for c in self.in_cores])
        elif has_lora:
            if self.up is None or self.down is None:
                raise self._fail("LoRA residual needs both tlora_r.up and tlora_r.down")
            if self.up.dim() != 2 or self.down.dim() != 2 or self.up.shape[1] != self.down.shape[0]:
                raise self._fail(f"LoRA residual shapes up {tuple(self.up.shape)} / down "
                                 f"{tuple(self.down.shape)} do not chain as (O, r) @ (r, fan_in)")
            self.residual = Kind("lora", int(self.up.shape[1]))
            self.out_features, self.fan_in = int(self.up.shape[0]), int(self.down.shape[1])
        else:
            self.residual = Kind("none")
        if self.transform.kind == "none" and self.residual.kind == "none":
            raise self._fail("has neither a transform nor a residual")
        scale = t.get(SCALE)
        if scale is None:
            raise self._fail(f"missing {SCALE}")
        if scale.dim() != 0:
            raise self._fail(f"{SCALE} must be a 0-d tensor (got shape {tuple(scale.shape)})")
        self.scale = float(scale)

    def check_fits(self, weight_shape: Sequence[int]) -> None:
        """Raise TLoRAShapeError unless this adapter fits a weight of this shape."""
        shape = tuple(int(s) for s in weight_shape)
        if len(shape) not in (2, 4):
            raise TLoRAShapeError(f"{self.name}: weight shape {shape} is neither linear (O, I) "
                                  f"nor conv2d (O, C, kh, kw)")
        problems = []
        if self.in_channels is not None and self.in_channels != shape[1]:
            problems.append(f"transform is {self.in_channels}-wide but the weight has {shape[1]} inputs")
        if self.out_features is not None and self.out_features != shape[0]:
            problems.append(f"residual has {self.out_features} outputs but the weight has {shape[0]}")
        if self.fan_in is not None and self.fan_in != _prod(shape[1:]):
            problems.append(f"residual fan-in is {self.fan_in} but the weight's is {_prod(shape[1:])}")
        if problems:
            raise TLoRAShapeError(f"{self.name}: does not fit weight {shape}: " + "; ".join(problems))

    # ----- maths --------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of stored parameters (the scale excluded)."""
        return sum(v.numel() for k, v in self.tensors.items() if k != SCALE)

    def transform_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor | None:
        """Dense I x I transform (None when there is none); float64 keeps T = I exact at init."""
        if self.transform_cores:
            return trm.dense([c.to(dtype) for c in self.transform_cores])
        if self.diag is not None:
            return torch.diag(self.diag.to(dtype))
        return None

    def residual_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """Dense O x fan_in residual Delta, unscaled (None when there is none)."""
        if self.out_cores:
            return tr.dense([c.to(dtype) for c in self.out_cores], [c.to(dtype) for c in self.in_cores])
        if self.up is not None:
            return self.up.to(dtype) @ self.down.to(dtype)
        return None

    def weight_diff(self, weight: Tensor, strength: float = 1.0) -> Tensor:
        """sigma (W0 T + s Delta - W0) in float32 (float64 for a float64 weight), shaped like weight.

        One merge for every caller (ComfyUI's patching, `patched_weight`): `weight.merge_diff`,
        factored, never a dense T; an exact identity start contributes exactly nothing.
        """
        self.check_fits(weight.shape)
        cores = self.transform_cores if self.transform_cores and not self.transform_is_identity else None
        diag = self.diag if self.diag is not None and not self.transform_is_identity else None
        residual = None
        if self.out_cores:
            residual = ("tr", self.out_cores, self.in_cores, self.scale)
        elif self.up is not None:
            residual = ("lora", self.up, self.down, self.scale)
        return wside.merge_diff(weight, strength, cores=cores, diag=diag, residual=residual)

    def patched_weight(self, weight: Tensor, strength: float = 1.0) -> Tensor:
        """The weight at this strength; same shape/dtype as weight; strength 0 returns W0 exactly."""
        if strength == 0:
            return weight.clone()
        diff = self.weight_diff(weight, strength)
        return (weight.to(diff.dtype) + diff).to(weight.dtype)

    def to(self, *args, **kwargs) -> "ModuleAdapter":
        """A copy with every tensor moved/cast (as Tensor.to)."""
        return ModuleAdapter.like(self, {k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def config(self) -> dict:
        """A JSON-able summary of this module's adapter."""
        return {"transform": str(self.transform), "residual": str(self.residual),
                "transform_factors": list(self.transform_factors),
                "residual_out_factors": [int(c.shape[0]) for c in self.out_cores],
                "residual_in_factors": [int(c.shape[0]) for c in self.in_cores],
                "scale": self.scale, "params": self.num_params()}

    def __repr__(self) -> str:
        return (f"ModuleAdapter({self.name!r}, transform={self.transform}, residual={self.residual}, "
                f"params={self.num_params()})")
