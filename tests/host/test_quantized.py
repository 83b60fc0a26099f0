"""TLoRA on quantized models (real host): activation-side and merged against the dense float64 reference.

Twins (harness/quantized.py) of an SD1.5-like UNet and a Flux-like DiT in ComfyUI's fp8 storage,
its fp8-scaled / int8 / nvfp4 mixed-precision ops, and ComfyUI-GGUF Q8_0 / Q6_K files. The reference
is the same model class in float64 holding every weight as the format dequantizes it, patched
from the dense formulas of tests/host/tlora_refs.py (TLoRA first, then a plain LoRA, the chain's
order); nothing of the pack builds it. Tolerances come from the model itself: `base_err`, how far
the quantized base model is from its float64 reference (float32 rounding; int8's emulated W8A8
quantizes activations too), and `quant_err`, how far quantizing the weights moved the output.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from harness.quantized import forward as q_forward
from tests.host import tlora_refs as R

pytestmark = pytest.mark.skipif(ch.host_version() < (0, 33), reason="quantized twins use ComfyUI 0.33's ops")

STRENGTHS = (1.0, 0.5, -1.0)
LORA_STRENGTH = 0.7
# Flux: q and k of the fused image qkv under diffusers names (row slices), whole layers by generic names.
FLUX_SLICES = ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k")
FLUX_WHOLE = ("double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.txt_attn.qkv",
              "single_blocks.0.linear1", "single_blocks.0.linear2")
FLUX_LORA = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear2")
SD15_CONV = "input_blocks.1.0.in_layers.2"


@pytest.fixture(scope="module")
def q(tm):
    from harness import quantized
    return quantized


_twins: dict = {}


def get_twin(q, family: str, fmt: str):
    """A twin with its files, key map and base measurements (built once per module)."""
    if (family, fmt) in _twins:
        info = _twins[(family, fmt)]
        write_files(info)
        return info
    twin = q.twin(family, fmt, seed=0)
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(twin.patcher.model, {})
    sd = twin.reference.state_dict()
    if family == "sd15":
        paths = [k.removeprefix("diffusion_model.").removesuffix(".weight") for k in twin.quantized_keys
                 if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", "ff.net.2.weight"))]
        tlora_names = [f"diffusion_model.{p}" for p in paths + [SD15_CONV]]
        lora_names = [f"diffusion_model.{p}" for p in paths[:3] + [SD15_CONV]]
    else:
        tlora_names = [f"diffusion_model.{p}" for p in FLUX_WHOLE] + list(FLUX_SLICES)
        lora_names = [f"diffusion_model.{p}" for p in FLUX_LORA]
    shapes = {}
    for name in tlora_names:
        key = key_map[name]
        if isinstance(key, str):
            shapes[name] = tuple(sd[key].shape)
        else:
            shapes[name] = (key[1][2], *sd[key[0]].shape[1:])
    adapters = R.random_adapters(shapes, seed=4)
    lora = R.random_lora({n: tuple(sd[key_map[n]].shape) for n in lora_names}, rank=4, alpha=3.0, seed=5)
    tag = f"{family}_{fmt}"
    x, t = twin.latent(), twin.timestep()
    conds = twin.conditioning(x)
    base = q_forward(twin.patcher, x, t, conds)
    ref_base = twin.reference_output(x, t, conds)
    original = twin.reference_output(x, t, conds, model=twin.original)
    info = dict(twin=twin, key_map=key_map, adapters=adapters, lora=lora, tag=tag, x=x, t=t, conds=conds, base=base,
                base_err=float((base.double() - ref_base).abs().max()), scale=float(ref_base.abs().max()),
                quant_err=float((ref_base - original).abs().max()), stored=q.stored(twin.patcher.model))
    _twins[(family, fmt)] = info
    write_files(info)
    return info


def write_files(info) -> None:
    """The twin's TLoRA and LoRA files in the loras folder (each test's `loras_dir` removes what it made)."""
    R.write_tlora(ch.models_dir("loras") / f"q_{info['tag']}.safetensors", info["adapters"])
    R.write_lora(ch.models_dir("loras") / f"q_{info['tag']}_lora.safetensors", info["lora"], style="kohya")


def reference(info, strength: float, lora_strength: float = LORA_STRENGTH) -> torch.Tensor:
    """The float64 reference: TLoRA merged densely at `strength`, then the LoRA (each weight or row slice)."""
    twin, key_map = info["twin"], info["key_map"]
    model = twin.reference
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    weights = dict(saved)
    for name, adapter in info["adapters"].items():
        key = key_map[name]
        if isinstance(key, str):
            weights[key] = R.ref_patched(weights[key], adapter.tensors, strength)
        else:
            (weight_key, (dim, start, length)) = key
            assert dim == 0
            w = weights[weight_key].clone()
            w[start:start + length] = R.ref_patched(w[start:start + length], adapter.tensors, strength)
            weights[weight_key] = w
    for name, (up, down, alpha) in info["lora"].items():
        key = key_map[name]
        weights[key] = weights[key] + lora_strength * R.ref_lora_diff(up, down, alpha, weights[key].shape)
    model.load_state_dict(weights)
    try:
        return twin.reference_output(info["x"], info["t"], info["conds"])
    finally:
        model.load_state_dict(saved)


def chain(info, strength: float, mode: str, lora_strength: float = LORA_STRENGTH):
    """Load TLoRA (model only) at `strength`, then the LoRA file through our block-weights loader, both in `mode`."""
    tag = info["tag"]
    model = R.loader("TLoRALoaderModelOnly").execute(model=info["twin"].patcher, adapter_name=f"q_{tag}.safetensors",
                                                     strength_model=strength, mode=mode).result[0]
    return R.loader("TLoRABlockWeights").execute(
        model=model, adapter_name=f"q_{tag}_lora.safetensors", strength_model=lora_strength, input_blocks=1.0,
        middle_block=1.0, output_blocks=1.0, other=1.0, overrides="", mode=mode).result[0]


def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max())


CASES = [(f, fmt) for f in ("sd15", "flux") for fmt in ("fp8", "fp8_scaled", "int8", "nvfp4", "gguf_q8_0", "gguf_q6_k")]


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{f}-{q}" for f, q in CASES])
def test_activation_side_equals_the_dense_reference_and_merged(q, loras_dir, family, fmt):
    info = get_twin(q, family, fmt)
    tol_act = 3 * info["base_err"] + 1e-5 * info["scale"]
    # ComfyUI-GGUF merges at every forward on the dequantized weight (nothing is requantized): float32
    # rounding; the other formats write the merged weight back into the format (its own error).
    tol_merged = tol_act if fmt.startswith("gguf") else 3 * info["quant_err"] + tol_act
    for strength in STRENGTHS:
        ref = reference(info, strength)
        act = q_forward(chain(info, strength, "activation"), info["x"], info["t"], info["conds"])
        merged = q_forward(chain(info, strength, "merged"), info["x"], info["t"], info["conds"])
        assert error(act, info["base"]) > 5 * tol_act, "the adapters must change the output"
        assert error(act, ref) <= tol_act, (strength, error(act, ref), tol_act)
        assert error(merged, ref) <= tol_merged, (strength, error(merged, ref), tol_merged)
        assert error(act, merged) <= tol_merged
    assert_stored_unchanged(q, info, "after activation-side and merged runs at every strength")


@pytest.mark.parametrize("family,fmt", [("sd15", "fp8_scaled"), ("flux", "gguf_q6_k"), ("sd15", "fp8")],
                         ids=["sd15-fp8_scaled", "flux-gguf_q6_k", "sd15-fp8"])
def test_strength_zero_is_the_base_bit_for_bit(q, loras_dir, family, fmt):
    """TLoRA at 0 with a LoRA stacked after it: exactly the LoRA alone; both at 0: exactly the base."""
    info = get_twin(q, family, fmt)
    x, t, conds = info["x"], info["t"], info["conds"]
    lora_only = R.loader("TLoRABlockWeights").execute(
        model=info["twin"].patcher, adapter_name=f"q_{info['tag']}_lora.safetensors", strength_model=LORA_STRENGTH,
        input_blocks=1.0, middle_block=1.0, output_blocks=1.0, other=1.0, overrides="", mode="activation").result[0]
    assert torch.equal(q_forward(chain(info, 0.0, "activation"), x, t, conds), q_forward(lora_only, x, t, conds))
    assert torch.equal(q_forward(chain(info, 0.0, "activation", lora_strength=0.0), x, t, conds), info["base"])
    assert_stored_unchanged(q, info, "after strength 0")


def test_auto_runs_quantized_weights_activation_side_and_float_ones_merged(q, loras_dir):
    info = get_twin(q, "sd15", "fp8_scaled")  # linears quantized, convs float32
    activation = R.pack("nodes.activation")
    patched = chain(info, 1.0, "auto")
    forwards = {k for k, v in patched.object_patches.items() if isinstance(v, activation.LayerForward)}
    conv = f"diffusion_model.{SD15_CONV}"
    assert f"{conv}.forward" not in forwards and f"{conv}.weight" in patched.patches  # float conv: merged
    linears = {k.removesuffix(".weight") for k in info["twin"].quantized_keys}
    assert {f"diffusion_model.{p}.forward" for p in linears} & forwards
    assert all(f.removesuffix(".forward").removeprefix("diffusion_model.") in linears for f in forwards)
    ref = reference(info, 1.0)
    tol = 3 * info["base_err"] + 1e-5 * info["scale"]
    assert error(q_forward(patched, info["x"], info["t"], info["conds"]), ref) <= tol
    assert_stored_unchanged(q, info, "after auto")


def test_a_strength_change_recomputes_nothing(q, loras_dir):
    """Two strengths: no weight patch, the same adapter tensors (not copies) under both, and each exact."""
    info = get_twin(q, "flux", "gguf_q8_0")
    activation = R.pack("nodes.activation")
    one = R.loader("TLoRALoaderModelOnly").execute(model=info["twin"].patcher, adapter_name=f"q_{info['tag']}.safetensors",
                                                   strength_model=1.0, mode="activation").result[0]
    half = R.loader("TLoRALoaderModelOnly").execute(model=info["twin"].patcher, adapter_name=f"q_{info['tag']}.safetensors",
                                                    strength_model=0.5, mode="activation").result[0]
    assert not one.patches and not half.patches and one.patches_uuid == info["twin"].patcher.patches_uuid
    for name, value in one.object_patches.items():
        if isinstance(value, activation.LayerForward):
            other = half.object_patches[name]
            for a, b in zip(value.entries, other.entries):
                assert a.strength == 2 * b.strength
                assert all(p is r for p, r in zip(a.parameters(), b.parameters()))
    tol = 3 * info["base_err"] + 1e-5 * info["scale"]
    assert error(q_forward(half, info["x"], info["t"], info["conds"]), reference(info, 0.5, lora_strength=0.0)) <= tol


def test_gguf_twins_decode_as_the_gguf_package_does(q):
    """The twin's blocks (Q8_0 from gguf, Q6_K encoded by the harness) decode alike in ComfyUI-GGUF and gguf."""
    import gguf
    import numpy as np
    values = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    blocks = q.q6_k_blocks(values)
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).reshape(values.shape)
    assert np.abs(decoded - values).max() <= np.abs(values).max() / 31 / 2 * 1.1  # half a step of the coarsest group
    for fmt in ("gguf_q8_0", "gguf_q6_k"):
        twin = get_twin(q, "flux", fmt)["twin"]
        assert twin.quantized_keys
        for key in twin.quantized_keys:
            ours = twin.reference.state_dict()[f"diffusion_model.{key}"] if not key.startswith("diffusion_model.") \
                else twin.reference.state_dict()[key]
            torch.testing.assert_close(ours, twin.independent[key], rtol=2e-3, atol=2e-3 * float(ours.abs().max()))


def assert_stored_unchanged(q, info, what: str) -> None:
    now = q.stored(info["twin"].patcher.model)
    changed = [k for k, v in info["stored"].items() if not torch.equal(now[k], v)]
    assert not changed and now.keys() == info["stored"].keys(), f"{what}: stored tensors changed: {changed[:3]}"
