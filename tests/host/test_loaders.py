"""TLoRA loaders in real ComfyUI 0.3.75 (in-process, tiny seeded SD1.5 model and CLIP, CPU).

Every expected weight is computed here in float64 from the base model's exact weights and
the file's tensors (tests/host/tlora_refs.py), never from the pack's own output.
"""
from __future__ import annotations

import logging

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R
from tests.host.tlora_refs import (assert_all_base, loader, stock_full, stock_model_only, tlora_full,
                                    tlora_model_only, unet_shapes)

STRENGTHS = (1.0, 0.0, 0.5, -1.0, -0.5, 0.35, 2.0)


@pytest.fixture(scope="module")
def sd15(tm):
    """(TinyModel, CLIP, {weight key: base weight}) shared by the module; tests never keep patches applied."""
    m, clip = tm.tiny_sd15(seed=0), tm.tiny_clip(seed=0)
    return m, clip, tm.state_fingerprint(m.model)


def sample(tm, m, patcher) -> torch.Tensor:
    """Two euler steps with ComfyUI's own sampler at a fixed seed; models are unloaded afterwards."""
    try:
        return tm.sample(patcher, seed=7, positive=m.cond(seed=1), negative=m.cond(seed=2), steps=2, cfg=2.0)
    finally:
        ch.free_models()


# --------------------------------------------------------------------------- stock vs ours

@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0, 0.6])
def test_stock_lora_loaders_and_tlora_loader_agree(tm, sd15, loras_dir, caplog, strength):
    m, clip, base = sd15
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes, seed=1)
    R.write_tlora(loras_dir / "agree.safetensors", adapters)
    keys = [p + ".weight" for p in shapes]

    with caplog.at_level(logging.WARNING):
        stock = stock_model_only(m.patcher, "agree.safetensors", strength)
        stock_mc, _ = stock_full(m.patcher, clip, "agree.safetensors", strength, 1.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()], caplog.text
    ours = tlora_model_only(m.patcher, "agree.safetensors", strength)
    ours_mc, _ = tlora_full(m.patcher, clip, "agree.safetensors", strength, 1.0)
    assert set(ours.patches) == set(keys) and set(stock.patches) == set(keys)
    assert not m.patcher.patches, "loaders must not modify their input model"

    w_ours = R.patched_weights(ours, keys)
    for label, other in (("LoraLoaderModelOnly", stock), ("LoraLoader", stock_mc), ("TLoRALoader", ours_mc)):
        w = R.patched_weights(other, keys)
        bad = [k for k in keys if not torch.equal(w[k], w_ours[k])]
        assert not bad, f"{label} patched {len(bad)} weights differently, e.g. {bad[:2]}"
    for k in keys:  # and both are right
        R.assert_close64(w_ours[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, strength), k)

    lat_base = sample(tm, m, m.patcher)
    lat_stock = sample(tm, m, stock)
    lat_ours = sample(tm, m, ours)
    assert torch.equal(lat_stock, lat_ours), "same file and strength must sample bit-identical latents"
    assert (lat_ours - lat_base).abs().max() > 1e-3, "the adapter must visibly change the sample"
    assert_all_base(tm.state_fingerprint(m.model), base, "after sampling and unloading")


# --------------------------------------------------------------------------- strength rule

def test_strength_is_linear_in_weight_space_and_unpatch_restores(tm, sd15, loras_dir):
    from tlora import load_file
    m, _, base = sd15
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes, seed=2)
    path = R.write_tlora(loras_dir / "linear.safetensors", adapters)
    loaded = load_file(path)
    keys = [p + ".weight" for p in shapes]
    for strength in STRENGTHS:
        patched = tlora_model_only(m.patcher, "linear.safetensors", strength)
        after = R.patched_weights(patched)  # every weight of the model
        if strength == 0:
            assert_all_base(after, base, "strength 0")
            continue
        untouched = [k for k in base if k not in keys and not torch.equal(after[k], base[k])]
        assert not untouched, f"weights outside the file changed: {untouched[:3]}"
        for k in keys:
            R.assert_close64(after[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, strength),
                             f"{k} at strength {strength}")
            if strength == 1.0:
                assert torch.equal(after[k], loaded[k[:-7]].patched_weight(base[k])), k
        assert_all_base(tm.state_fingerprint(m.model), base, f"after unpatch (strength {strength})")


def test_negative_strength_mirrors_positive(sd15, loras_dir):
    m, _, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    R.write_tlora(loras_dir / "mirror.safetensors", R.random_adapters(shapes, seed=3))
    keys = [p + ".weight" for p in shapes]
    plus = R.patched_weights(tlora_model_only(m.patcher, "mirror.safetensors", 0.8), keys)
    minus = R.patched_weights(tlora_model_only(m.patcher, "mirror.safetensors", -0.8), keys)
    for k in keys:  # W(s) + W(-s) = 2 W0 for a rule linear in weight space
        torch.testing.assert_close(plus[k] + minus[k], 2 * base[k], rtol=0, atol=1e-5)


def test_patching_inside_then_outside_inference_mode(sd15, loras_dir):
    """ComfyUI patches under torch.inference_mode (the executor); trainers and scripts patch outside it."""
    m, _, base = sd15
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes, seed=19)
    R.write_tlora(loras_dir / "infmode.safetensors", adapters)
    keys = [p + ".weight" for p in shapes]
    patched = tlora_model_only(m.patcher, "infmode.safetensors", 1.0)
    with torch.inference_mode():
        inside = R.patched_weights(patched, keys)
    outside = R.patched_weights(patched, keys)
    for k in keys:
        assert torch.equal(inside[k], outside[k]), k
        R.assert_close64(outside[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, 1.0), k)


# --------------------------------------------------------------------------- stacking

def _stack_files(m, loras_dir):
    """A TLoRA file (half its modules transform-free) and a kohya LoRA overlapping it."""
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes, seed=4)
    R.write_tlora(loras_dir / "stack_t.safetensors", adapters)
    lora_shapes = dict(list(shapes.items())[::2])  # every other module, overlapping every transform kind
    lora = R.random_lora(lora_shapes, rank=4, alpha=2.0, seed=5)
    R.write_lora(loras_dir / "stack_l.safetensors", {R.kohya_unet(p): v for p, v in lora.items()})
    return shapes, adapters, lora


def test_stack_lora_then_tlora_transforms_the_patched_weight(sd15, loras_dir):
    m, _, base = sd15
    shapes, adapters, lora = _stack_files(m, loras_dir)
    sl, st = 0.9, 0.7
    chained = tlora_model_only(stock_model_only(m.patcher, "stack_l.safetensors", sl), "stack_t.safetensors", st)
    got = R.patched_weights(chained, [p + ".weight" for p in shapes])
    for p, shape in shapes.items():
        w1 = base[p + ".weight"].double()
        if p in lora:
            w1 = w1 + sl * R.ref_lora_diff(*lora[p], shape)
        # (W0 + dL) T + s Delta, at strengths: W1 + st (W1 T + s Delta - W1)
        R.assert_close64(got[p + ".weight"], R.ref_patched(w1, adapters[p].tensors, st), p)


def test_stack_tlora_then_lora_adds_after_the_transform(sd15, loras_dir):
    m, _, base = sd15
    shapes, adapters, lora = _stack_files(m, loras_dir)
    sl, st = 0.9, 0.7
    t_then_l = tlora_model_only(m.patcher, "stack_t.safetensors", st)
    t_then_l = stock_model_only(t_then_l, "stack_l.safetensors", sl)
    l_then_t = tlora_model_only(stock_model_only(m.patcher, "stack_l.safetensors", sl), "stack_t.safetensors", st)
    keys = [p + ".weight" for p in shapes]
    got, other = R.patched_weights(t_then_l, keys), R.patched_weights(l_then_t, keys)
    order_matters = 0
    for p, shape in shapes.items():
        k = p + ".weight"
        expected = R.ref_patched(base[k], adapters[p].tensors, st)  # W0 T + s Delta (at st) ...
        if p in lora:
            expected = expected + sl * R.ref_lora_diff(*lora[p], shape)  # ... + dL
        R.assert_close64(got[k], expected, p)
        if p in lora:
            differs = not torch.allclose(got[k], other[k], rtol=1e-5, atol=1e-5)
            if adapters[p].transform_is_identity:  # additive parts commute
                assert not differs, f"{p}: a transform-free TLoRA and a LoRA must commute"
            order_matters += differs
    assert order_matters > 0, "with a transform, LoRA-then-TLoRA must differ from TLoRA-then-LoRA"


def test_two_loras_commute_and_two_tloras_compose(sd15, loras_dir):
    m, _, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    keys = [p + ".weight" for p in shapes]
    a, b = R.random_adapters(shapes, seed=6), R.random_adapters(shapes, seed=7)
    R.write_tlora(loras_dir / "ta.safetensors", a)
    R.write_tlora(loras_dir / "tb.safetensors", b)
    got = R.patched_weights(tlora_model_only(tlora_model_only(m.patcher, "ta.safetensors", 0.8),
                                             "tb.safetensors", 0.5), keys)
    for p in shapes:
        k = p + ".weight"
        R.assert_close64(got[k], R.ref_patched(R.ref_patched(base[k], a[p].tensors, 0.8), b[p].tensors, 0.5), p)

    la, lb = R.random_lora(shapes, seed=8), R.random_lora(shapes, seed=9)
    R.write_lora(loras_dir / "la.safetensors", {R.kohya_unet(p): v for p, v in la.items()})
    R.write_lora(loras_dir / "lb.safetensors", lb, style="peft")  # generic `diffusion_model.` keys, PEFT names
    ab = R.patched_weights(stock_model_only(stock_model_only(m.patcher, "la.safetensors", 0.7), "lb.safetensors", 1.0), keys)
    ba = R.patched_weights(stock_model_only(stock_model_only(m.patcher, "lb.safetensors", 1.0), "la.safetensors", 0.7), keys)
    for p, shape in shapes.items():
        k = p + ".weight"
        expected = base[k].double() + 0.7 * R.ref_lora_diff(*la[p], shape) + R.ref_lora_diff(*lb[p], shape)
        R.assert_close64(ab[k], expected, p)
        R.assert_close64(ba[k], expected, p)


# --------------------------------------------------------------------------- low VRAM, dtypes

def _effective_weights(patcher, keys, dtype):
    """Weights as the layers use them in low-VRAM mode (ComfyUI's cast_bias_weight runs the patch)."""
    import comfy.ops
    import comfy.utils
    probe = torch.zeros(1, dtype=dtype)
    out = {}
    for k in keys:
        module = comfy.utils.get_attr(patcher.model, k.rsplit(".", 1)[0])
        assert module.weight_function, f"{k}: no low-VRAM patch function attached"
        out[k] = comfy.ops.cast_bias_weight(module, probe)[0].detach().clone()
    return out


def _forward(patcher, m_cond, dtype) -> torch.Tensor:
    """One UNet forward through ComfyUI's model wrapper (what the sampler calls)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([500.0]), c_crossattn=m_cond.to(dtype)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_lowvram_path_matches_normal_path(tm, sd15, loras_dir, dtype):
    m32, _, _ = sd15
    patcher = m32.patcher if dtype == torch.float32 else R.tiny_sd15_dtype(dtype)
    base = tm.state_fingerprint(patcher.model)
    shapes = unet_shapes(m32.model)
    adapters = R.random_adapters(shapes, seed=10)
    R.write_tlora(loras_dir / "lowvram.safetensors", adapters)
    keys = [p + ".weight" for p in shapes]
    ours = tlora_model_only(patcher, "lowvram.safetensors", 0.8)
    cond = m32.cond(seed=1)[0][0]
    tol = R.tolerance(dtype)

    normal = R.patched_weights(ours, keys)
    for k in keys:  # the normal path against the float64 reference, at the dtype's precision
        R.assert_close64(normal[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, 0.8), k)
    ours.patch_model(device_to=torch.device("cpu"))
    try:
        y_normal = _forward(ours, cond, dtype)
    finally:
        ours.unpatch_model(device_to=torch.device("cpu"))

    ours.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert patcher.model.model_lowvram and patcher.model.lowvram_patch_counter >= len(keys)
        stored = tm.state_fingerprint(patcher.model)
        assert_all_base(stored, base, "low-VRAM mode keeps stored weights unpatched")
        lowvram = _effective_weights(ours, keys, dtype)
        y_lowvram = _forward(ours, cond, dtype)
    finally:
        ours.unpatch_model(device_to=torch.device("cpu"))
    for k in keys:
        assert lowvram[k].dtype == dtype
        torch.testing.assert_close(lowvram[k].float(), normal[k].float(), rtol=tol[0], atol=tol[1], msg=k)
    scale = float(y_normal.abs().max())
    torch.testing.assert_close(y_lowvram, y_normal, rtol=0, atol=tol[1] * 10 * max(scale, 1.0))
    assert_all_base(tm.state_fingerprint(patcher.model), base, "after low-VRAM unpatch")
    assert not any(getattr(mod, "weight_function", []) for mod in patcher.model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_weights_strength_rule(tm, loras_dir, dtype):
    patcher = R.tiny_sd15_dtype(dtype)
    base = tm.state_fingerprint(patcher.model)
    shapes = unet_shapes(patcher.model)
    adapters = R.random_adapters(shapes, seed=12)
    R.write_tlora(loras_dir / "half.safetensors", adapters)
    keys = [p + ".weight" for p in shapes]
    assert_all_base(R.patched_weights(tlora_model_only(patcher, "half.safetensors", 0.0)), base, "strength 0")
    for strength in (1.0, -0.4):
        got = R.patched_weights(tlora_model_only(patcher, "half.safetensors", strength), keys)
        for k in keys:
            assert got[k].dtype == dtype
            R.assert_close64(got[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, strength), k)
    assert_all_base(tm.state_fingerprint(patcher.model), base, "after unpatch")


# --------------------------------------------------------------------------- block weights, info

BLOCKS = dict(input_blocks=0.5, middle_block=0.0, output_blocks=-1.0, other=2.0)
OVERRIDES = "output_blocks.3=1.5,\n input_blocks.1.1.transformer_blocks.0.attn2=0.25"


def expected_multiplier(key: str) -> float:
    """The block multiplier of a weight key under BLOCKS/OVERRIDES, worked out by hand."""
    path = key.removeprefix("diffusion_model.")
    if path.startswith("input_blocks.1.1.transformer_blocks.0.attn2."):
        return 0.25
    if path.startswith("output_blocks.3."):
        return 1.5
    for group, mult in (("input_blocks.", 0.5), ("middle_block.", 0.0), ("output_blocks.", -1.0)):
        if path.startswith(group):
            return mult
    return 2.0


def block_weights(model, name: str, strength: float):
    """TLoRABlockWeights with BLOCKS and OVERRIDES."""
    return loader("TLoRABlockWeights").execute(model=model, adapter_name=name, strength_model=strength,
                                               overrides=OVERRIDES, **BLOCKS).result[0]


def _block_shapes(m) -> dict[str, tuple[int, ...]]:
    """unet_shapes plus a weight outside the three block groups (time embedding)."""
    shapes = unet_shapes(m.model)
    shapes["diffusion_model.time_embed.0"] = tuple(m.model.state_dict()["diffusion_model.time_embed.0.weight"].shape)
    return shapes


def test_block_weights_on_a_tlora_file(sd15, loras_dir):
    m, _, base = sd15
    shapes = _block_shapes(m)
    adapters = R.random_adapters(shapes, seed=13)
    R.write_tlora(loras_dir / "blocks_t.safetensors", adapters)
    keys = [p + ".weight" for p in shapes]
    got = R.patched_weights(block_weights(m.patcher, "blocks_t.safetensors", 0.8), keys)
    assert {expected_multiplier(k) for k in keys} == {0.25, 1.5, 0.5, 0.0, -1.0, 2.0}
    for k in keys:
        mult = expected_multiplier(k)
        if mult == 0:
            assert torch.equal(got[k], base[k]), k
        else:
            R.assert_close64(got[k], R.ref_patched(base[k], adapters[k[:-7]].tensors, 0.8 * mult), f"{k} x{mult}")


def test_block_weights_on_a_plain_lora_file(sd15, loras_dir):
    m, _, base = sd15
    shapes = _block_shapes(m)
    lora = R.random_lora(shapes, seed=14)
    R.write_lora(loras_dir / "blocks_l.safetensors", {R.kohya_unet(p): v for p, v in lora.items()})
    keys = [p + ".weight" for p in shapes]
    got = R.patched_weights(block_weights(m.patcher, "blocks_l.safetensors", 0.8), keys)
    for p, shape in shapes.items():
        k = p + ".weight"
        expected = base[k].double() + 0.8 * expected_multiplier(k) * R.ref_lora_diff(*lora[p], shape)
        R.assert_close64(got[k], expected, k)
    # All groups at 1 and no overrides is the plain loader.
    plain = loader("TLoRABlockWeights").execute(model=m.patcher, adapter_name="blocks_l.safetensors",
                                                strength_model=0.8, input_blocks=1.0, middle_block=1.0,
                                                output_blocks=1.0, other=1.0).result[0]
    w_plain = R.patched_weights(plain, keys)
    w_stock = R.patched_weights(stock_model_only(m.patcher, "blocks_l.safetensors", 0.8), keys)
    assert all(torch.equal(w_plain[k], w_stock[k]) for k in keys)


def test_block_weights_rejects_a_malformed_override(sd15, loras_dir):
    from tlora.errors import TLoRAError
    m, _, _ = sd15
    R.write_tlora(loras_dir / "blocks_bad.safetensors", R.random_adapters(unet_shapes(m.model, convs=False), seed=15))
    with pytest.raises(Exception, match="input_blocks.4=0.5") as err:
        loader("TLoRABlockWeights").execute(model=m.patcher, adapter_name="blocks_bad.safetensors", strength_model=1.0,
                                            overrides="output_blocks.3", **BLOCKS)
    assert isinstance(err.value, (TLoRAError, R.pack("tlora.errors").TLoRAError))


def test_info_node_describes_the_file(sd15, loras_dir):
    m, _, _ = sd15
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes, seed=16)
    path = R.write_tlora(loras_dir / "info.safetensors", adapters, config={"targets": "attn", "shapes": "auto"},
                         metadata={"tlora.train.steps": 250, "ss_output_name": "info"})
    params = sum(v.numel() for a in adapters.values() for n, v in a.tensors.items() if n != "tlora_scale")
    res = ch.run_prompt({"info": {"class_type": "TLoRAInfo", "inputs": {"adapter_name": "info.safetensors"}}})
    assert res.ok, res.describe()
    text = res.outputs["info"][0]
    assert f"{params:,} parameters in {len(shapes)} modules" in text, text
    size_mb = f"{__import__('os').path.getsize(path) / 1e6:.2f} MB"
    assert size_mb in text
    assert "architecture: unknown/transformed-lora" in text
    assert "trm:2 + tr:3 x" in text and "none + lora:2 x" in text and "diag + tr:2 x" in text
    assert "tlora.train.steps: 250" in text and "ss_output_name: info" in text
    assert "targets=attn" in text and "shapes=auto" in text
    assert res.ui["info"]["text"] == [text]  # shown on the node


# --------------------------------------------------------------------------- text encoder, kohya names

CLIP_PREFIX = "clip_l.transformer.text_model.encoder.layers"


def _te_shapes(clip) -> dict[str, tuple[int, ...]]:
    """{text-encoder weight key (no .weight): shape} for a few CLIP-L layers of the tiny CLIP."""
    sd = clip.cond_stage_model.state_dict()
    names = [f"{CLIP_PREFIX}.{i}.{part}" for i in (0, 2) for part in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")]
    return {n: tuple(sd[n + ".weight"].shape) for n in names}


@pytest.mark.parametrize("style", ["generic", "kohya"])
def test_text_encoder_strength_clip_and_prefix_styles(tm, sd15, loras_dir, style):
    m, clip, base = sd15
    clip_base = tm.state_fingerprint(clip.cond_stage_model)
    te = _te_shapes(clip)
    unet = dict(list(unet_shapes(m.model).items())[:6])
    te_adapters = R.random_adapters(te, seed=17)
    unet_adapters = R.random_adapters(unet, seed=18)
    if style == "generic":
        file = {f"text_encoders.{k}": a for k, a in te_adapters.items()} | unet_adapters
    else:  # kohya: lora_te_text_model_encoder_layers_0_self_attn_q_proj, lora_unet_input_blocks_1_1_...
        file = {"lora_te_" + k.removeprefix("clip_l.transformer.").replace(".", "_"): a for k, a in te_adapters.items()}
        file |= {R.kohya_unet(p): a for p, a in unet_adapters.items()}
    R.write_tlora(loras_dir / f"te_{style}.safetensors", file)
    name = f"te_{style}.safetensors"
    te_keys, unet_keys = [k + ".weight" for k in te], [p + ".weight" for p in unet]

    model, new_clip = tlora_full(m.patcher, clip, name, 0.8, 0.6)
    w_te = R.clip_patched_weights(new_clip, te_keys)
    for k in te_keys:
        R.assert_close64(w_te[k], R.ref_patched(clip_base[k], te_adapters[k[:-7]].tensors, 0.6), k)
    w_unet = R.patched_weights(model, unet_keys)
    for k in unet_keys:
        R.assert_close64(w_unet[k], R.ref_patched(base[k], unet_adapters[k[:-7]].tensors, 0.8), k)

    stock_model, stock_clip = stock_full(m.patcher, clip, name, 0.8, 0.6)
    s_te = R.clip_patched_weights(stock_clip, te_keys)
    s_unet = R.patched_weights(stock_model, unet_keys)
    assert all(torch.equal(s_te[k], w_te[k]) for k in te_keys), "stock LoraLoader differs on the text encoder"
    assert all(torch.equal(s_unet[k], w_unet[k]) for k in unet_keys), "stock LoraLoader differs on the UNet"

    try:
        cond_base = tm.encode_text(clip, "a photo of sks dog")[0][0]
        cond_ours = tm.encode_text(new_clip, "a photo of sks dog")[0][0]
        cond_stock = tm.encode_text(stock_clip, "a photo of sks dog")[0][0]
    finally:
        ch.free_models()
    assert torch.equal(cond_ours, cond_stock)
    assert (cond_ours - cond_base).abs().max() > 1e-3

    # strength_clip 0: the text encoder is the base bit for bit; model-only loading skips TE modules.
    _, clip0 = tlora_full(m.patcher, clip, name, 0.8, 0.0)
    assert_all_base(R.clip_patched_weights(clip0), clip_base, "strength_clip 0")
    only = tlora_model_only(m.patcher, name, 0.8)
    assert set(only.patches) == set(unet_keys)
    assert_all_base(tm.state_fingerprint(clip.cond_stage_model), clip_base, "CLIP after unpatching")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_strengths_are_refused_by_every_loader(sd15, loras_dir, bad):
    """JSON NaN passes the host's min/max check: each of our loaders refuses it, naming the input."""
    from tlora.errors import TLoRAError
    m, clip, base = sd15
    R.write_tlora(loras_dir / "nan.safetensors", R.random_adapters(unet_shapes(m.model, convs=False), seed=21))
    calls = {
        "TLoRALoader": dict(model=m.patcher, clip=clip, adapter_name="nan.safetensors", strength_model=bad,
                            strength_clip=1.0),
        "TLoRALoaderModelOnly": dict(model=m.patcher, adapter_name="nan.safetensors", strength_model=bad),
        "TLoRABlockWeights": dict(model=m.patcher, adapter_name="nan.safetensors", strength_model=1.0,
                                  **{**BLOCKS, "middle_block": bad}),
    }
    for node, kwargs in calls.items():
        with pytest.raises(Exception, match="must be finite numbers") as err:
            loader(node).execute(**kwargs)
        assert isinstance(err.value, (TLoRAError, R.pack("tlora.errors").TLoRAError)), node
    assert_all_base(tm_state(m), base, "after refused strengths")


def tm_state(m):
    from harness import tiny_models
    return tiny_models.state_fingerprint(m.model)


@pytest.mark.parametrize("overrides, message", [
    ("input_blocks.1=1e400", "not a finite number"), ("input_blocks.1=nan", "not a finite number"),
    ("=0.5", "must look like"), ("input_blocks.99=0.5", "names no block of this model"),
    ("imput_blocks.1=0.5", "names no block of this model")])
def test_bad_block_overrides_are_refused(sd15, loras_dir, overrides, message):
    m, _, _ = sd15
    R.write_tlora(loras_dir / "blocks_ov.safetensors", R.random_adapters(unet_shapes(m.model, convs=False), seed=22))
    with pytest.raises(Exception, match=message):
        loader("TLoRABlockWeights").execute(model=m.patcher, adapter_name="blocks_ov.safetensors", strength_model=1.0,
                                            overrides=overrides, **BLOCKS)


def test_info_node_cuts_huge_metadata(sd15, loras_dir):
    """A 2 MB ss_training_comment used to come back whole in the node's text, its STRING and /history."""
    m, _, _ = sd15
    adapters = R.random_adapters(unet_shapes(m.model, convs=False), seed=23)
    R.write_tlora(loras_dir / "huge_meta.safetensors", adapters,
                  metadata={"ss_training_comment": "x" * 2_000_000, "tlora.train.steps": "5"})
    out = loader("TLoRAInfo").execute(adapter_name="huge_meta.safetensors")
    text = out.result[0]
    assert len(text) < 20_000 and "x" * 400 + "…" in text and "tlora.train.steps" in text
    assert len(str(out.ui)) < 40_000


def test_an_override_of_a_block_without_adapter_modules_is_refused(sd15, loras_dir):
    """`output_blocks.3=0` on a file that only adapts input blocks changed nothing, without a word (issue 28)."""
    m, base, _ = sd15
    shapes = {k: v for k, v in unet_shapes(m.model, convs=False).items() if k.startswith("diffusion_model.input_blocks")}
    R.write_tlora(loras_dir / "inputs_only.safetensors", R.random_adapters(shapes, seed=24))
    with pytest.raises(Exception, match=r"block weight 'output_blocks.3' names a block it has no module in "
                                        r"\(its modules are in input_blocks"):
        loader("TLoRABlockWeights").execute(model=m.patcher, adapter_name="inputs_only.safetensors",
                                            strength_model=1.0, overrides="output_blocks.3=0", **BLOCKS)
    used = loader("TLoRABlockWeights").execute(model=m.patcher, adapter_name="inputs_only.safetensors",
                                               strength_model=1.0, overrides="input_blocks.1=0", **BLOCKS).result[0]
    assert used is not m.patcher


def test_info_node_cuts_many_keys_a_huge_architecture_and_config(sd15, loras_dir):
    """1,000 extra keys, a 1 MB modelspec.architecture and a 1 MB tlora.config entry (issue 28's metadata class)."""
    m, _, _ = sd15
    adapters = R.random_adapters(unet_shapes(m.model, convs=False), seed=25)
    R.write_tlora(loras_dir / "many_meta.safetensors", adapters, config={"junk": "c" * 2 ** 20},
                  metadata={"modelspec.architecture": "a" * 2 ** 20, "tlora.train.steps": "5",
                            **{f"ss_junk_{i:04d}": "j" * 1000 for i in range(1000)}})
    text = loader("TLoRAInfo").execute(adapter_name="many_meta.safetensors").result[0]
    assert len(text) < 40_000 and "tlora.train.steps: 5" in text and "more metadata entries not shown" in text
