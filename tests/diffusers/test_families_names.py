"""The generic <-> diffusers name mapping of the late-2026 families, against diffusers' own models.

Each family's released transformer is built by diffusers on the meta device from its published
config; every mapped path must be a Linear there whose rows add up to the generic weight's
(slices of fused weights included) and whose input width is the generic weight's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tlora import arch
from tlora import diffusers_names as N

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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


SMALL = {  # small configs of each family (the conversions rename and split; sizes only need to be consistent)
    "flux2-dev": lambda F: F.Flux2Config(hidden=64, depth=2, depth_single=2, context=32, guidance=True),
    # diffusers' Chroma conversion splits at the released width (3072): one block of each kind at that width.
    "chroma": lambda F: F.ChromaConfig(hidden=3072, depth=1, depth_single=1, context=32, approx_hidden=32,
                                       approx_layers=2),
    "z-image": lambda F: F.ZImageConfig(dim=64, layers=2, refiner_layers=2, context=32),
    "wan22-14b": lambda F: F.WanConfig(dim=64, ffn=128, layers=2, in_dim=16, out_dim=16, text_dim=32),
    "ernie-image": lambda F: F.ErnieImageConfig(hidden=64, layers=2, ffn=128, text_in=32),
}
CONVERSIONS = {"flux2-dev": "convert_flux2_transformer_checkpoint_to_diffusers",
               "chroma": "convert_chroma_transformer_checkpoint_to_diffusers",
               "z-image": "convert_z_image_transformer_checkpoint_to_diffusers",
               "wan22-14b": "convert_wan_transformer_to_diffusers",
               "ernie-image": "convert_ernie_image_transformer_checkpoint_to_diffusers"}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_mapping_is_diffusers_own_single_file_conversion(name):
    """diffusers' own conversion of an original checkpoint (ComfyUI's generic names) puts every row where ours says.

    Each generic weight is filled with (its index, its row) codes; after diffusers' conversion each diffusers
    weight's rows are read back: the source weight and the row order must be our mapping's pieces (slices of
    fused q/k/v, the swapped final modulation).
    """
    from diffusers.loaders import single_file_utils as S
    from tlora import arch_families as F
    table = arch.Arch(name, SMALL[name](F), (), "", "", "")
    rows = table.denoiser_modules()
    checkpoint = {}
    for i, (path, shape, _) in enumerate(rows):
        key = path.removeprefix(arch.UNET_PREFIX)
        code = i * 100000 + torch.arange(shape[0], dtype=torch.float64)
        checkpoint[f"{key}.weight"] = code[:, None].expand(*shape)  # a view: Chroma's rows are 3072 wide
        checkpoint[f"{key}.bias"] = code.clone()
    convert = getattr(S, CONVERSIONS[name])
    for _ in range(64):  # the conversions also read norms and pads no adapter touches: give them placeholders
        try:
            converted = convert(dict(checkpoint))
            break
        except KeyError as err:
            checkpoint[err.args[0]] = torch.zeros(1, dtype=torch.float64)
    ours = N.diffusers_sources(table)
    checked = 0
    for key, value in converted.items():
        path = "transformer." + key.removesuffix(".weight")
        if not key.endswith(".weight") or value.dim() != 2 or path not in ours:
            continue
        generic, pieces = ours[path]
        codes = value[:, 0].round().long()
        assert bool((value == value[:, :1]).all()), path  # whole rows moved, never mixed
        assert set((codes // 100000).tolist()) == {[r[0] for r in rows].index(generic)}, path
        want = torch.arange(value.shape[0]) if pieces is None else \
            torch.cat([torch.arange(o, o + n) for o, n in pieces])
        assert torch.equal(codes % 100000, want), path
        checked += 1
    assert checked == len(ours), f"{name}: {len(ours) - checked} of our diffusers paths not in the conversion"


@pytest.mark.parametrize("name", ["zimage", "wan", "flux2", "chroma"])
def test_a_generic_file_fuses_in_diffusers_as_the_dense_reference(tmp_path, name):
    """A file with ComfyUI's generic names (what the node writes) on every linear of a tiny diffusers transformer:
    diffusers' fuse gives, row slice by row slice, the float64 W0 T + s Delta of the generic weight (the
    generic weight assembled from its diffusers rows as diffusers' own conversion places them); unfuse restores."""
    import diffusers
    from harness import tiny_diffusers as td
    from tests.host import tlora_refs as R
    from comfyui_tlora.tlora import diffusers_names as names  # the pack's own modules, as the apply side uses them
    from comfyui_tlora.trainer.diffusers import apply as A
    cls, cfg = {"zimage": ("ZImageTransformer2DModel", td.ZIMAGE_TINY), "wan": ("WanTransformer3DModel", td.WAN_TINY),
                "flux2": ("Flux2Transformer2DModel", td.FLUX2_TINY),
                "chroma": ("ChromaTransformer2DModel", td.CHROMA_TINY)}[name]
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**cfg)
    table = A.arch_of({"transformer": model})[1]
    rows = names.diffusers_rows(table)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shapes = {g: s for g, s, _ in table.denoiser_modules()}
    adapters = R.random_adapters(shapes, seed=5)
    path = R.write_tlora(tmp_path / f"{name}.safetensors", adapters)
    handle = A.load_tlora(model, path, strength=0.6)
    A.fuse(model)
    fused = model.state_dict()
    for generic, targets in rows.items():
        w0 = torch.zeros(shapes[generic], dtype=torch.float64)
        for target, pieces in targets:
            key = target.removeprefix("transformer.") + ".weight"
            index = torch.arange(shapes[generic][0]) if pieces is None else \
                torch.cat([torch.arange(o, o + n) for o, n in pieces])
            w0[index] = base[key].double()
        want = R.ref_patched(w0, adapters[generic].tensors, 0.6)
        for target, pieces in targets:
            key = target.removeprefix("transformer.") + ".weight"
            index = torch.arange(shapes[generic][0]) if pieces is None else \
                torch.cat([torch.arange(o, o + n) for o, n in pieces])
            R.assert_close64(fused[key], want[index], f"{name}: {generic} -> {target}")
    A.unfuse(model)
    handle.remove()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
