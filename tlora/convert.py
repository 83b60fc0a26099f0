"""Conversions between TLoRA, ordinary LoRA and fine-tuned weights, one base weight at a time.

Every conversion is one rule: each input gives each base weight W0 it touches a delta (a TLoRA
module its effective `W0 T + s Delta - W0` on the base's own weight, a LoRA module `scale up @ down`,
a fine-tune `W* - W0`), the deltas are summed at the inputs' weights, and the sum D is written as

* an ordinary LoRA (`LoRATarget`): the truncated SVD of D at a fixed rank or at the smallest rank
  whose relative Frobenius error meets a target (export, merge), or
* a TLoRA of a given kind (`TLoRATarget`): the adapter fitted to W0 + D (fit, merge), tlora/fit.py.

Weights are processed in turn (the base read one weight at a time, tlora/basefile.py) after a
header-only plan has checked that every input module fits the base; nothing is written here.
Each module is reported with its rank, parameters, relative error |D - D'| / |D| and the output
difference on a sample batch, |x (D - D')^T| / |x (W0 + D)^T| for 16 N(0, 1) inputs (a conv's
fan-in patches), seeded by the module's name.
"""
from __future__ import annotations

import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import lowrank
from .adapter import ModuleAdapter
from .basefile import Located, WeightBase, open_checkpoint
from .errors import TLoRAError, TLoRAShapeError
from .fit import DEFAULT_ITERS, fit_adapter
from .format import is_tlora_state_dict, load, read_header
from .lorafile import LoRAModule, is_lora_keys, read_lora
from .spec import parse_residual, parse_transform

SAMPLE_ROWS = 16


@dataclass
class Input:
    """One input at its merge weight: a TLoRA or LoRA file's modules, or a fine-tuned checkpoint."""

    label: str
    kind: str  # "tlora" | "lora" | "checkpoint"
    weight: float = 1.0
    modules: dict[str, Any] = field(default_factory=dict)  # prefix -> ModuleAdapter | LoRAModule
    model: WeightBase | None = None  # a fine-tune's weights
    config: dict[str, Any] = field(default_factory=dict)


def read_input(path: str | os.PathLike, weight: float = 1.0) -> Input:
    """An input file by what it holds: TLoRA tensors, LoRA tensors, else a (fine-tuned) checkpoint."""
    path = os.fspath(path)
    label = os.path.basename(path)
    if not os.path.exists(path):
        raise TLoRAError(f"input {path} does not exist")
    if not math.isfinite(weight):
        raise TLoRAError(f"{label}: weight {weight} is not a finite number")
    header, _, _ = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    if is_tlora_state_dict(keys):
        loaded = load(path)
        return Input(label, "tlora", weight, dict(loaded.adapters), config=dict(loaded.config))
    if is_lora_keys(keys):
        return Input(label, "lora", weight, dict(read_lora(path)))
    return Input(label, "checkpoint", weight, model=open_checkpoint(path, label))


@dataclass(frozen=True)
class LoRATarget:
    """Write a LoRA: `rank` per module (capped at the weight's), or the smallest meeting `max_error`."""

    rank: int | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.max_error is None):
            raise TLoRAError("give a rank or an error target (not both)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise TLoRAError(f"rank must be an integer >= 1 (got {self.rank!r})")
        if self.max_error is not None and not (math.isfinite(self.max_error) and self.max_error >= 0):
            raise TLoRAError(f"the error target must be a number >= 0 (got {self.max_error!r})")

    def describe(self) -> dict[str, Any]:
        """What was asked, for metadata and reports."""
        return {"rank": self.rank} if self.rank is not None else {"max_error": self.max_error}


@dataclass(frozen=True)
class TLoRATarget:
    """Write a TLoRA of this kind, fitted to each target weight (tlora/fit.py)."""

    transform: str = "trm:2"
    residual: str = "lora:8"
    shapes: str = "paper"
    alpha: float = 1.0
    iters: int = DEFAULT_ITERS
    seed: int = 0

    def __post_init__(self) -> None:
        parse_transform(self.transform), parse_residual(self.residual)
        if self.iters < 0:
            raise TLoRAError(f"iterations must be >= 0 (got {self.iters})")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise TLoRAError(f"alpha must be a number > 0 (got {self.alpha!r})")

    def describe(self) -> dict[str, Any]:
        """What was asked, for metadata and reports."""
        return {"transform": self.transform, "residual": self.residual, "shapes": self.shapes, "alpha": self.alpha,
                "iters": self.iters, "seed": self.seed}


@dataclass
class Job:
    """One base weight and what each input adds to it."""

    generic: str
    shape: tuple[int, ...]
    parts: list[tuple[Input, Located, Any]] = field(default_factory=list)


def plan(inputs: Sequence[Input], base: WeightBase, groups: Sequence[str] = ("attn",)) -> list[Job]:
    """The base weights to convert, checked against every input module (header only, nothing read).

    `groups` picks a fine-tune's weights (tlora/arch.py's groups). Raises one-line errors for a module
    the base lacks or that does not fit it, a fine-tune without a weight of the base, two modules of
    one input on the same rows (loaders refuse those: TLoRA patches do not commute).
    """
    jobs: dict[str, Job] = {}
    for inp in inputs:
        covered: dict[str, list[tuple[str, set[int] | None]]] = {}
        if inp.kind == "checkpoint":
            assert inp.model is not None
            for generic, shape in base.modules(groups).items():
                theirs = inp.model.shapes.get(generic)
                if theirs != shape:
                    raise TLoRAShapeError(f"{inp.label}: weight {generic} is {theirs or 'missing'}, the base's is "
                                          f"{shape}: not a fine-tune of this base")
                jobs.setdefault(generic, Job(generic, shape)).parts.append((inp, Located(generic), None))
            continue
        for prefix, module in inp.modules.items():
            loc = base.locate(prefix)
            shape = base.shape(loc)
            if isinstance(module, ModuleAdapter):
                module.check_fits(shape)
            elif isinstance(module, LoRAModule) and (
                    module.up.shape[0] != shape[0] or module.down[0].numel() != math.prod(shape[1:])):
                raise TLoRAShapeError(f"{inp.label}: {prefix}: LoRA up {tuple(module.up.shape)} / down "
                                      f"{tuple(module.down.shape)} does not fit weight {shape}")
            rows = None if loc.pieces is None else set(loc.rows().tolist())
            for other, other_rows in covered.get(loc.generic, []):
                if rows is None or other_rows is None or rows & other_rows:
                    raise TLoRAShapeError(f"{inp.label}: modules {other} and {prefix} patch the same rows of "
                                          f"{loc.generic}; keep one name per weight")
            covered.setdefault(loc.generic, []).append((prefix, rows))
            jobs.setdefault(loc.generic, Job(loc.generic, base.shapes[loc.generic])).parts.append((inp, loc, module))
    if not jobs:
        raise TLoRAError("nothing to convert: the inputs touch no weight of the base")
    order = {g: i for i, g in enumerate(base.shapes)}
    return sorted(jobs.values(), key=lambda j: order[j.generic])


def target_delta(job: Job, base: WeightBase) -> tuple[Tensor, Tensor]:
    """(W0, D) in float64: the base weight and the weighted sum of the inputs' deltas on it."""
    w0 = base.weight(job.generic)
    if tuple(w0.shape) != job.shape:
        raise TLoRAShapeError(f"{base.label}: weight {job.generic} is {tuple(w0.shape)}, its header says {job.shape}")
    delta = None if len(job.parts) == 1 and job.parts[0][1].pieces is None else torch.zeros_like(w0)
    for inp, loc, module in job.parts:
        rows = loc.rows()
        if inp.kind == "checkpoint":
            d = inp.model.weight(job.generic) - w0
        else:
            part = w0 if rows is None else w0[rows]
            d = module.weight_diff(part) if isinstance(module, ModuleAdapter) else module.delta(tuple(part.shape))
        if delta is None:  # one input on the whole weight: its delta is the sum (no second weight-sized buffer)
            delta = d.mul_(inp.weight)
        elif rows is None:
            delta.add_(d, alpha=inp.weight)
        else:
            delta.index_add_(0, rows, d, alpha=inp.weight)
    return w0, delta


@dataclass
class ModuleReport:
    """How one base weight converted: rank (residual rank for a TLoRA), parameters, errors."""

    name: str
    generic: str
    shape: tuple[int, ...]
    rank: int
    params: int
    rel_error: float
    output_error: float
    sums: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # |D-D'|^2, |D|^2, |x(D-D')|^2, |xW'|^2

    def row(self) -> dict[str, Any]:
        """JSON-able."""
        return {"name": self.name, "module": self.generic, "shape": list(self.shape), "rank": self.rank,
                "params": self.params, "rel_error": self.rel_error, "output_error": self.output_error}


class _Probe:
    """What a module's report needs of the full-size weights, taken before they are freed: the sample
    batch x, x (W0 + D)^T, x D^T and |D|^2 (so the SVD runs with W0 already released)."""

    def __init__(self, generic: str, w0: Tensor, delta: Tensor):
        gen = torch.Generator().manual_seed(zlib.crc32(generic.encode()))
        self.x = torch.randn(SAMPLE_ROWS, delta[0].numel(), generator=gen, dtype=torch.float64)
        self.dy = self.x @ lowrank.as_matrix(delta).t()
        self.y = self.x @ lowrank.as_matrix(w0).t() + self.dy
        self.delta_sq = float(delta.pow(2).sum())

    def report(self, name: str, generic: str, shape: tuple[int, ...], rank: int, params: int, err_sq: float,
               out_miss: Tensor) -> ModuleReport:
        """The module's report from its squared error and the output miss x (D - D')^T."""
        sums = (err_sq, self.delta_sq, float(out_miss.pow(2).sum()), float(self.y.pow(2).sum()))
        ratio = lambda a, b: math.sqrt(a / b) if b else 0.0  # noqa: E731
        return ModuleReport(name, generic, shape, rank, params, ratio(sums[0], sums[1]), ratio(sums[2], sums[3]), sums)


@dataclass
class Result:
    """A conversion's output (LoRA factors or fitted adapters) and its report."""

    target: LoRATarget | TLoRATarget
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # kohya name -> (up, down)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # kohya name -> weight shape
    adapters: dict[str, ModuleAdapter] = field(default_factory=dict)  # generic -> fitted adapter
    modules: list[ModuleReport] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # weights the inputs leave exactly as they are
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Overall figures: modules written, parameters, relative and output errors over all modules."""
        tot = [sum(m.sums[i] for m in self.modules) for i in range(4)]
        written = [m for m in self.modules if m.rank > 0 or m.params > 0]
        ranks = sorted({m.rank for m in written})
        return {"modules": len(written), "dropped": len(self.modules) - len(written), "unchanged": len(self.unchanged),
                "params": sum(m.params for m in self.modules), "ranks": ranks,
                "rel_error": math.sqrt(tot[0] / tot[1]) if tot[1] else 0.0,
                "output_error": math.sqrt(tot[2] / tot[3]) if tot[3] else 0.0, "seconds": self.seconds,
                "target": self.target.describe()}


def _to_lora(name: str, job: Job, delta: Tensor, probe: _Probe, target: LoRATarget, result: Result) -> None:
    u, s, vh = lowrank.svd(delta)
    rank = min(target.rank, len(s)) if target.rank is not None else lowrank.rank_for_error(s, target.max_error)
    up, down = lowrank.factors(u, s, vh, rank)
    del u, vh
    err_sq = float(s[rank:].pow(2).sum())  # Eckart-Young: the discarded singular values
    out_miss = probe.dy - (probe.x @ down.t()) @ up.t()
    if rank:  # kept as float32, the widest dtype a file gets
        result.lora[name], result.shapes[name] = (up.float(), down.float()), job.shape
    result.modules.append(probe.report(name, job.generic, job.shape, rank, up.numel() + down.numel(), err_sq, out_miss))


def _to_tlora(job: Job, w0: Tensor, delta: Tensor, probe: _Probe, target: TLoRATarget, result: Result) -> None:
    adapter = fit_adapter(w0, w0 + delta, target.transform, target.residual, target.iters, target.seed,
                          target.shapes, target.alpha, name=job.generic)
    result.adapters[job.generic] = adapter
    miss = lowrank.as_matrix(delta - adapter.weight_diff(w0))
    result.modules.append(probe.report(job.generic, job.generic, job.shape, adapter.residual.rank,
                                       adapter.num_params(), float(miss.pow(2).sum()), probe.x @ miss.t()))


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Each module frees weight-sized temporaries (the SVD's copy, U, its workspace) while its small
    outputs stay: glibc keeps the holes between them, and without this a 560-module SDXL export grew
    by one workspace per module (about 18 MB each).
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def convert(inputs: Sequence[Input], base: WeightBase, target: LoRATarget | TLoRATarget,
            groups: Sequence[str] = ("attn",), progress: bool = True,
            on_step: Callable[[int, int], None] | None = None) -> Result:
    """Plan, then convert every base weight in turn (a tqdm bar with an ETA on stderr when `progress`)."""
    from tqdm import tqdm
    jobs = plan(inputs, base, groups)
    result = Result(target)
    start = time.perf_counter()
    with tqdm(total=len(jobs), unit="module", desc="converting", disable=not progress, file=sys.stderr,
              mininterval=0.5, dynamic_ncols=True) as bar:
        for done, job in enumerate(jobs, 1):
            w0, delta = target_delta(job, base)
            if not bool(delta.any()):
                result.unchanged.append(job.generic)
            elif isinstance(target, LoRATarget):
                probe = _Probe(job.generic, w0, delta)
                del w0  # the SVD's memory: the delta, its copy, U and the workspace, never W0 beside them
                _to_lora(base.kohya(job.generic), job, delta, probe, target, result)
            else:
                _to_tlora(job, w0, delta, _Probe(job.generic, w0, delta), target, result)
            w0 = delta = None
            _release_freed_memory()
            bar.update(1)
            if on_step is not None:
                on_step(done, len(jobs))
    result.seconds = time.perf_counter() - start
    if not result.lora and not result.adapters:
        what = "every delta is zero" if not result.modules else "every module's rank is 0 at this error target"
        raise TLoRAError(f"nothing to write: {what}")
    return result


# ----- writing ----------------------------------------------------------------------------------
def _source(inputs: Sequence[Input], base_label: str) -> dict[str, Any]:
    return {"inputs": [{"file": i.label, "kind": i.kind, "weight": i.weight,
                        **({"config": {k: i.config[k] for k in ("transform", "residual", "arch", "title")
                                       if k in i.config}} if i.config else {})} for i in inputs],
            "base": base_label}


def lora_metadata(result: Result, inputs: Sequence[Input], base_label: str, arch: str | None = None,
                  title: str = "LoRA exported from TLoRA") -> dict[str, str]:
    """kohya/modelspec metadata of an exported LoRA, with what it came from and the error of each module."""
    import json

    from . import arch as arch_mod
    ranks = sorted({m.rank for m in result.modules if m.rank})
    dim = str(ranks[0]) if len(ranks) == 1 else "Dynamic"  # kohya's resize script writes "Dynamic" too
    summary = result.summary()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "ComfyUI-TLoRA", "modelspec.title": title,
            "ss_tlora_source": json.dumps(_source(inputs, base_label)),
            "ss_tlora_method": "truncated SVD (float64) of each base weight's delta: W0 T + s Delta - W0 of a TLoRA, "
                               "scale up @ down of a LoRA, summed at the inputs' weights",
            "ss_tlora_target": json.dumps(result.target.describe()),
            "ss_tlora_error": json.dumps({k: summary[k] for k in ("rel_error", "output_error", "params", "modules",
                                                                   "dropped")}),
            "ss_tlora_module_errors": json.dumps({m.name: [m.rank, round(m.rel_error, 8), round(m.output_error, 8)]
                                                  for m in result.modules})}
    if arch in arch_mod.ARCHS:
        meta["ss_base_model_version"] = arch_mod.ARCHS[arch].base_version
        meta["modelspec.architecture"] = f"{arch_mod.ARCHS[arch].modelspec}/lora"
    return meta


def write_result(result: Result, path: str | os.PathLike, inputs: Sequence[Input], base_label: str,
                 arch: str | None = None, dtype: torch.dtype = torch.float32, replace: bool = True) -> None:
    """Write a conversion atomically: a kohya LoRA (tlora/lorafile.py) or a TLoRA file (tlora/format.py).

    replace=False never replaces an existing file (FileExistsError).
    """
    from .format import save_file
    from .lorafile import lora_state_dict, save_lora
    title = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    if isinstance(result.target, LoRATarget):
        save_lora(path, lora_state_dict(result.lora, result.shapes, dtype),
                  lora_metadata(result, inputs, base_label, arch, title), replace)
        return
    summary = result.summary()
    config = dict(result.target.describe(), title=title)
    config.pop("iters"), config.pop("seed")
    if arch is not None:
        config["arch"] = arch
    metadata = {"tlora.fit.source": _source(inputs, base_label), "tlora.fit.target": result.target.describe(),
                "tlora.fit.error": {k: summary[k] for k in ("rel_error", "output_error", "params", "modules")},
                "tlora.fit.module_errors": {m.name: [round(m.rel_error, 8), round(m.output_error, 8)]
                                            for m in result.modules}}
    save_file(result.adapters, path, metadata=metadata, config=config, dtype=dtype, replace=replace)


def report_text(result: Result, out: str, every_module: bool = False) -> str:
    """The report as lines: a table of every module when asked, then the totals."""
    s = result.summary()
    lines = []
    if every_module and result.modules:
        width = max(len(m.name) for m in result.modules)
        lines.append(f"  {'module'.ljust(width)}  rank      params  rel.error  output diff")
        lines += [f"  {m.name.ljust(width)}  {m.rank:4d}  {m.params:10,d}  {m.rel_error:9.2e}  {m.output_error:11.2e}"
                  for m in result.modules]
    ranks = s["ranks"]
    rank_text = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}") if ranks else "-"
    lines.append(f"wrote {out}: {s['modules']} modules, {s['params']:,} parameters, {rank_text}"
                 + (f"; {s['dropped']} dropped (rank 0 meets the target)" if s["dropped"] else "")
                 + (f"; {s['unchanged']} weights unchanged by the inputs, skipped" if s["unchanged"] else ""))
    lines.append(f"relative error {s['rel_error']:.3e} (Frobenius, all modules), output difference "
                 f"{s['output_error']:.3e} on a sample batch; {s['seconds']:.1f} s")
    return "\n".join(lines)
