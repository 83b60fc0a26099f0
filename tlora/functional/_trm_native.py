"""Dispatch to the compiled chain (tlora.native): where it applies, its tile and thread
counts, and the once-per-process self-check against the torch engine."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import native
from ._trm_chain import ENV_CHAIN_THREADS, _Chain, _env_int

ENV_NATIVE_TILE = "TLORA_NATIVE_TILE"
# {"ok": bool} once the self-check has run (it runs at most once per process).
_native_self_check: dict[str, bool] = {}


def _native_tile(chain: _Chain) -> int:
    """Tokens per tile of the compiled chain: 16, or 8 where 16 tokens' intermediates (R^2 I
    floats each) would pass 512 KiB. Measured (1 thread, SD1.5 widths, R = 2, 8..64 tokens):
    16-24 fastest everywhere, 64 up to 30% slower. The kernels round a tile up to their vector
    width (16 on AVX-512 builds, where 16 measured fastest from 320 to 12288 wide, 32 up to 23%
    slower on the wide ones)."""
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


def native_lib(*tensors: Tensor):
    """The compiled kernels when every tensor is a CPU float32 one and the kernels pass their self-check."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    lib = native.load()
    if lib is None:
        return None
    if not _native_self_check:
        _native_self_check["ok"] = _run_native_self_check(lib)
    return lib if _native_self_check["ok"] else None


def _native_for(chain: _Chain, x: Tensor):
    """The compiled chain when it applies here (CPU float32, >= 3 cores) and passes its self-check."""
    if not 3 <= len(chain.sizes) <= native.MAX_CORES:
        return None
    return native_lib(x)


def _run_native_self_check(lib) -> bool:
    """Compare the compiled chain and ring products with the torch engine on small random cases (once per process)."""
    gen = torch.Generator().manual_seed(1234)
    chain = _Chain((2, 3, 2), 2)
    cores = [torch.randn(n, n, 2, 2, generator=gen) for n in chain.sizes]
    ops = chain.operands_detached(cores, 0.7)
    x, h = (torch.randn(11, chain.width, generator=gen) for _ in range(2))
    want_y = chain.forward_block(x.t().contiguous(), ops, torch.empty(chain.width, 11)).t() + 0.3 * x
    want_grads = [torch.zeros_like(op) for op in ops]
    want_gx = chain.backward_block(h.t().contiguous(), x.t().contiguous(), ops, want_grads,
                                   torch.empty(chain.width, 11)).t() + 0.3 * h
    from . import tr  # here: tr dispatches to this module
    ring = [torch.randn(n, 3, 3, generator=gen) for n in (2, 3, 2)]
    ring_g = torch.randn(12, 9, generator=gen)
    # The torch engine's own chain and its hand-written backward (no autograd: this may run inside a
    # caller's checkpointed forward, whose saved-tensor hooks must not see it).
    want_prod = tr._chain_prefixes(ring)[-1].permute(1, 2, 0).reshape(12, 9)  # (s, p, r) -> V[p, (r, s)]
    want_ring = tr._chain_backward(ring, ring_g.view(12, 3, 3).permute(2, 0, 1))
    try:
        y, gx = torch.empty_like(x), torch.empty_like(x)
        grads = [torch.zeros_like(op) for op in ops]
        native.chain_forward(lib, chain.sizes, 2, ops, x, y, 11, chain.width, 1, 0.3, 8, 2)
        native.chain_backward(lib, chain.sizes, 2, ops, _transposed_ops(ops), x, h, gx, grads, 11,
                              chain.width, 1, 0.3, 8, 2)
        got_prod, got_ring = torch.empty(12, 9), [torch.empty_like(c) for c in ring]
        native.ring_product(lib, ring, got_prod, True)
        native.ring_product_backward(lib, ring, ring_g, True, got_ring)
        pairs = [(y, want_y), (gx, want_gx), *zip(grads, want_grads), (got_prod, want_prod), *zip(got_ring, want_ring)]
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in pairs)
    except (RuntimeError, ValueError, AttributeError) as exc:
        native.mark_unusable(f"self-check failed: {exc}")
        return False
    if not ok:
        native.mark_unusable("self-check failed: results differ from the torch engine")
    return ok


def native_status() -> dict:
    """Whether the compiled chain is in use here (built, loaded and self-checked), and why not."""
    usable = _native_for(_Chain((2, 3, 2), 2), torch.empty(0)) is not None
    return {"in_use": usable, "status": native.status(), "threads": native_threads() if usable else 0}
