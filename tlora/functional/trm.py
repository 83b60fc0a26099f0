"""Tensor-ring matrix (TRM) transforms: T[(i..), (j..)] = trace(A_1[i_1, j_1] ... A_D[i_D, j_D]).

Cores A_d have shape (n_d, n_d, R, R). Indices are flattened row-major (C order): the first
core indexes the slowest-varying factor. The row index i of T is the one contracted with
W0's input axis, so the adapted layer computes W0 (T x) and merges as W0 @ T.

Activation-side forms (all exact; `tlora.forms` picks one per layer):

* ``factored``: a chain of one small GEMM per core on token-inner blocks (``_Chain``),
  about ``tokens * I * (n_1 R^2 + sum_middle n_d R^3 + n_D R^2)`` multiply-adds; T is never
  formed, the backward is hand written (no permute copies) and recomputes the chain's
  intermediates from x instead of saving them (memory as LoRA: only x is kept).
* ``merged``: the same engine on two super-cores (prefix/suffix of sizes P, Q ~ sqrt(I),
  ``tokens * I * (P + Q) R^2``): more flops, fewer and larger GEMMs.
* ``dense``: T built from the cores once per call (``I^2 R^2``), then one GEMM.

The code lives in private modules by concern; this module is their public face:
``_trm_algebra`` (cores, merging, dense T, counts), ``_trm_chain`` (the factored engine,
its scratch buffers, threads and form plans), ``_trm_native`` (the compiled chain's
dispatch and self-check) and ``_trm_fused`` (the autograd nodes).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._trm_algebra import (best_split, dense, dense_with_strength, identity_cores, merge_cores, num_params,
                           transpose_cores)
from ._trm_chain import ENV_CHAIN_THREADS, FORMS, _plan, _supers, chain_threads, release_scratch
from ._trm_fused import _ChannelsChain, _DenseLinear, _RowsChain, rows_forward
from ._trm_native import ENV_NATIVE_TILE, native_status, native_threads

__all__ = ["ENV_CHAIN_THREADS", "ENV_NATIVE_TILE", "FORMS", "apply", "apply_channels", "best_split", "chain_threads",
           "dense", "dense_with_strength", "identity_cores", "linear", "merge_cores", "native_status",
           "native_threads", "num_params", "release_scratch", "transpose_cores", "weight_diff", "weight_times_t"]


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown transform form {form!r}; expected one of {FORMS}")


class _NoAutocast:
    """Run the factored engine as autocast would run its GEMMs: inputs cast to the autocast
    dtype up front, then autocast off (its out= GEMMs must see one dtype)."""

    def __init__(self, x: Tensor):
        kind = x.device.type
        enabled = torch.is_autocast_enabled(kind) if kind in ("cpu", "cuda", "xpu", "mps") else False
        self.dtype = torch.get_autocast_dtype(kind) if enabled and x.is_floating_point() else x.dtype
        self.ctx = torch.autocast(kind, enabled=False) if enabled else None

    def cast(self, t: Tensor | None) -> Tensor | None:
        return t if t is None or t.dtype == self.dtype else t.to(self.dtype)

    def __enter__(self) -> "_NoAutocast":
        if self.ctx is not None:
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def apply(x: Tensor, cores: Sequence[Tensor], form: str = "factored", strength: float = 1.0) -> Tensor:
    """x + sigma (T x - x) (T x at sigma = 1) for rows x of shape (..., I) in the named form."""
    _check_form(form)
    lead, width = x.shape[:-1], x.shape[-1]
    if len(cores) == 1 or form == "dense":
        return x @ dense_with_strength(cores, strength).transpose(0, 1)
    with _NoAutocast(x) as amp:
        chain, supers = _supers([amp.cast(c) for c in cores], form)
        rows = amp.cast(x).reshape(-1, width)
        out = _RowsChain.apply(rows, None, None, None, chain, (len(supers), float(strength), None, 0, 1.0), *supers)
    return out.reshape(*lead, width)


def apply_channels(x: Tensor, cores: Sequence[Tensor], form: str = "factored", strength: float = 1.0) -> Tensor:
    """x + sigma (T x - x) on the channel axis (dim 1) of x (B, I, *spatial), e.g. a conv input."""
    _check_form(form)
    if len(cores) == 1 or form == "dense":
        t = dense_with_strength(cores, strength)
        return torch.einsum("ij,bj...->bi...", t, x)
    with _NoAutocast(x) as amp:
        chain, ops = _plan([amp.cast(c) for c in cores], form, strength)
        flat = amp.cast(x).reshape(x.shape[0], x.shape[1], -1)
        out = _ChannelsChain.apply(flat, 1.0 - strength, chain, *ops)
    return out.reshape(x.shape)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cores: Sequence[Tensor], form: str = "factored",
           strength: float = 1.0, up: Tensor | None = None, down: Tensor | None = None,
           residual: tuple | None = None) -> Tensor:
    """W0 (x + sigma (T x - x)) + bias + residual for rows x (..., I): the adapted linear.

    Residual: either `up` (O, k) and `down` (I, k) already scaled (sigma s Delta = up down^T),
    or `residual` = ("lora", up, down, s) or ("tr", out_cores, in_cores, s), which adds
    sigma s U V^T x (U, V = up, down, or the TR's factor matrices; s a float, a 0-d tensor
    or None for 1). The factored forms run the frozen GEMM, T and the residual (including
    building U, V from TR cores) inside one autograd node.
    """
    _check_form(form)
    lead, width = x.shape[:-1], x.shape[-1]
    kind, res, scale, mult, n_out = None, (), None, 1.0, 0
    if residual is not None:
        kind, first, second, scale = residual
        mult = float(strength)
        res = (*first, *second) if kind == "tr" else (first, second)
        n_out = len(first) if kind == "tr" else 0
    elif up is not None:
        kind, res = "lora", (up, down)
    if len(cores) == 1 or form == "dense":
        with _NoAutocast(x) as amp:
            t = amp.cast(dense_with_strength(cores, strength))  # built as autocast would: full precision, then cast
            rows = amp.cast(x).reshape(-1, width)
            if isinstance(scale, (int, float)):
                mult, scale = mult * float(scale), None
            out = _DenseLinear.apply(rows, amp.cast(weight), amp.cast(bias), t, scale, (kind, n_out, mult),
                                     *[amp.cast(r) for r in res])
        return out.reshape(*lead, weight.shape[0])
    with _NoAutocast(x) as amp:
        chain, supers = _supers([amp.cast(c) for c in cores], form)
        rows = amp.cast(x).reshape(-1, width)
        if isinstance(scale, (int, float)):
            mult, scale = mult * float(scale), None
        spec = (len(supers), float(strength), kind, n_out, mult)
        out = _RowsChain.apply(rows, amp.cast(weight), amp.cast(bias), scale, chain, spec, *supers,
                               *[amp.cast(t) for t in res])
    return out.reshape(*lead, weight.shape[0])


def weight_times_t(weight_rows: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """W0 @ T in factored form, for W0 given as rows (O, I): (W0 T) = (T^T W0^T)^T."""
    return apply(weight_rows, transpose_cores(cores), form="factored")


def weight_diff(weight_rows: Tensor, cores: Sequence[Tensor], strength: float = 1.0) -> Tensor:
    """sigma (W0 T - W0) for W0 as rows (O, I), in the rows' dtype, no autograd (merging).

    One pass of the factored chain over the O rows (tokens), about O I (n_1 R^2 + sum_middle
    n_d R^3 + n_D R^2) multiply-adds (the compiled kernel on CPU float32), with sigma folded
    into the last stage and -sigma W0 added as the chain writes its output: no dense T, no
    I x I GEMM, no weight-sized temporary beyond the result.
    """
    with torch.no_grad():
        rows = weight_rows.detach()
        cores = [c.detach().to(device=rows.device, dtype=rows.dtype) for c in cores]
        if len(cores) == 1:  # one core: T is that core's ring trace, a small dense matrix
            return (rows @ dense(cores) - rows).mul_(strength)
        cores_t = transpose_cores(cores)
        chain, supers = _supers(cores_t, "factored")
        return rows_forward(chain, chain.operands_detached(supers, strength), rows, -float(strength))
