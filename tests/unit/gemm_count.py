"""Counting the multiply-adds of the matrix products torch runs (an independent check of cost formulas)."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

_PRODUCTS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")


class GemmCounter(TorchDispatchMode):
    """Counts the multiply-adds of every (batched) matrix product that runs inside it (`macs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _PRODUCTS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.macs += batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))
