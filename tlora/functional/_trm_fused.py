"""The fused autograd nodes of the adapted layer: factored rows (`_RowsChain`), dense
(`_DenseLinear`) and channel-major (`_ChannelsChain`); the first two run the low-rank
residual's forward and hand-written backward (`lowrank`) inside them."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .. import native
from .lowrank import residual_backward, residual_forward
from ._trm_chain import _blocks, _Chain, _scratch, _Threads
from ._trm_native import _native_for, _native_tile, _transposed_ops, native_threads


def _unpacked_backward(body: Callable[..., tuple]) -> Callable[..., tuple]:
    """A fused node's backward(ctx, gy) running body(ctx, saved, gy) with autocast off, gy in x's dtype.

    The saved tensors are unpacked once: under torch.utils.checkpoint they may be unpacked only once.
    """
    @functools.wraps(body)
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        with torch.autocast(saved[0].device.type, enabled=False):
            return body(ctx, saved, gy.to(saved[0].dtype))
    return backward


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
            for start, stop, tb in _torch_blocks(chain, ops, x, keep, chain.block_size(n_tok, x.device)):
                if weight is None:
                    out[start:stop].copy_(tb.t())
                elif bias is not None:
                    torch.addmm(bias, tb.t(), weight.t(), out=out[start:stop])
                else:
                    torch.mm(tb.t(), weight.t(), out=out[start:stop])
        hidden = residual_forward(x, out, kind, res, n_out, mult, res_scale)
        # x is kept once for the chain and the residual; the stage matrices and U, V are rebuilt from
        # the raw tensors in the backward, and so is T x where W0 itself needs a gradient.
        ctx.save_for_backward(x, weight, hidden, res_scale, *tensors)
        ctx.chain, ctx.spec, ctx.has_bias = chain, spec, bias is not None
        return out

    @staticmethod
    @_unpacked_backward
    def backward(ctx, saved, gy):
        x, weight, hidden, res_scale, *tensors = saved
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
        gw = torch.zeros_like(weight) if need_w else None
        lib = _native_for(chain, x) if (need_x or need_ops or need_w) else None
        gx = None
        if lib is not None:
            x = x.contiguous()
            tile = _native_tile(chain)
            if need_x or need_ops:
                h = gy if weight is None else gy @ weight
                # The kernel reads each tile of h before it writes that tile of gx, so gx can be h's own
                # buffer when h is ours (one fresh N x I buffer fewer: its pages cost more than it seems).
                gx = (h if weight is not None else x.new_empty(x.shape)) if need_x else None
                native.chain_backward(lib, chain.sizes, chain.rank, ops, _transposed_ops(ops), x, h, gx,
                                      grads if need_ops else None, n_tok, width, 1, keep, tile, native_threads())
                del h
            if need_w:
                u = torch.empty_like(x)
                native.chain_forward(lib, chain.sizes, chain.rank, ops, x, u, n_tok, width, 1, keep, tile,
                                     native_threads())
                gw.addmm_(gy.t(), u)
        elif need_x or need_ops or need_w:
            gx = x.new_empty(x.shape) if need_x else None
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
        res_grads = residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, hidden, any(need[6 + n_cores:]))
        return (gx, gw, g_bias, None, None, None, *core_grads, *res_grads)


# Largest chain intermediate (R^2 x width x block floats) of one merge block on an accelerator.
MERGE_BLOCK_ELEMENTS = 1 << 26


def rows_forward(chain: _Chain, ops: Sequence[torch.Tensor], x: torch.Tensor, keep: float) -> torch.Tensor:
    """T x + keep x for rows x (N, I), no autograd: the compiled chain on CPU float32, else the
    torch engine in blocks (cache-sized on CPU, at most MERGE_BLOCK_ELEMENTS on accelerators)."""
    n_tok, width = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    lib = _native_for(chain, x)
    if lib is not None:
        native.chain_forward(lib, chain.sizes, chain.rank, ops, x, out, n_tok, width, 1, keep, _native_tile(chain),
                             native_threads())
        return out
    block = chain.block_size(n_tok, x.device)
    if x.device.type != "cpu":
        block = max(1, min(block, MERGE_BLOCK_ELEMENTS // (chain.rank * chain.rank * width)))
    for start, stop, tb in _torch_blocks(chain, ops, x, keep, block):
        out[start:stop].copy_(tb.t())
    return out


def _torch_blocks(chain: _Chain, ops: Sequence[torch.Tensor], x: torch.Tensor, keep: float, block: int):
    """(start, stop, T x_b + keep x_b in token-inner layout (I, length)) per token block, on the torch engine.

    The yielded block is a scratch buffer: use it before asking for the next one.
    """
    width = x.shape[1]
    for start, stop in _blocks(x.shape[0], block):
        length = stop - start
        with _Threads(x.device):
            xb = _scratch.get("xb", (width, length), x)
            xb.copy_(x[start:stop].t())
            tb = chain.forward_block(xb, ops, _scratch.get("tb", (width, length), x))
            if keep:
                tb.add_(xb, alpha=keep)
        yield start, stop, tb


class _DenseLinear(torch.autograd.Function):
    """The dense form fused like `_RowsChain`: y = W0 (t x) + bias + f U (V^T x), t = (1-s) I + s T
    given as a matrix (built from the cores outside, with autograd); hand-written backward:
    h = gy W0, gx = h t (+ residual), gt = h^T x."""

    @staticmethod
    def forward(ctx, x, weight, bias, t, res_scale, spec, *res):  # noqa: D401
        kind, n_out, mult = spec
        u = x @ t.t()
        out = torch.addmm(bias, u, weight.t()) if bias is not None else u @ weight.t()
        hidden = residual_forward(x, out, kind, res, n_out, mult, res_scale)
        ctx.save_for_backward(x, weight, t, hidden, res_scale, *res)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return out

    @staticmethod
    @_unpacked_backward
    def backward(ctx, saved, gy):
        x, weight, t, hidden, res_scale, *res = saved
        kind, n_out, mult = ctx.spec
        need = ctx.needs_input_grad
        gy = gy.contiguous()
        h = gy @ weight if (need[0] or need[3]) else None
        gx = h @ t if need[0] else None
        gw = gy.t() @ (x @ t.t()) if need[1] else None
        g_bias = gy.sum(0) if ctx.has_bias and need[2] else None
        gt = h.t() @ x if need[3] else None
        res_grads = residual_backward(x, gy, gx, kind, res, n_out, mult, res_scale, hidden, any(need[6:]))
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
