"""Transformer denoisers (Flux, SD3/SD3.5, Qwen-Image) in the real host.

The architecture tables are checked against the host's own models at released size (built on
the meta device from the configs model_detection produces); patching is checked on tiny twins
built from the same host classes, through ComfyUI's stock LoraLoaderModelOnly and our loader,
against the float64 dense reference of tests/host/tlora_refs.py, for whole weights and for
the slices of fused weights that diffusers-style names address (offset patches).
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R
from tlora import arch
from tests.host.tlora_refs import stock_model_only, tlora_model_only

STRENGTHS = (1.0, 0.0, 0.5, -1.0)
FAMILIES = ("flux", "sd3", "qwen-image")


NEW_TABLES = ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "chroma", "z-image", "wan22-5b", "wan22-14b",
              "ernie-image")


@pytest.mark.parametrize("arch_name", ["flux", "sd3", "sd35-medium", "sd35-large", "qwen-image", *NEW_TABLES])
def test_table_is_the_host_model(tm, arch_name):
    """Every Linear of the released model, with its shape and in the host's order, and nothing else;
    the table's groups are the roles the live-model rules give (tlora.arch.role_of)."""
    from harness import tiny_families as tf
    from tlora import arch
    if arch_name in NEW_TABLES:
        cls_name = tf.FULL_CONFIGS[arch_name][0]
        import comfy.supported_models as sm
        if not hasattr(sm, cls_name):
            pytest.skip(f"{ch.host_label()} has no {cls_name} model class")
        dm = tf.family_on_meta(arch_name)
    else:
        dm = tm.dit_on_meta(arch_name)
    live = {n: tuple(m.weight.shape) for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = arch.ARCHS[arch_name].denoiser_modules()
    table = [(name.removeprefix(arch.UNET_PREFIX), shape) for name, shape, _ in rows]
    assert table == list(live.items())
    for name, _, group in rows:  # the live-model rules agree with the table
        path = name.removeprefix(arch.UNET_PREFIX)
        assert arch.role_of(path) == group, path


@pytest.fixture(scope="module", params=FAMILIES)
def dit(request, tm):
    """(family, tiny ModelPatcher, {generic prefix: weight shape} of its attention and MLP linears)."""
    from tlora import arch
    t = tm.tiny_dit(request.param, seed=3)
    sd = t.model.state_dict()
    paths = [n for n, m in t.model.diffusion_model.named_modules()
             if isinstance(m, torch.nn.Linear) and arch.path_in_groups(n, ("attn", "ff"))]
    return request.param, t.patcher, {f"diffusion_model.{p}": tuple(sd[f"diffusion_model.{p}.weight"].shape)
                                      for p in paths}


def _both_loaders(patcher, name, strength, keys):
    """Patched weights through the stock LoraLoaderModelOnly and through TLoRALoaderModelOnly."""
    return (R.patched_weights(stock_model_only(patcher, name, strength), keys),
            R.patched_weights(tlora_model_only(patcher, name, strength), keys))


def test_whole_weights_equal_the_dense_reference(dit, loras_dir):
    family, patcher, shapes = dit
    adapters = R.random_adapters(shapes, seed=11)
    R.write_tlora(loras_dir / f"dit_{family}.safetensors", adapters)
    keys = [f"{p}.weight" for p in shapes]
    base = R.base_weights(patcher, keys)
    for strength in STRENGTHS:
        for label, got in zip(("stock", "ours"), _both_loaders(patcher, f"dit_{family}.safetensors", strength, keys)):
            for prefix, adapter in adapters.items():
                key = f"{prefix}.weight"
                if strength == 0:
                    assert torch.equal(got[key], base[key]), f"{label} {key} at 0"
                else:
                    R.assert_close64(got[key], R.ref_patched(base[key], adapter.tensors, strength),
                                     f"{family} {label} {key} at {strength}")
    R.assert_all_base(R.base_weights(patcher, keys), base, "after unpatch")


# diffusers names that address rows of a fused weight: (name, fused weight path, first row, rows) per family,
# with H the hidden width of the tiny twin (ComfyUI's flux_to_diffusers / mmdit_to_diffusers maps).
def _sliced_names(family: str, hidden: int) -> list[tuple[str, str, int, int]]:
    h = hidden
    if family == "flux":
        return [("transformer.transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", h, h),
                ("transformer.transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", 2 * h, h),
                ("transformer.single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", 0, h),
                ("transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", 3 * h, 4 * h),
                ("transformer.transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj", 0, h)]
    if family == "sd3":
        return [("transformer.transformer_blocks.0.attn.to_q", "joint_blocks.0.x_block.attn.qkv", 0, h),
                ("transformer.transformer_blocks.0.attn.add_k_proj", "joint_blocks.0.context_block.attn.qkv", h, h),
                ("transformer.transformer_blocks.1.attn.to_v", "joint_blocks.1.x_block.attn.qkv", 2 * h, h)]
    return [("transformer.transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q", 0, h),
            ("transformer.transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.img_mlp.net.2", 0, h)]


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_names_patch_their_slice_exactly(tm, loras_dir, family):
    """A TLoRA on q (k, v, the MLP part of linear1) of a fused weight changes those rows only, exactly."""
    t = tm.tiny_dit(family, seed=5)
    sd = t.model.state_dict()
    hidden = sd["diffusion_model.img_in.weight"].shape[0] if family != "sd3" else \
        sd["diffusion_model.context_embedder.weight"].shape[0]
    names = _sliced_names(family, hidden)
    in_features = {n: sd[f"diffusion_model.{w}.weight"].shape[1] for n, w, _, _ in names}
    adapters = {n: R.random_adapter((rows, in_features[n]), *R.KIND_CYCLE[i % 3], seed=40 + i)
                for i, (n, _, _, rows) in enumerate(names)}
    R.write_tlora(loras_dir / f"sliced_{family}.safetensors", adapters)
    keys = sorted({f"diffusion_model.{w}.weight" for _, w, _, _ in names})
    base = R.base_weights(t.patcher, keys)
    for strength in STRENGTHS:
        expected = {k: base[k].double().clone() for k in keys}
        for n, w, first, rows in names:
            key = f"diffusion_model.{w}.weight"
            expected[key][first:first + rows] = R.ref_patched(base[key][first:first + rows],
                                                              adapters[n].tensors, strength)
        for label, got in zip(("stock", "ours"), _both_loaders(t.patcher, f"sliced_{family}.safetensors",
                                                              strength, keys)):
            for key in keys:
                if strength == 0:
                    assert torch.equal(got[key], base[key]), f"{label} {key} at 0"
                else:
                    R.assert_close64(got[key], expected[key], f"{family} {label} {key} at {strength}")
    R.assert_all_base(R.base_weights(t.patcher, keys), base, "after unpatch")


def test_kohya_names_reach_fused_weights(tm, loras_dir):
    """`lora_unet_double_blocks_0_img_attn_qkv` (sd-scripts' Flux names) patches the whole fused weight."""
    t = tm.tiny_dit("flux", seed=6)
    sd = t.model.state_dict()
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    adapter = R.random_adapter(tuple(sd[key].shape), seed=7)
    R.write_tlora(loras_dir / "kohya_flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": adapter})
    base = R.base_weights(t.patcher, [key])
    for got in _both_loaders(t.patcher, "kohya_flux.safetensors", 0.5, [key]):
        R.assert_close64(got[key], R.ref_patched(base[key], adapter.tensors, 0.5), key)


def test_a_weight_given_whole_and_as_a_slice_is_refused(tm, loras_dir):
    """TLoRA patches do not commute: qkv whole plus its q slice would depend on the order. Refused, named."""
    TLoRAError = R.pack("tlora.errors").TLoRAError  # the pack's class, as ComfyUI imported it
    t = tm.tiny_dit("flux", seed=8)
    sd = t.model.state_dict()
    w = sd["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    h = w.shape[1]
    R.write_tlora(loras_dir / "overlap_flux.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv": R.random_adapter(tuple(w.shape), seed=1),
        "transformer.transformer_blocks.0.attn.to_q": R.random_adapter((h, h), seed=2)})
    with pytest.raises(TLoRAError, match=r"double_blocks\.0\.img_attn\.qkv.*to_q|to_q.*double_blocks\.0\.img_attn\.qkv"):
        tlora_model_only(t.patcher, "overlap_flux.safetensors", 1.0)


@pytest.mark.parametrize("arch_name", ["flux2-dev", "flux2-klein-4b", "chroma", "z-image"])
def test_diffusers_names_agree_with_the_hosts_key_map(tm, arch_name):
    """Where ComfyUI's own diffusers map (flux_to_diffusers, z_image_to_diffusers) names a weight, ours does too."""
    import comfy.utils
    from harness import tiny_families as tf
    from tlora import diffusers_names as N
    cls_name, make = tf.FULL_CONFIGS[arch_name]
    import comfy.supported_models as sm
    if not hasattr(sm, cls_name):
        pytest.skip(f"{ch.host_label()} has no {cls_name} model class")
    config = make()
    theirs = (comfy.utils.z_image_to_diffusers(config) if arch_name == "z-image"
              else comfy.utils.flux_to_diffusers(config))
    ours = N.diffusers_sources(arch_name)
    checked = 0
    for key, target in theirs.items():
        path = "transformer." + key.removesuffix(".weight")
        if not key.endswith(".weight") or path not in ours:
            continue
        generic, pieces = ours[path]
        if isinstance(target, str):
            assert generic == arch.UNET_PREFIX + target.removesuffix(".weight") and pieces is None, path
        elif target[1] is None:  # a row permutation (swap_scale_shift)
            assert generic == arch.UNET_PREFIX + target[0].removesuffix(".weight") and len(pieces) == 2, path
        else:
            assert generic == arch.UNET_PREFIX + target[0].removesuffix(".weight"), path
            assert pieces == ((target[1][1], target[1][2]),), path
        checked += 1
    assert checked > 10
