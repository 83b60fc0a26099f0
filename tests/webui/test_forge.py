"""Forge and ersatzForge (snapshots in .host/webui/forge, .host/webui/ersatzforge): TLoRA files through backend/patcher/lora.py.

Real host code (`packages_3rdparty` / `packages` on sys.path as each webui puts it): extensions-builtin/
sd_forge_lora/networks.py (load_lora_for_models, the per-file loader), backend.patcher.lora.load_lora (key
claiming, our loader first in its lora_collection_priority), model_lora_keys_unet/clip (the hosts' own key
maps, with their diffusers names for Flux, Flux.2, Z-Image, Krea 2 and ERNIE-Image: row slices of fused
weights), ModelPatcher.add_patches, and LoraLoader.refresh, which merges every patch (merge_lora_to_weight,
our extra_weight_calculators entry) into the model's parameters. Stood in, because they are the webui's
state and UI: modules.{errors, scripts, sd_models, shared, cache, hashes}. The models are stand-in model
objects holding real layers (the tiny one, and each family's at its paths) with what the key maps read
(config.huggingface_repo, diffusion_model.config).
"""
import os
import types

import pytest
import torch

import webui_refs as refs

HOSTS = {"forge": "packages_3rdparty", "ersatzforge": "packages"}
FAMILIES = {"forge": ("flux",), "ersatzforge": ("flux", "flux2-klein", "z-image", "krea2", "ernie-image")}
REPO = {("ersatzforge", "z-image"): "Zimage"}  # ersatzForge names Z-Image by its own repo id


@pytest.fixture(scope="module", params=list(HOSTS))
def host(request, tmp_path_factory):
    path = refs.host_dir(request.param)
    if path is None:
        pytest.skip(f"no {request.param} snapshot extracted (see the bootstrap's message)")
    extension = os.path.join(path, "extensions-builtin", "sd_forge_lora")
    with refs.isolated([path, os.path.join(path, HOSTS[request.param]), extension], extra_names=("network", "networks")):
        from backend import args
        args.args.always_cpu = True  # this machine has no GPU: the host's own switch
        import backend.patcher.base as base
        import backend.patcher.lora as lora
        networks = refs.forge_networks(path, str(tmp_path_factory.mktemp("Lora")))
        from tlora_webui import forge
        forge.install(lora, base.ModelPatcher, networks)
        yield types.SimpleNamespace(name=request.param, lora=lora, base=base, networks=networks)


def _apply(host, model, files, strength):
    """As sd_forge_lora's load_networks: each file's state dict through load_lora_for_models, then the refresh."""
    from backend.utils import load_torch_file
    patcher = host.base.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    for path in files:
        patcher, _ = host.networks.load_lora_for_models(patcher, None, load_torch_file(path, safe_load=True),
                                                        strength, strength, filename=path)
    patcher.refresh_loras()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strength", refs.STRENGTHS)
def test_weights_match_reference_beside_a_plain_lora(host, tmp_path, strength):
    path, modules = refs.standard_file(tmp_path)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    got = _apply(host, model, [path, plain_path], strength)
    refs.assert_file_and_plain_lora_applied(got, before, modules, plain_update, strength)


def test_kohya_named_file_applies_the_same(host, tmp_path):
    _, modules = refs.standard_file(tmp_path)
    path = refs.write_tlora(str(tmp_path / "kohya.safetensors"), modules, kohya=True)
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    got = _apply(host, model, [path], 0.5)
    for prefix, tensors in modules.items():
        refs.assert_matches(got[prefix + ".weight"], refs.ref_patched(before[prefix + ".weight"], tensors, 0.5), prefix)


@pytest.mark.parametrize("strength", (0.0, -1.0, 0.5))
@pytest.mark.parametrize("family", sorted({f for fs in FAMILIES.values() for f in fs}))
def test_family_files_named_three_ways_through_the_hosts_key_map(host, tmp_path, family, strength):
    """Diffusers names (row slices of fused q/k/v), ComfyUI and kohya names, placed by the host's model_lora_keys_unet."""
    if family not in FAMILIES[host.name]:
        pytest.skip(f"{host.name} does not run {family}")
    model = refs.family_model(family, REPO.get((host.name, family)))
    path, made = refs.family_file(tmp_path, family)
    before = _state(model)
    got = _apply(host, model, [path], strength)
    refs.assert_family_applied(got, before, made, strength)


def test_a_module_that_does_not_fit_fails_the_file_before_anything_is_patched(host, tmp_path):
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module((4, 6, 3, 3), "trm:2", "lora:2", 2)}  # the model's conv has 8 inputs
    path = refs.write_tlora(str(tmp_path / "misfit.safetensors"), modules)
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    with pytest.raises(ValueError, match=r"does not fit this model: diffusion_model.conv: .*6-wide.*nothing of it was applied"):
        _apply(host, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_row_slice_that_does_not_fit_fails_the_file(host, tmp_path):
    """A diffusers-named module on 8 rows of a fused qkv, made for 6 rows: checked against the slice, not the weight."""
    from safetensors.torch import save_file
    model = refs.family_model("flux")
    tensors = refs.trained_module((6, 8), "trm:2", "lora:2", 3)
    path = str(tmp_path / "slice.safetensors")
    save_file({f"transformer.transformer_blocks.0.attn.to_q.{k}": v for k, v in tensors.items()}, path)
    before = _state(model)
    with pytest.raises(ValueError, match=r"does not fit this model: transformer.transformer_blocks.0.attn.to_q"):
        _apply(host, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_broken_module_is_reported_with_our_message(host, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = refs.standard_file(tmp_path)
    broken = str(tmp_path / "broken.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k != refs.CONV + ".tlora_scale"}, broken)
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    with pytest.raises(ValueError, match=r"broken TLoRA file: diffusion_model.conv: .*tlora_scale.*nothing of it was applied"):
        _apply(host, model, [broken], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_modules_that_match_no_layer_are_refused_not_skipped(host, tmp_path):
    """Forge applies a file with up to 12 unmatched keys (one TLoRA module has 3 to 8) and prints their names."""
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module(layers[refs.CONV].weight.shape, "trm:2", "lora:2", 2),
               "diffusion_model.elsewhere": refs.trained_module((8, 16), "trm:2", "tr:3", 3)}
    path = refs.write_tlora(str(tmp_path / "partly.safetensors"), modules)
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    with pytest.raises(ValueError, match=r"TLoRA 'partly.safetensors' does not fit this model: 1 of 3 modules did not "
                                         r"match \(1 not in this model, e.g. diffusion_model.elsewhere\)"):
        _apply(host, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_comfy_named_text_encoder_module_applies_through_forge_clip_key_map(host, tmp_path):
    """Forge's CLIP key map (the host's own model_lora_keys_clip) has kohya names only: ours are mapped."""
    from safetensors.torch import load_file
    lora, base = host.lora, host.base
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
    path = refs.write_mixed(str(tmp_path / "mixed.safetensors"), lora_name)
    model = refs.as_loaded(refs.tiny_model())
    before = _state(model)
    with pytest.raises(ValueError, match=f"also has {lora_name}.lora_up.weight, another adapter's tensor.*nothing of it"):
        _apply(host, model, [path], 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_startup_script_names_the_host_and_registers_once(host, capsys):
    """scripts/tlora_webui.py as the webui runs it (twice: reloads must not stack): one line, host and version."""
    refs.run_startup_script()
    out = capsys.readouterr()
    expected = {"forge": "Forge (2.0.1v1.10.1)", "ersatzforge": "ersatzForge (f2.ersatz)"}[host.name]
    line = f"[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) registered with {expected}: "
    assert out.out.count(line) == 2 and out.out.count("\n") == 2 and out.err == "", out
    priority = host.lora.lora_collection_priority
    assert sum(getattr(getattr(c, "load_lora", None), "_tlora_loader", False) for c in priority) == 1
    assert host.networks.load_lora_for_models.__wrapped__.__module__ == "networks"  # wrapped once
