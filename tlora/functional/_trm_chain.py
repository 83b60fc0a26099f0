"""The factored engine: the token-inner chain of small GEMMs (`_Chain`), its per-thread
scratch buffers and thread limit, and the (super-)core plan of each factored form."""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import native
from ._trm_algebra import best_split, merge_cores

FORMS = ("factored", "merged", "dense")
# Token-block size of the factored engine on CPU: a block's largest intermediate
# (R^2 * I * block floats) stays cache-sized, and no buffer crosses the allocator's mmap
# threshold (fresh mmap'd pages cost more than the arithmetic here).
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK = 128
ENV_CHAIN_THREADS = "TLORA_CHAIN_THREADS"


class _Scratch(threading.local):
    """Per-thread reusable CPU work buffers for the per-block temporaries.

    PyTorch's CPU allocator does not cache: every fresh MB-sized buffer is new pages from
    the OS (page faults, zeroing), which cost more than the small GEMMs writing them.
    Only scratch lives here (never a saved or returned tensor); accelerators use their
    caching allocator instead.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}

    def get(self, slot: str, shape: Sequence[int], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        if like.device.type != "cpu":
            return like.new_empty(shape)
        # Inference tensors (ComfyUI patches under inference_mode) cannot be written outside
        # it, and normal tensors cannot be reused inside it without tracking: one set each.
        key = (slot, like.dtype, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = like.new_empty(max(numel, 1))
            self.buffers[key] = buf
        return buf[:numel].view(*shape)


_scratch = _Scratch()


def chain_threads() -> int:
    """CPU threads for the chain's small GEMMs (TLORA_CHAIN_THREADS, default 1; 0 = torch's own).

    Measured on a 2-core host: the chain's GEMMs (K of 8..64) run no faster on two threads
    than on one, and far slower when another process holds a core (every small parallel
    region then waits at its barrier), while the frozen GEMM keeps all threads.
    """
    return max(0, _env_int(ENV_CHAIN_THREADS, 1))


def _env_int(name: str, default: int) -> int:
    """An integer environment setting; unset, empty or malformed gives the default."""
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


class _Threads:
    """Context: at most `n` intra-op threads on CPU (restored on exit); no-op elsewhere."""

    def __init__(self, device: torch.device):
        self.n = chain_threads() if device.type == "cpu" else 0
        self.saved = 0

    def __enter__(self) -> "_Threads":
        current = torch.get_num_threads()
        if self.n and current > self.n:
            self.saved = current
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        if self.saved:
            torch.set_num_threads(self.saved)


def release_scratch() -> None:
    """Free this thread's CPU work buffers, torch's and the compiled chain's (reallocated on next use)."""
    _scratch.buffers.clear()
    native.release()


class _Chain:
    """Stage plan of the token-inner chain over (super-)cores of sizes `sizes`, ring rank R.

    A block X (I, L) holds tokens in its last (fastest) axis, so every stage is one GEMM or
    one batched GEMM whose large dimension is the token block, and each stage's output is
    already laid out for the next (no permutes). D = 2: rows of Z1 are (i1, r0, r1) and the
    last stage contracts (r0, r1, j2) in one batched GEMM. D >= 3: rows of Z1 are
    (r0, i1, r1); a middle stage contracts (r_{d-1}, j_d) and writes (i_d, r_d); the last
    closes the ring over r0 with R accumulating batched GEMMs.
    """

    def __init__(self, sizes: Sequence[int], rank: int):
        self.sizes = tuple(int(s) for s in sizes)
        self.rank = int(rank)
        self.width = math.prod(self.sizes)

    def _layout(self, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(core permutation, operand shape) of stage d's matrix."""
        r, n, d_last = self.rank, self.sizes[d], len(self.sizes) - 1
        if d == 0:
            return ((0, 2, 3, 1) if d_last == 1 else (2, 0, 3, 1)), (n * r * r, n)
        if d < d_last:
            return (0, 3, 2, 1), (n * r, r * n)
        if d_last == 1:
            return (0, 3, 2, 1), (n, r * r * n)
        return (3, 0, 2, 1), (r, n, r * n)

    def operands(self, cores: Sequence[Tensor]) -> list[Tensor]:
        """Stage matrices from the (super-)cores (differentiable views/permutes)."""
        ops = []
        for d, a in enumerate(cores):
            perm, shape = self._layout(d)
            ops.append(a.permute(*perm).reshape(shape))
        return [op.contiguous() for op in ops]

    def operands_detached(self, cores: Sequence[Tensor], strength: float) -> list[Tensor]:
        """`operands` without autograd (for the fused node), strength folded into the last."""
        ops = []
        for d, a in enumerate(cores):
            perm, shape = self._layout(d)
            ops.append(a.detach().permute(*perm).reshape(shape).contiguous())
        if strength != 1:
            ops[-1] = ops[-1] * strength  # never in place: contiguous() may alias the core
        return ops

    def core_grads(self, op_grads: Sequence[Tensor], cores: Sequence[Tensor], strength: float) -> list[Tensor]:
        """Gradients of the (super-)cores from those of `operands_detached`'s matrices."""
        out = []
        for d, (g, a) in enumerate(zip(op_grads, cores)):
            perm, _ = self._layout(d)
            inverse = sorted(range(4), key=perm.__getitem__)
            out.append(g.view([a.shape[p] for p in perm]).permute(*inverse))
        if strength != 1:
            out[-1] = out[-1] * strength
        return out

    def block_size(self, tokens: int, device: torch.device) -> int:
        """Tokens per block: everything at once on accelerators, cache-sized on CPU."""
        if device.type != "cpu":
            return max(tokens, 1)
        block = BLOCK_ELEMENTS // (self.rank * self.rank * self.width)
        return max(MIN_BLOCK, min(tokens, block // 16 * 16))

    def _intermediates(self, x: Tensor, ops: Sequence[Tensor]) -> list[Tensor]:
        """Z_1 .. Z_{D-1} for a block x (I, L), in scratch buffers."""
        r, sizes = self.rank, self.sizes
        rest = x.numel() // sizes[0]
        z = torch.mm(ops[0], x.view(sizes[0], rest), out=_scratch.get("z0", (ops[0].shape[0], rest), x))
        zs = [z]
        lead = r * sizes[0]
        for d in range(1, len(sizes) - 1):
            n = sizes[d]
            zin = z.view(lead, r * n, -1)
            z = torch.bmm(ops[d].expand(lead, n * r, r * n), zin,
                          out=_scratch.get(f"z{d}", (lead, n * r, zin.shape[2]), x))
            lead *= n
            zs.append(z)
        return zs

    def forward_block(self, x: Tensor, ops: Sequence[Tensor], out: Tensor) -> Tensor:
        """T x for one block x (I, L) (contiguous), written into `out` (I, L) (contiguous)."""
        r, sizes = self.rank, self.sizes
        length = x.shape[1]
        z = self._intermediates(x, ops)[-1]
        last, n = ops[-1], sizes[-1]
        batch = self.width // n
        res = out.view(batch, n, length)
        if len(sizes) == 2:
            torch.bmm(last.expand(batch, n, r * r * n), z.view(batch, r * r * n, length), out=res)
            return out
        zv = z.view(r, batch, r * n, length)
        torch.bmm(last[0].expand(batch, n, r * n), zv[0], out=res)
        for k in range(1, r):
            res.baddbmm_(last[k].expand(batch, n, r * n), zv[k])
        return out

    def _reduce_into(self, grad: Tensor, a: Tensor, b: Tensor) -> None:
        """grad += sum_batch a[i] @ b[i]^T (a: (B, m, L), b: (B, k, L))."""
        prod = torch.bmm(a, b.transpose(1, 2), out=_scratch.get("red", (a.shape[0], a.shape[1], b.shape[1]), a))
        grad += prod.sum(0)

    def backward_block(self, g: Tensor, x: Tensor, ops: Sequence[Tensor], grads: list[Tensor],
                       out: Tensor) -> Tensor:
        """T^T g for one block, written into `out` (I, L); operand gradients added to grads."""
        r, sizes = self.rank, self.sizes
        length = g.shape[1]
        zs = self._intermediates(x, ops)  # recomputed: cheaper than keeping R^2 I tokens per stage
        last, n = ops[-1], sizes[-1]
        batch = self.width // n
        gv = g.view(batch, n, length)
        if len(sizes) == 2:
            zv = zs[0].view(batch, r * r * n, length)
            self._reduce_into(grads[1], gv, zv)
            gz = torch.bmm(last.t().expand(batch, r * r * n, n), gv,
                           out=_scratch.get("g0", (batch, r * r * n, length), g))
        else:
            zv = zs[-1].view(r, batch, r * n, length)
            gz = _scratch.get("g0", (r, batch, r * n, length), g)
            for k in range(r):
                torch.bmm(last[k].t().expand(batch, r * n, n), gv, out=gz[k])
                self._reduce_into(grads[-1][k], gv, zv[k])
            lead = r * math.prod(sizes[:-1])
            for d in range(len(sizes) - 2, 0, -1):
                m = sizes[d]
                lead //= m
                zin = zs[d - 1].view(lead, r * m, -1)
                gzd = gz.view(lead, m * r, -1)
                self._reduce_into(grads[d], gzd, zin)
                gz = torch.bmm(ops[d].t().expand(lead, r * m, m * r), gzd,
                               out=_scratch.get("g1" if d % 2 else "g2", (lead, r * m, gzd.shape[2]), g))
        gz1 = gz.reshape(ops[0].shape[0], -1)
        xv = x.view(sizes[0], -1)
        grads[0].addmm_(gz1, xv.t())
        torch.mm(ops[0].t(), gz1, out=out.view(sizes[0], -1))
        return out


def _blocks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _groups(factors: Sequence[int], form: str) -> list[tuple[int, int]]:
    """Consecutive core ranges that become one (super-)core in the given factored form."""
    d = len(factors)
    if form == "factored" or d <= 2:
        return [(k, k + 1) for k in range(d)]
    if form == "merged":
        split = best_split(factors)
        return [(0, split), (split, d)]
    raise ValueError(f"unknown transform form {form!r}; expected one of {FORMS}")


_CHAINS: dict[tuple, _Chain] = {}


def _chain(sizes: tuple[int, ...], rank: int) -> _Chain:
    """The (cached, immutable) stage plan for these super-core sizes and rank."""
    key = (sizes, rank)
    chain = _CHAINS.get(key)
    if chain is None:
        chain = _CHAINS[key] = _Chain(sizes, rank)
    return chain


def _supers(cores: Sequence[Tensor], form: str) -> tuple[_Chain, list[Tensor]]:
    """The chain for a form and its (super-)cores (merged ones built with autograd)."""
    factors = [int(c.shape[0]) for c in cores]
    groups = _groups(factors, form)
    if len(groups) == len(cores):
        supers = list(cores)
    else:
        supers = [cores[a] if b - a == 1 else merge_cores(cores[a:b]) for a, b in groups]
    return _chain(tuple(math.prod(factors[a:b]) for a, b in groups), int(cores[0].shape[2])), supers


def _plan(cores: Sequence[Tensor], form: str, strength: float) -> tuple[_Chain, list[Tensor]]:
    """The chain for a form and its operands (strength folded into the last one; autograd)."""
    chain, supers = _supers(cores, form)
    ops = chain.operands(supers)
    if strength != 1:
        ops[-1] = ops[-1] * strength
    return chain, ops
