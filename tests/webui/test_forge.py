"""Forge (snapshot in .host/webui/forge): TLoRA files through backend/patcher/lora.py.

Real host code only, imported on its own (no stand-ins; `packages_3rdparty` on sys.path as the
webui puts it): backend.patcher.lora.load_lora (key claiming, our loader first in its
lora_collection_priority), ModelPatcher.add_patches, and LoraLoader.refresh, which merges every
patch (merge_lora_to_weight, our extra_weight_calculators entry) into the model's parameters.
The key map is written here in the host's generic form ({"diffusion_model.<path>": "...weight"} and
{"lora_unet_<path with _>": ...}): model_lora_keys_unet needs a full model.
"""
import os
import sys

import pytest
import torch

import webui_refs as refs

HOST = refs.host_dir("forge")
pytestmark = pytest.mark.skipif(HOST is None, reason="no Forge snapshot extracted (see the bootstrap's message)")


@pytest.fixture(scope="module")
def host():
    # The hosts switch torch's deterministic mode on at import: put it back for the suites after this one.
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    paths = [HOST, os.path.join(HOST, "packages_3rdparty")]
    sys.path[:0] = paths
    from backend import args
    args.args.always_cpu = True  # this machine has no GPU: the host's own switch
    import backend.patcher.base as base
    import backend.patcher.lora as lora
    from tlora_webui import forge
    forge.install(lora, base.ModelPatcher)
    try:
        yield lora, base
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for path in paths:
            sys.path.remove(path)


def _apply(lora, base, model, files, strength):
    """As sd_forge_lora's load_lora_for_models: load_lora per file, add_patches, then the loader's refresh."""
    from safetensors.torch import load_file
    patcher = base.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    for path in files:
        patches, remaining = lora.load_lora(load_file(path), refs.generic_key_map(model))
        assert not remaining, f"unclaimed keys {list(remaining)}"
        patcher.add_patches(filename=path, patches=patches, strength_patch=strength)
    patcher.refresh_loras()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strength", refs.STRENGTHS)
def test_weights_match_reference_beside_a_plain_lora(host, tmp_path, strength):
    lora, base = host
    path, modules = refs.standard_file(tmp_path)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    model = refs.tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    got = _apply(lora, base, model, [path, plain_path], strength)
    refs.assert_file_and_plain_lora_applied(got, before, modules, plain_update, strength)


def test_kohya_named_file_applies_the_same(host, tmp_path):
    lora, base = host
    _, modules = refs.standard_file(tmp_path)
    path = refs.write_tlora(str(tmp_path / "kohya.safetensors"), modules, kohya=True)
    model = refs.tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    got = _apply(lora, base, model, [path], 0.5)
    for prefix, tensors in modules.items():
        refs.assert_matches(got[prefix + ".weight"], refs.ref_patched(before[prefix + ".weight"], tensors, 0.5), prefix)


def test_a_module_that_does_not_fit_fails_the_file_before_anything_is_patched(host, tmp_path):
    lora, base = host
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module((4, 6, 3, 3), "trm:2", "lora:2", 2)}  # the model's conv has 8 inputs
    path = refs.write_tlora(str(tmp_path / "misfit.safetensors"), modules)
    model = refs.tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model: diffusion_model.conv: .*6-wide.*nothing of it was applied"):
        _apply(lora, base, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_broken_module_is_reported_with_our_message(host, tmp_path):
    lora, _ = host
    from safetensors.torch import load_file
    path, _ = refs.standard_file(tmp_path)
    state = {k: v for k, v in load_file(path).items() if k != refs.CONV + ".tlora_scale"}
    with pytest.raises(ValueError, match=r"broken TLoRA file: diffusion_model.conv: .*tlora_scale.*nothing of it was applied"):
        lora.load_lora(state, refs.generic_key_map(refs.tiny_model()))


def test_comfy_named_text_encoder_module_applies_through_forge_clip_key_map(host, tmp_path):
    """Forge's CLIP key map (the host's own model_lora_keys_clip) has kohya names only: ours are mapped."""
    lora, base = host
    from safetensors.torch import load_file
    clip = holder = torch.nn.Module()
    for part in "clip_l.transformer.text_model.encoder.layers.0.self_attn".split("."):
        holder.add_module(part, torch.nn.Module())
        holder = getattr(holder, part)
    holder.q_proj = q_proj = torch.nn.Linear(16, 16)
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert key in clip.state_dict()
    key_map = lora.model_lora_keys_clip(clip, {})
    prefix = "text_encoders." + key[:-len(".weight")]
    module = refs.trained_module(q_proj.weight.shape, "trm:2", "tr:2", 5)
    path = refs.write_tlora(str(tmp_path / "te.safetensors"), {prefix: module})
    patches, remaining = lora.load_lora(load_file(path), key_map)
    assert list(patches) == [key] and not remaining
    w0 = q_proj.weight.detach().clone()
    patcher = base.ModelPatcher(clip, torch.device("cpu"), torch.device("cpu"))
    patcher.add_patches(filename=path, patches=patches, strength_patch=-1.0)
    patcher.refresh_loras()
    refs.assert_matches(q_proj.weight.detach(), refs.ref_patched(w0, module, -1.0), prefix)


@pytest.mark.parametrize("lora_name", [refs.LIN, refs.kohya(refs.LIN)], ids=["same-name", "kohya-name"])
def test_a_lora_and_a_tlora_for_one_weight_are_refused(host, tmp_path, lora_name):
    """Our loader claimed the TLoRA half, the host's the LoRA half, and ours replaced it in the patch dict."""
    lora, base = host
    path = refs.write_mixed(str(tmp_path / "mixed.safetensors"), lora_name)
    model = refs.tiny_model()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"also has {lora_name}.lora_up.weight, another adapter's tensor.*nothing of it"):
        _apply(lora, base, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
