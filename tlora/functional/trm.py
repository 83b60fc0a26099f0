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
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import native
from . import tr

FORMS = ("factored", "merged", "dense")
# Token-block size of the factored engine on CPU: a block's largest intermediate
# (R^2 * I * block floats) stays cache-sized, and no buffer crosses the allocator's mmap
# threshold (fresh mmap'd pages cost more than the arithmetic here).
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK = 128
ENV_CHAIN_THREADS = "TLORA_CHAIN_THREADS"
ENV_NATIVE_TILE = "TLORA_NATIVE_TILE"


def identity_cores(factors: Sequence[int], rank: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> list[Tensor]:
    """Cores with every A_d[:, :, r, r'] = eye(n_d) / R, so that T is the identity."""
    cores = []
    for n in factors:
        eye = torch.eye(n, dtype=dtype, device=device) / rank
        cores.append(eye[:, :, None, None].expand(n, n, rank, rank).contiguous())
    return cores


def merge_cores(cores: Sequence[Tensor]) -> Tensor:
    """Contract consecutive cores over their shared ring index into one core.

    (n_1, n_1, R, R), (n_2, n_2, R, R) -> (n_1 n_2, n_1 n_2, R, R), row-major in each axis.
    """
    merged = cores[0]
    for core in cores[1:]:
        p, q, r = merged.shape[0], core.shape[0], merged.shape[2]
        merged = torch.einsum("ijab,klbc->ikjlac", merged, core).reshape(p * q, p * q, r, core.shape[3])
    return merged


def best_split(factors: Sequence[int]) -> int:
    """Index k that splits the cores into prefix/suffix super-cores of sizes P, Q
    minimising P + Q (the cost of the two-product form is proportional to it)."""
    best_k, best_cost = 1, float("inf")
    for k in range(1, len(factors)):
        p, q = math.prod(factors[:k]), math.prod(factors[k:])
        if p + q < best_cost:
            best_k, best_cost = k, p + q
    return best_k


def dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense I x I matrix T (reference and dense-T form); differentiable.

    Built as one GEMM over the ring pair of a prefix/suffix split, so no (I, I, R, R)
    tensor is ever formed: T[(p q), (p' q')] = sum_ab P[p, p', a, b] Q[q, q', b, a].
    """
    if len(cores) == 1:
        return torch.diagonal(cores[0], dim1=2, dim2=3).sum(-1)
    split = best_split([c.shape[0] for c in cores])
    prefix, suffix = merge_cores(cores[:split]), merge_cores(cores[split:])
    p, q, r = prefix.shape[0], suffix.shape[0], prefix.shape[2]
    t4 = prefix.reshape(p * p, r * r) @ suffix.permute(3, 2, 0, 1).reshape(r * r, q * q)
    return t4.reshape(p, p, q, q).permute(0, 2, 1, 3).reshape(p * q, p * q)


def two_stage_operands(cores: Sequence[Tensor], split: int | None = None) -> tuple[Tensor, Tensor]:
    """Matrices (M_p, M_q) of the factored form T x = M_p . (x M_q), one GEMM each.

    T = sum_{a,b} P_ab (x) Q_ba with P, Q the merged prefix/suffix super-cores.
    M_q: (Q, R*R*Q) laid out [q', (a, b, q)]; M_p: (P, P*R*R) laid out [p, (p', a, b)].
    """
    if split is None:
        split = best_split([c.shape[0] for c in cores])
    prefix = merge_cores(cores[:split])  # (P, P, a, b)
    suffix = merge_cores(cores[split:])  # (Q, Q, b, a)
    p, q, r = prefix.shape[0], suffix.shape[0], prefix.shape[2]
    m_q = suffix.permute(1, 3, 2, 0).reshape(q, r * r * q)  # [q', a, b, q]
    m_p = prefix.reshape(p, p * r * r)  # [p, p', a, b]
    return m_p, m_q


def apply_two_stage(x: Tensor, m_p: Tensor, m_q: Tensor) -> Tensor:
    """T x for rows x (..., P*Q), given two_stage_operands (plain autograd; kept for reference)."""
    p, q = m_p.shape[0], m_q.shape[0]
    rr = m_q.shape[1] // q
    lead = x.shape[:-1]
    rows = x.reshape(-1, p, q)
    n = rows.shape[0]
    y = (rows.reshape(n * p, q) @ m_q).reshape(n, p * rr, q)
    out = torch.matmul(m_p, y)
    return out.reshape(*lead, p * q)


# ----- the factored engine ----------------------------------------------------------------
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


# ----- compiled chain (tlora.native) ---------------------------------------------------------
_native_self_check: dict[str, bool] = {}


def _native_tile(chain: "_Chain") -> int:
    """Tokens per tile of the compiled chain: 16, or 8 where 16 tokens' intermediates (R^2 I
    floats each) would pass 512 KiB. Measured (1 thread, SD1.5 widths, R = 2, 8..64 tokens):
    16-24 fastest everywhere, 64 up to 30% slower."""
    forced = _env_int(ENV_NATIVE_TILE, 0)
    if forced > 0:
        return max(8, forced // 8 * 8)
    return 16 if chain.rank * chain.rank * chain.width * 16 <= (1 << 17) else 8


def native_threads() -> int:
    """Threads of the compiled chain: TLORA_CHAIN_THREADS when set (0 = torch's), else torch's.

    Unlike the torch engine's small GEMMs, the compiled chain splits whole token ranges over
    threads (one join per call, no barrier per contraction), so it uses torch's thread count.
    """
    forced = _env_int(ENV_CHAIN_THREADS, 0)
    return forced if forced > 0 else max(1, torch.get_num_threads())


def _transposed_ops(ops: Sequence[Tensor]) -> list[Tensor]:
    """Each stage matrix transposed (the last, (R, n, R n), per ring slice), contiguous."""
    return [op.t().contiguous() for op in ops[:-1]] + [ops[-1].transpose(1, 2).contiguous()]


def _native_for(chain: "_Chain", x: Tensor):
    """The compiled kernels when they apply here (CPU float32, >= 3 cores) and pass their self-check."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 3 <= len(chain.sizes) <= native.MAX_CORES:
        return None
    lib = native.load()
    if lib is None:
        return None
    if not _native_self_check:
        _native_self_check["ok"] = _run_native_self_check(lib)
    return lib if _native_self_check["ok"] else None


def _run_native_self_check(lib) -> bool:
    """Compare the compiled chain with the torch engine on a small random case (once per process)."""
    gen = torch.Generator().manual_seed(1234)
    chain = _Chain((2, 3, 2), 2)
    cores = [torch.randn(n, n, 2, 2, generator=gen) for n in chain.sizes]
    ops = chain.operands_detached(cores, 0.7)
    x, h = (torch.randn(11, chain.width, generator=gen) for _ in range(2))
    want_y = chain.forward_block(x.t().contiguous(), ops, torch.empty(chain.width, 11)).t() + 0.3 * x
    want_grads = [torch.zeros_like(op) for op in ops]
    want_gx = chain.backward_block(h.t().contiguous(), x.t().contiguous(), ops, want_grads,
                                   torch.empty(chain.width, 11)).t() + 0.3 * h
    try:
        y, gx = torch.empty_like(x), torch.empty_like(x)
        grads = [torch.zeros_like(op) for op in ops]
        native.chain_forward(lib, chain.sizes, 2, ops, x, y, 11, chain.width, 1, 0.3, 8, 2)
        native.chain_backward(lib, chain.sizes, 2, ops, _transposed_ops(ops), x, h, gx, grads, 11,
                              chain.width, 1, 0.3, 8, 2)
        ok = (torch.allclose(y, want_y, rtol=1e-4, atol=1e-4) and torch.allclose(gx, want_gx, rtol=1e-4, atol=1e-4)
              and all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(grads, want_grads)))
    except (RuntimeError, ValueError) as exc:
        native.mark_unusable(f"self-check failed: {exc}")
        return False
    if not ok:
        native.mark_unusable("self-check failed: results differ from the torch engine")
    return ok


def native_status() -> dict:
    """Whether the compiled chain is in use here (built, loaded and self-checked), and why not."""
    usable = _native_for(_Chain((2, 3, 2), 2), torch.empty(0)) is not None
    return {"in_use": usable, "status": native.status(), "threads": native_threads() if usable else 0}


def reset_native() -> None:
    """Forget the compiled kernels' self-check (tests; after changing TLORA_NATIVE)."""
    _native_self_check.clear()


def _blocks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


class _RowsChain(torch.autograd.Function):
    """Factored T on rows x (N, I), fused with the frozen linear and a low-rank residual:

    y = W0 (keep x + T x) + bias + f up (down^T x)   (W0 given), or keep x + T x (W0 None).

    One autograd node for the whole adapted layer: it takes the raw (super-)cores and the
    residual's raw tensors (a TR's core lists, or LoRA up/down), builds the stage matrices
    and the residual's factors itself without autograd, and maps their gradients back by
    hand (permutes; the TR chain's few small GEMMs), so a step costs a handful of ops
    beyond the GEMMs (the per-module fixed cost matters for small layers and token counts).
    Per token block: one transpose of x into token-inner layout, the chain, and W0's GEMM
    reading the block transposed (BLAS handles that for free); the backward forms
    (gy W0)^T per block directly as W0^T gy^T, again without a transpose copy.

    spec = (number of transform cores, strength, residual kind None/"lora"/"tr", number of
    TR output cores, residual multiplier); f = multiplier * res_scale (res_scale a 0-d
    tensor or None); for "lora" the residual tensors are up (O, k), down (I, k).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, res_scale, chain, spec, *tensors):  # noqa: D401
        n_cores, strength, kind, n_out, mult = spec
        cores, res = tensors[:n_cores], tensors[n_cores:]
        ops = chain.operands_detached(cores, strength)
        keep = 1.0 - strength
        n_tok, width = x.shape
        out = x.new_empty(n_tok, weight.shape[0] if weight is not None else width)
        lib = _native_for(chain, x)
        if lib is not None:
            x = x.contiguous()
            u = out if weight is None else torch.empty_like(x)
            native.chain_forward(lib, chain.sizes, chain.rank, ops, x, u, n_tok, width, 1, keep, _native_tile(chain),
                                 native_threads())
            if weight is not None:
                if bias is not None:
                    torch.addmm(bias, u, weight.t(), out=out)
                else:
                    torch.mm(u, weight.t(), out=out)
        else:
            for start, stop in _blocks(n_tok, chain.block_size(n_tok, x.device)):
                length = stop - start
                with _Threads(x.device):
                    xb = _scratch.get("xb", (width, length), x)
                    xb.copy_(x[start:stop].t())
                    tb = chain.forward_block(xb, ops, _scratch.get("tb", (width, length), x))
                    if keep:
                        tb.add_(xb, alpha=keep)
                if weight is None:
                    out[start:stop].copy_(tb.t())
                elif bias is not None:
                    torch.addmm(bias, tb.t(), weight.t(), out=out[start:stop])
                else:
                    torch.mm(tb.t(), weight.t(), out=out[start:stop])
        up_s, down, hidden = _residual_forward(x, out, kind, res, n_out, mult, res_scale)
        ctx.save_for_backward(x, weight, up_s, down, hidden, res_scale, *tensors)
        ctx.chain, ctx.spec, ctx.has_bias = chain, spec, bias is not None
        return out

    @staticmethod
    def backward(ctx, gy):
        # Unpack once: under torch.utils.checkpoint saved tensors may be unpacked only once.
        saved = ctx.saved_tensors
        with torch.autocast(saved[0].device.type, enabled=False):
            return _RowsChain._backward(ctx, saved, gy.to(saved[0].dtype))

    @staticmethod
    def _backward(ctx, saved, gy):
        x, weight, up_s, down, hidden, res_scale, *tensors = saved
        chain, (n_cores, strength, kind, n_out, mult) = ctx.chain, ctx.spec
        cores, res = tensors[:n_cores], tensors[n_cores:]
        ops = chain.operands_detached(cores, strength)
        keep = 1.0 - strength
        gy = gy.contiguous()
        n_tok, width = x.shape
        need = ctx.needs_input_grad
        need_x, need_w = need[0], need[1]
        need_ops = any(need[6:6 + n_cores])
        grads = [torch.zeros_like(op) for op in ops]
        gx = x.new_empty(x.shape) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        lib = _native_for(chain, x) if (need_x or need_ops or need_w) else None
        if lib is not None:
            x = x.contiguous()
            tile = _native_tile(chain)
            if need_x or need_ops:
                h = gy if weight is None else gy @ weight
                native.chain_backward(lib, chain.sizes, chain.rank, ops, _transposed_ops(ops), x, h, gx,
                                      grads if need_ops else None, n_tok, width, 1, keep, tile, native_threads())
                del h
            if need_w:
                u = torch.empty_like(x)
                native.chain_forward(lib, chain.sizes, chain.rank, ops, x, u, n_tok, width, 1, keep, tile,
                                     native_threads())
                gw.addmm_(gy.t(), u)
        elif need_x or need_ops or need_w:
            for start, stop in _blocks(n_tok, chain.block_size(n_tok, x.device)):
                length = stop - start
                gblk = gy[start:stop]
                gb = _scratch.get("gb", (width, length), x)
                if weight is None:
                    gb.copy_(gblk.t())
                else:
                    torch.mm(weight.t(), gblk.t(), out=gb)
                with _Threads(x.device):
                    xb = _scratch.get("xb", (width, length), x)
                    xb.copy_(x[start:stop].t())
                    if need_x or need_ops:
                        gxb = chain.backward_block(gb, xb, ops, grads, _scratch.get("tb", (width, length), x))
                        if keep:
                            gxb.add_(gb, alpha=keep)
                        if need_x:
                            gx[start:stop].copy_(gxb.t())
                    if need_w:
                        tb = chain.forward_block(xb, ops, _scratch.get("tb", (width, length), x))
                        if keep:
                            tb.add_(xb, alpha=keep)
                if need_w:
                    gw.addmm_(gblk.t(), tb.t())
        core_grads = chain.core_grads(grads, cores, strength) if need_ops else [None] * n_cores
        g_bias = gy.sum(0) if ctx.has_bias and need[2] else None
        res_grads = _residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, up_s, down, hidden,
                                       any(need[6 + n_cores:]))
        return (gx, gw, g_bias, None, None, None, *core_grads, *res_grads)


def _residual_forward(x, out, kind, res, n_out, mult, res_scale):
    """out += f U (V^T x) for the fused nodes; returns (f U, V, V^T x) for the backward."""
    if kind is None:
        return None, None, None
    if kind == "tr":
        up, down = tr.factor_matrices_detached(res[:n_out], res[n_out:])
    else:
        up, down = res[0].detach(), res[1].detach()
    factor = mult if res_scale is None else res_scale.to(x.dtype) * mult
    up_s = up if isinstance(factor, float) and factor == 1 else up * factor
    hidden = x @ down
    out.addmm_(hidden, up_s.t())
    return up_s, down, hidden


def _residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, up_s, down, hidden, need_res):
    """gx += its residual part (when gx is given); gradients of the residual's raw tensors."""
    if kind is None:
        return []
    if gx is None and not need_res:
        return [None] * len(res)
    g_hidden = gy @ up_s
    if gx is not None:
        gx.addmm_(g_hidden, down.t())
    if not need_res:
        return [None] * len(res)
    factor = mult if res_scale is None else res_scale.to(x.dtype) * mult
    g_up = gy.t() @ hidden
    if not (isinstance(factor, float) and factor == 1):
        g_up = g_up * factor
    g_down = x.t() @ g_hidden
    if kind == "tr":
        return tr.factor_matrices_backward(res[:n_out], res[n_out:], g_up, g_down)
    return [g_up, g_down]


class _DenseLinear(torch.autograd.Function):
    """The dense form fused like `_RowsChain`: y = W0 (t x) + bias + f U (V^T x), t = (1-s) I + s T
    given as a matrix (built from the cores outside, with autograd); hand-written backward:
    h = gy W0, gx = h t (+ residual), gt = h^T x."""

    @staticmethod
    def forward(ctx, x, weight, bias, t, res_scale, spec, *res):  # noqa: D401
        kind, n_out, mult = spec
        u = x @ t.t()
        out = torch.addmm(bias, u, weight.t()) if bias is not None else u @ weight.t()
        up_s, down, hidden = _residual_forward(x, out, kind, res, n_out, mult, res_scale)
        ctx.save_for_backward(x, weight, t, up_s, down, hidden, res_scale, *res)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return out

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        with torch.autocast(saved[0].device.type, enabled=False):
            return _DenseLinear._backward(ctx, saved, gy.to(saved[0].dtype))

    @staticmethod
    def _backward(ctx, saved, gy):
        x, weight, t, up_s, down, hidden, res_scale, *res = saved
        kind, n_out, mult = ctx.spec
        need = ctx.needs_input_grad
        gy = gy.contiguous()
        h = gy @ weight if (need[0] or need[3]) else None
        gx = h @ t if need[0] else None
        gw = gy.t() @ (x @ t.t()) if need[1] else None
        g_bias = gy.sum(0) if ctx.has_bias and need[2] else None
        gt = h.t() @ x if need[3] else None
        res_grads = _residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, up_s, down, hidden,
                                       any(need[6:]))
        return (gx, gw, g_bias, gt, None, None, *res_grads)


class _ChannelsChain(torch.autograd.Function):
    """Factored keep x + T x on channel-major x (B, I, L) (a conv input): already token-inner."""

    @staticmethod
    def forward(ctx, x, keep, chain, *ops):  # noqa: D401
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        with _Threads(x.device):
            _ChannelsChain._forward(x, out, keep, chain, ops)
        ctx.save_for_backward(x, *ops)
        ctx.keep, ctx.chain = keep, chain
        return out

    @staticmethod
    def _forward(x, out, keep, chain, ops) -> None:
        batch, width, length = x.shape
        lib = _native_for(chain, x)
        if lib is not None:
            x = x.contiguous()
            for b in range(batch):
                native.chain_forward(lib, chain.sizes, chain.rank, list(ops), x[b], out[b], length, 1, length, keep,
                                     _native_tile(chain), native_threads())
            return
        for b in range(batch):
            for start, stop in _blocks(length, chain.block_size(length, x.device)):
                xb = _scratch.get("xb", (width, stop - start), x)
                xb.copy_(x[b, :, start:stop])
                tb = chain.forward_block(xb, ops, _scratch.get("tb", (width, stop - start), x))
                if keep:
                    tb.add_(xb, alpha=keep)
                out[b, :, start:stop] = tb

    @staticmethod
    def backward(ctx, gy):
        x, *ops = ctx.saved_tensors
        chain, keep = ctx.chain, ctx.keep
        grads = [torch.zeros_like(op) for op in ops]
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
        gy = gy.to(x.dtype)
        with _Threads(x.device), torch.autocast(x.device.type, enabled=False):
            _ChannelsChain._backward(x, gy, gx, keep, chain, ops, grads)
        return (gx, None, None, *grads)

    @staticmethod
    def _backward(x, gy, gx, keep, chain, ops, grads) -> None:
        batch, width, length = x.shape
        lib = _native_for(chain, x)
        if lib is not None:
            x, gy, ops_t = x.contiguous(), gy.contiguous(), _transposed_ops(ops)
            for b in range(batch):
                native.chain_backward(lib, chain.sizes, chain.rank, list(ops), ops_t, x[b], gy[b], gx[b], grads,
                                      length, 1, length, keep, _native_tile(chain), native_threads())
            return
        for b in range(batch):
            for start, stop in _blocks(length, chain.block_size(length, x.device)):
                xb = _scratch.get("xb", (width, stop - start), x)
                xb.copy_(x[b, :, start:stop])
                gb = _scratch.get("gb", (width, stop - start), x)
                gb.copy_(gy[b, :, start:stop])
                gxb = chain.backward_block(gb, xb, ops, grads, _scratch.get("tb", (width, stop - start), x))
                if keep:
                    gxb.add_(gb, alpha=keep)
                gx[b, :, start:stop] = gxb


def _groups(factors: Sequence[int], form: str) -> list[tuple[int, int]]:
    """Consecutive core ranges that become one (super-)core in the given factored form."""
    d = len(factors)
    if form == "factored" or d <= 2:
        return [(k, k + 1) for k in range(d)]
    if form == "merged":
        split = best_split(factors)
        return [(0, split), (split, d)]
    raise ValueError(f"unknown transform form {form!r}; expected one of {FORMS}")


_CHAINS: dict[tuple, "_Chain"] = {}


def _chain(sizes: tuple[int, ...], rank: int) -> "_Chain":
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


def dense_with_strength(cores: Sequence[Tensor], strength: float = 1.0) -> Tensor:
    """(1 - sigma) I + sigma T, dense (the dense form's matrix)."""
    t = dense(cores)
    if strength != 1:
        t = strength * t + (1 - strength) * torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return t


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


def transpose_cores(cores: Sequence[Tensor]) -> list[Tensor]:
    """Cores of T^T (swap each core's row and column index)."""
    return [c.transpose(0, 1) for c in cores]


def weight_times_t(weight_rows: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """W0 @ T in factored form, for W0 given as rows (O, I): (W0 T) = (T^T W0^T)^T."""
    return apply(weight_rows, transpose_cores(cores), form="factored")


def num_params(factors: Sequence[int], rank: int) -> int:
    """Parameters of a TRM: sum_d n_d^2 R^2."""
    return sum(n * n * rank * rank for n in factors)
