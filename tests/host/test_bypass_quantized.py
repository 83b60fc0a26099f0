"""ComfyUI's own bypass loader (0.12+) with TLoRA files on quantized models (real host).

0.12.1 casts an adapter's tensors to its layer's storage dtype when it injects the bypass hook
(fp8 cores on an fp8 checkpoint); our adapter runs with the file's float32 tensors instead. And
the bypass loader keeps whole weights only: a file naming row slices of fused weights (diffusers
q/k/v of Flux's qkv) is refused in one line pointing at our loader, before anything is applied.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R

pytestmark = pytest.mark.skipif(ch.host_version() < (0, 12),
                                reason=f"{ch.host_label()} has no bypass LoRA loading (0.12 added it)")


def bypass_model_only(model, name: str, strength: float):
    """ComfyUI's LoraLoaderBypassModelOnly."""
    return ch.node_class("LoraLoaderBypassModelOnly")().load_lora_model_only(model, name, strength)[0]


def test_bypass_on_an_fp8_checkpoint_keeps_float32_cores(tm, loras_dir):
    from harness import quantized as q
    twin = q.twin("sd15", "fp8", seed=0)
    sd = twin.reference.state_dict()
    paths = [f"diffusion_model.{k.removesuffix('.weight')}" for k in twin.quantized_keys if k.endswith("attn1.to_q.weight")]
    adapters = {p: R.random_adapter(tuple(sd[p + ".weight"].shape), seed=i) for i, p in enumerate(paths)}
    R.write_tlora(loras_dir / "bypass_fp8.safetensors", adapters)
    x, t = twin.latent(), twin.timestep()
    conds = twin.conditioning(x)
    stored = q.stored(twin.patcher.model)
    got = q.forward(bypass_model_only(twin.patcher, "bypass_fp8.safetensors", 0.8), x, t, conds)

    def reference(cast=None) -> torch.Tensor:
        saved = {k: v.clone() for k, v in sd.items()}
        weights = dict(saved)
        for p, a in adapters.items():
            tensors = {k: (v.to(cast).double() if cast is not None else v) for k, v in a.tensors.items()}
            weights[p + ".weight"] = R.ref_patched(weights[p + ".weight"], tensors, 0.8)
        twin.reference.load_state_dict(weights)
        try:
            return twin.reference_output(x, t, conds)
        finally:
            twin.reference.load_state_dict(saved)
    base = q.forward(twin.patcher, x, t, conds)
    ref, ref_fp8_cores = reference(), reference(torch.float8_e4m3fn)
    base_err = float((base.double() - twin.reference_output(x, t, conds)).abs().max())
    tol = 3 * base_err + 1e-5 * float(ref.abs().max())
    assert float((ref_fp8_cores - ref).abs().max()) > 20 * tol, "fp8 cores must be told apart from float32 ones"
    assert float((got.double() - ref).abs().max()) <= tol
    now = q.stored(twin.patcher.model)
    assert all(torch.equal(now[k], v) for k, v in stored.items()), "the bypass path wrote into stored weights"


def test_a_file_with_row_slices_is_refused_by_the_bypass_loader(tm, loras_dir):
    TLoRAError = R.pack("tlora.errors").TLoRAError
    t = tm.tiny_dit("flux", seed=2)
    hidden = t.model.state_dict()["diffusion_model.double_blocks.0.img_attn.qkv.weight"].shape[1]
    R.write_tlora(loras_dir / "bypass_slices.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q": R.random_adapter((hidden, hidden), seed=1),
        "diffusion_model.double_blocks.0.img_attn.proj": R.random_adapter((hidden, hidden), seed=2)})
    with pytest.raises(TLoRAError, match=r"Load LoRA \(Bypass\) would drop 1 TLoRA modules .*"
                                         r"transformer\.transformer_blocks\.0\.attn\.to_q.*Load TLoRA"):
        bypass_model_only(t.patcher, "bypass_slices.safetensors", 1.0)
    # Our loader takes the same file activation-side (the slice and the whole layer).
    model = R.loader("TLoRALoaderModelOnly").execute(model=t.patcher, adapter_name="bypass_slices.safetensors",
                                                     strength_model=1.0, mode="activation").result[0]
    patched = {k for k in model.object_patches if k.endswith(".forward")}
    assert patched == {"diffusion_model.double_blocks.0.img_attn.qkv.forward",
                       "diffusion_model.double_blocks.0.img_attn.proj.forward"}
