"""The generic <-> diffusers name mapping of the late-2026 families, against diffusers' own models.

Each family's released transformer is built by diffusers on the meta device from its published
config; every mapped path must be a Linear there whose rows add up to the generic weight's
(slices of fused weights included) and whose input width is the generic weight's.
"""
from __future__ import annotations

import pytest
import torch

from tlora import arch
from tlora import diffusers_names as N


def _released(name: str) -> torch.nn.Module:
    """The diffusers transformer of a released model, on the meta device (config as published)."""
    import diffusers
    with torch.device("meta"):
        if name.startswith("flux2"):
            cfg = arch.ARCHS[name].denoiser
            return diffusers.Flux2Transformer2DModel(
                num_layers=cfg.depth, num_single_layers=cfg.depth_single, num_attention_heads=cfg.hidden // 128,
                joint_attention_dim=cfg.context, guidance_embeds=cfg.guidance)
        if name == "chroma":
            return diffusers.ChromaTransformer2DModel()
        if name == "z-image":
            return diffusers.ZImageTransformer2DModel()
        if name == "wan22-5b":
            return diffusers.WanTransformer3DModel(num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                                   in_channels=48, out_channels=48)
        if name == "wan22-14b":
            return diffusers.WanTransformer3DModel()
        if name == "ernie-image":
            return diffusers.ErnieImageTransformer2DModel(hidden_size=4096, num_attention_heads=32, num_layers=36,
                                                          ffn_hidden_size=12288, text_in_dim=3072)
    raise ValueError(name)


FAMILIES = ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "chroma", "z-image", "wan22-5b", "wan22-14b",
            "ernie-image")


@pytest.mark.parametrize("name", FAMILIES)
def test_mapping_names_the_released_diffusers_modules(name):
    """Every generic weight maps to diffusers Linears (or row slices of one) of the released model."""
    model = _released(name)
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = arch.all_modules(name)
    covered = set()
    for generic, targets in N.diffusers_rows(name).items():
        rows = 0
        for path, pieces in targets:
            sub = path.removeprefix("transformer.")
            assert sub in linears, f"{name}: {generic} -> {path} is not a Linear of diffusers' model"
            assert linears[sub][1:] == tuple(shapes[generic][1:]), f"{name}: {path} input width"
            rows += linears[sub][0] if pieces is None or len(pieces) > 1 else pieces[0][1]
            if pieces is not None and len(pieces) == 1:
                assert pieces[0][1] == linears[sub][0], f"{name}: {path} slice rows"
            covered.add(sub)
        assert rows == shapes[generic][0], f"{name}: {generic} rows"
    assert covered == set(linears), f"{name}: diffusers Linears without a generic weight {set(linears) - covered}"
