"""Brute-force references shared by the unit tests (written from the formulas, not the code's own dense())."""
from __future__ import annotations

import itertools

import torch


def brute_t(cores: list[torch.Tensor]) -> torch.Tensor:
    """T[(i..), (j..)] = trace(A_1[i_1, j_1] ... A_D[i_D, j_D]) entry by entry (differentiable, batched)."""
    multi = list(itertools.product(*[range(c.shape[0]) for c in cores]))  # row-major: last fastest
    pairs = [(i, j) for i in multi for j in multi]
    prod = None
    for d, core in enumerate(cores):
        mats = core[torch.tensor([i[d] for i, _ in pairs]), torch.tensor([j[d] for _, j in pairs])]
        prod = mats if prod is None else prod @ mats
    return prod.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(len(multi), len(multi))
