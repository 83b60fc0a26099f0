"""Choosing the activation-side form of a transform for a layer: measured, cached, forceable.

Forms (all exact, see `tlora.functional.trm`): ``factored`` (one GEMM per core on
token-inner blocks), ``merged`` (the same on two super-cores), ``dense`` (T built once per
call, one GEMM). Which is fastest depends on the factors, rank, token count, device, dtype
and whether a backward pass follows, so a layer with form="auto" calls `select_form`:

1. ``TLORA_FORM=factored|merged|dense`` in the environment forces a form for every "auto"
   layer (an explicit form passed to a layer always wins).
2. Otherwise the key (layout, factors, R, out features, token bucket = next power of two,
   device, dtype, requires_grad) is looked up in an in-process cache.
3. On a miss, `benchmark_forms` times each candidate on synthetic data of that size
   (forward, plus backward when gradients are needed; frozen weight included for linears;
   interleaved repeats, minimum kept) and the fastest is cached. Candidates the cost model
   rates more than 4x slower than its best are not timed.
4. With ``TLORA_AUTOTUNE=0``, while tracing/compiling or capturing a CUDA graph, or if
   timing fails, the deterministic cost model `choose_form` decides instead.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import threading
import time
from collections.abc import Callable, Sequence

import torch

from . import native
from .functional import _trm_chain, trm

FORMS = trm.FORMS
ENV_FORM = "TLORA_FORM"
ENV_AUTOTUNE = "TLORA_AUTOTUNE"
# Skip timing a form the model rates this many times slower than its best candidate.
PREFILTER = 4.0
# Another form must beat ``factored`` (the memory-light default) by this factor in the timed
# trial: single trials on a shared machine move by ~10%, and a noise-driven pick of ``dense``
# keeps an I x I matrix per layer for the backward.
MARGIN = 0.9
# Compiled chain (tlora.native) on CPU: multiply-adds run at about this fraction of the
# cost model's GEMM rate (measured ~30 of ~40 G/s on one AVX2 core), one call per pass.
NATIVE_EFFICIENCY = 0.6

_cache: dict[tuple, str] = {}

# Cost-model machine constants: (flop/s of well-shaped GEMMs, bytes/s for intermediates,
# seconds per kernel call, efficiency of the dense form's GEMMs). Rough CPU (2-16 cores)
# and datacenter-GPU figures; the CPU ones fitted (within ~20%) to measured per-form times
# of the SD1.5 attention shapes at 1024 tokens, 1 thread (docs/BENCHMARKS.md).
_MACHINE = {"cpu": (1.0e11, 1.2e10, 8e-6, 0.7), "cuda": (4.0e13, 2.0e12, 6e-6, 1.0)}


def token_bucket(tokens: int) -> int:
    """The cache bucket of a token count: the next power of two."""
    return 1 << max(0, int(tokens) - 1).bit_length()


def candidates(factors: Sequence[int]) -> tuple[str, ...]:
    """Forms that are distinct for these factors (one core: dense only; two: no merged)."""
    if len(factors) < 2:
        return ("dense",)
    if len(factors) == 2:
        return ("factored", "dense")
    return FORMS


def trial_candidates(factors: Sequence[int], device_type: str = "cpu", requires_grad: bool = True) -> tuple[str, ...]:
    """The candidates an auto layer considers: `candidates`, minus ``merged`` when training on CPU.

    ``merged`` (two super-cores built from the cores each step, then the same chain engine;
    never W0 T) does more multiply-adds than ``factored`` for fewer, larger GEMMs. Measured
    on CPU with gradients (docs/BENCHMARKS.md) it was never faster than ``factored`` beyond
    timing noise, so timing it there only adds chances of a noise-driven pick. It stays a
    candidate without gradients and on accelerators.
    """
    options = candidates(factors)
    if device_type == "cpu" and requires_grad and "merged" in options:
        options = tuple(f for f in options if f != "merged")
    return options


def estimate_cost(form: str, factors: Sequence[int], rank: int, tokens: int,
                  device_type: str = "cpu", requires_grad: bool = True) -> float:
    """Modelled seconds for applying T (forward, plus backward if requires_grad) to `tokens` rows."""
    flops_rate, bandwidth, call, dense_efficiency = _MACHINE.get(device_type, _MACHINE["cuda"])
    width, r2, n = math.prod(factors), rank * rank, max(int(tokens), 1)
    if form == "dense" or len(factors) < 2:
        split = trm.best_split(factors) if len(factors) > 1 else 1
        p = math.prod(factors[:split])
        build = 2 * width * width * r2 + 2 * p ** 4 * r2
        passes = 3 if requires_grad else 1
        return (passes * 2 * n * width * width + 3 * build) / (flops_rate * dense_efficiency) + 8 * call
    sizes = [math.prod(factors[a:b]) for a, b in _trm_chain._groups(factors, form)]
    if device_type == "cpu" and 3 <= len(sizes) <= native.MAX_CORES and native.load() is not None:
        return _native_cost(sizes, rank, n, flops_rate, call, requires_grad)
    fwd_time, inter_time = 0.0, 0.0
    for d, s in enumerate(sizes):
        ring = r2 if d in (0, len(sizes) - 1) else r2 * rank
        macs = n * width * s * ring
        # Small contraction sizes run far below a GEMM's peak.
        k = s if d == 0 else rank * s
        efficiency = min(1.0, (k + 16) / 64)
        written = n * width * (r2 if d < len(sizes) - 1 else 1) * 4
        stage = 2 * macs / (flops_rate * efficiency) + 2 * written / bandwidth
        fwd_time += stage
        if d < len(sizes) - 1:
            inter_time += stage
    blocks = max(1, n * width * r2 // _trm_chain.BLOCK_ELEMENTS) if device_type == "cpu" else 1
    calls = blocks * (len(sizes) + rank + 2) * call
    if not requires_grad:
        return fwd_time + calls
    # Backward: transpose products and operand gradients (about 2x) plus the recomputation.
    return 3 * fwd_time + inter_time + 3 * calls


def chain_macs(sizes: Sequence[int], rank: int, tokens: int, requires_grad: bool = True) -> int:
    """Multiply-adds of the factored chain (D >= 3 cores) on `tokens` rows, as both engines run it.

    The first and last cores open and close the ring (R^2 per input element and factor), each
    middle core carries one ring index across (R^3). The backward is the input gradient and
    the cores' gradient reductions (one forward's worth each) plus the recomputed
    intermediates (every stage but the last), which are not kept from the forward.
    """
    width, r2 = math.prod(sizes), rank * rank
    stages = [tokens * width * s * (r2 if d in (0, len(sizes) - 1) else r2 * rank) for d, s in enumerate(sizes)]
    forward = sum(stages)
    return forward if not requires_grad else 3 * forward + sum(stages[:-1])


def _native_cost(sizes: Sequence[int], rank: int, tokens: int, flops_rate: float, call: float,
                 requires_grad: bool) -> float:
    """Modelled seconds of the compiled chain: forward; backward = input gradient, reductions, recompute."""
    macs = chain_macs(sizes, rank, tokens, requires_grad)
    return 2 * macs / (flops_rate * NATIVE_EFFICIENCY) + (3 if requires_grad else 1) * call


def choose_form(factors: Sequence[int], rank: int, tokens: int, device_type: str = "cpu",
                requires_grad: bool = True) -> str:
    """The cost model's pick among the candidate forms (deterministic; the fallback)."""
    options = trial_candidates(factors, device_type, requires_grad)
    return min(options, key=lambda f: (estimate_cost(f, factors, rank, tokens, device_type, requires_grad),
                                       FORMS.index(f)))


def forced_form() -> str | None:
    """The form forced by TLORA_FORM, if any (raises on an unknown name)."""
    value = os.environ.get(ENV_FORM, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in FORMS:
        raise ValueError(f"{ENV_FORM}={value!r}: expected one of {FORMS} or auto")
    return value


def autotune_enabled() -> bool:
    """False when TLORA_AUTOTUNE is 0/false/off, or while tracing, compiling or capturing."""
    if os.environ.get(ENV_AUTOTUNE, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_forms(factors: Sequence[int], rank: int, tokens: int, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, requires_grad: bool = True, layout: str = "linear",
                    weight: torch.Tensor | None = None, forms: Sequence[str] | None = None,
                    repeats: int = 5) -> dict[str, float]:
    """Seconds per call of each form on synthetic data (min over interleaved repeats)."""
    device = torch.device(device)
    width = math.prod(factors)
    gen = torch.Generator().manual_seed(0)  # private: the global RNG stream is left alone
    cores = [(torch.eye(n)[:, :, None, None] / rank + 0.1 * torch.randn(n, n, rank, rank, generator=gen))
             .to(device, dtype) for n in factors]
    shape = (tokens, width) if layout == "linear" else (1, width, tokens)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    if weight is not None:
        weight = weight.detach()
    forms = list(forms or candidates(factors))

    def run(form: str) -> None:
        if not requires_grad:
            with torch.no_grad():
                _op(form, x, cores, weight, layout)
            return
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_(True) for c in cores]
            xin = x.detach().requires_grad_(True)
            out = _op(form, xin, leaves, weight, layout)
            out.backward(torch.ones_like(out))

    best = {f: math.inf for f in forms}
    for f in forms:  # warm-up (allocator, kernels)
        run(f)
    for rep in range(repeats):
        order = forms[rep % len(forms):] + forms[:rep % len(forms)]
        for f in order:
            _sync(device)
            start = time.perf_counter()
            run(f)
            _sync(device)
            best[f] = min(best[f], time.perf_counter() - start)
    return best


def _op(form: str, x: torch.Tensor, cores: list[torch.Tensor], weight: torch.Tensor | None,
        layout: str) -> torch.Tensor:
    if layout == "linear":
        if weight is not None:
            return trm.linear(x, weight, None, cores, form)
        return trm.apply(x, cores, form)
    return trm.apply_channels(x, cores, form)


def _apart(work: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run timed trials in a thread of their own, away from the caller's autograd state.

    A first call can come from inside a gradient-checkpointed block: torch.utils.checkpoint's
    saved-tensor hooks (thread-local) would count the trials' tensors in the forward but not
    in the recompute (by then the choice is cached) and fail the backward. Inference and
    no-grad modes are thread-local too, so trials measure the same work from any caller. One
    thread serves every trial: what a thread keeps for itself (MKL's buffers, the kernels' work
    space, a malloc arena) is kept once, not left behind by a new thread per layer (measured: a
    Flux block pair's training run held 387 MiB after its trials on a thread each, 214 on this one, 113
    with no trials at all; benchmarks/train_memory.py).
    """
    global _trial_thread
    with _trial_lock:
        if _trial_thread is None or _trial_thread[0] != os.getpid():  # a forked child has no such thread
            _trial_thread = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tlora-form-trial"))
        pool = _trial_thread[1]

    def run() -> dict[str, float]:
        try:
            return work()
        finally:
            native.release()  # the largest trial's work space is not kept between trials
    return pool.submit(run).result()  # an error in the trial is raised here, in the caller's thread


_trial_thread: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (its process, the pool)
_trial_lock = threading.Lock()


def select_form(factors: Sequence[int], rank: int, tokens: int, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, requires_grad: bool = True, layout: str = "linear",
                weight: torch.Tensor | None = None) -> str:
    """The form an "auto" layer uses: forced, cached, measured on first use, or modelled."""
    forced = forced_form()
    if forced is not None:
        return forced
    device = torch.device(device)
    options = trial_candidates(factors, device.type, requires_grad)
    if len(options) == 1:
        return options[0]
    out_features = None if weight is None else int(weight.shape[0])
    key = (layout, tuple(int(f) for f in factors), int(rank), out_features, token_bucket(tokens),
           device.type, device.index, dtype, bool(requires_grad))
    form = _cache.get(key)
    if form is not None:
        return form
    if not autotune_enabled():
        return choose_form(factors, rank, tokens, device.type, requires_grad)
    costs = {f: estimate_cost(f, factors, rank, tokens, device.type, requires_grad) for f in options}
    cheapest = min(costs.values())
    timed = [f for f in options if costs[f] <= PREFILTER * cheapest]
    try:
        times = _apart(lambda: benchmark_forms(factors, rank, tokens, device=device, dtype=dtype,
                                               requires_grad=requires_grad, layout=layout, weight=weight,
                                               forms=timed))
        form = min(timed, key=lambda f: (times[f] * (1.0 if f == "factored" else 1.0 / MARGIN), FORMS.index(f)))
    except (RuntimeError, torch.cuda.OutOfMemoryError):  # e.g. no memory for the trial: use the model
        form = choose_form(factors, rank, tokens, device.type, requires_grad)
    _cache[key] = form
    return form


def cached_choices() -> dict[tuple, str]:
    """A copy of the in-process cache of measured choices (key -> form)."""
    return dict(_cache)


def clear_cache() -> None:
    """Forget every measured choice (e.g. after changing threads or devices)."""
    _cache.clear()
