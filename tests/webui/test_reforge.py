"""reForge (snapshot in .host/webui/reforge): TLoRA files through its weight-adapter registry.

Real host code only, imported on its own (no stand-ins): ldm_patched.modules.weight_adapter,
lora.load_lora (key claiming), ModelPatcher.add_patches and lora.calculate_weight (the merge
ModelPatcher runs). The key map is written here in the host's generic form (model_lora_keys_unet
needs a full model config): {"diffusion_model.<path>": "diffusion_model.<path>.weight"} plus the
kohya form {"lora_unet_<path with _>": ...}, as that function builds it.
"""
import pytest
import torch

import webui_refs as refs

HOST = refs.host_dir("reforge")
pytestmark = pytest.mark.skipif(HOST is None, reason="no reForge snapshot extracted (see the bootstrap's message)")


@pytest.fixture(scope="module")
def host():
    with refs.isolated([HOST]):
        from ldm_patched.modules import args_parser
        args_parser.args.always_cpu = True  # this machine has no GPU: the host's own switch
        import ldm_patched.modules.lora as lora
        import ldm_patched.modules.model_patcher as model_patcher
        import ldm_patched.modules.weight_adapter as weight_adapter
        from tlora_webui import reforge
        reforge.install(weight_adapter, model_patcher.ModelPatcher, lora)
        yield lora, model_patcher


def _patched(lora, model_patcher, model, state, strength):
    patcher = model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patcher.add_patches(lora.load_lora(state, refs.generic_key_map(model)), strength)
    out = {}
    for key, patches in patcher.patches.items():
        w0 = model.state_dict()[key]
        out[key] = lora.calculate_weight(patches, w0.detach().float().clone(), key).to(w0.dtype)
    return out


@pytest.mark.parametrize("strength", refs.STRENGTHS)
def test_weights_match_reference_beside_a_plain_lora(host, tmp_path, strength):
    lora, model_patcher = host
    from safetensors.torch import load_file
    path, modules = refs.standard_file(tmp_path)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    model = refs.tiny_model()
    state = {**load_file(path), **load_file(plain_path)}
    got = _patched(lora, model_patcher, model, state, strength)
    assert set(got) == {refs.LIN + ".weight", refs.CONV + ".weight", refs.PLAIN + ".weight"}
    refs.assert_file_and_plain_lora_applied(got, model.state_dict(), modules, plain_update, strength)


def test_kohya_named_file_applies_the_same(host, tmp_path):
    lora, model_patcher = host
    from safetensors.torch import load_file
    _, modules = refs.standard_file(tmp_path)
    path = refs.write_tlora(str(tmp_path / "kohya.safetensors"), modules, kohya=True)
    model = refs.tiny_model()
    got = _patched(lora, model_patcher, model, load_file(path), 0.5)
    for prefix, tensors in modules.items():
        refs.assert_matches(got[prefix + ".weight"], refs.ref_patched(model.state_dict()[prefix + ".weight"],
                                                                      tensors, 0.5), prefix)


def test_a_module_that_does_not_fit_fails_the_file_before_anything_is_patched(host, tmp_path):
    lora, model_patcher = host
    from safetensors.torch import load_file
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module((4, 6, 3, 3), "trm:2", "lora:2", 2)}  # the model's conv has 8 inputs
    path = refs.write_tlora(str(tmp_path / "misfit.safetensors"), modules)
    model = refs.tiny_model()
    patcher = model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"does not fit this model: diffusion_model.conv: .*6-wide.*nothing of it was applied"):
        patcher.add_patches(lora.load_lora(load_file(path), refs.generic_key_map(model)), 1.0)
    assert patcher.patches == {}


def test_a_broken_module_is_reported_with_our_message(host, tmp_path):
    lora, _ = host
    from safetensors.torch import load_file
    path, _ = refs.standard_file(tmp_path)
    state = {k: v for k, v in load_file(path).items() if k != refs.CONV + ".tlora_scale"}
    with pytest.raises(ValueError, match=r"broken TLoRA file: diffusion_model.conv: .*tlora_scale.*nothing of it was applied"):
        lora.load_lora(state, refs.generic_key_map(refs.tiny_model()))


def test_modules_that_match_no_layer_are_refused_not_skipped(host, tmp_path):
    """reForge logs each key no adapter took ("lora key not loaded") and applies the rest: a file in part."""
    from safetensors.torch import load_file
    lora, _ = host
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               "diffusion_model.elsewhere": refs.trained_module((8, 16), "trm:2", "tr:3", 2)}
    path = refs.write_tlora(str(tmp_path / "partly.safetensors"), modules)
    with pytest.raises(ValueError, match=r"TLoRA 'this file' does not fit this model: 1 of 2 modules did not match "
                                         r"\(1 not in this model, e.g. diffusion_model.elsewhere\)"):
        lora.load_lora(load_file(path), refs.generic_key_map(refs.tiny_model()))


def test_webui_script_detects_reforge_and_registers_once(host, capsys):
    """scripts/tlora_webui.py, as the webui runs it at start-up (run twice: reloads must not stack): one line."""
    import ldm_patched.modules.weight_adapter as weight_adapter
    refs.run_startup_script()
    out = capsys.readouterr()
    line = "[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) registered with reForge (1.0.0v2-v1.10.1RC): "
    assert out.out.count(line) == 2 and out.out.count("\n") == 2 and out.err == "", out
    assert [a.name for a in weight_adapter.adapters].count("transformed_lora") == 1


@pytest.mark.parametrize("lora_name", [refs.LIN, refs.kohya(refs.LIN)], ids=["same-name", "kohya-name"])
def test_a_lora_and_a_tlora_for_one_weight_are_refused(host, tmp_path, lora_name):
    """The registry's last adapter to claim a module wins: the LoRA half was dropped without a word."""
    lora, _ = host
    from safetensors.torch import load_file
    state = load_file(refs.write_mixed(str(tmp_path / "mixed.safetensors"), lora_name))
    with pytest.raises(ValueError, match=f"also has {lora_name}.lora_up.weight, another adapter's tensor.*nothing of it"):
        lora.load_lora(state, refs.generic_key_map(refs.tiny_model()))


def test_one_module_under_two_names_is_refused(host, tmp_path):
    """Both names are in the key map: each claimed its copy and the last one patched the weight."""
    lora, _ = host
    from safetensors.torch import load_file
    state = load_file(refs.write_twice(str(tmp_path / "twice.safetensors")))
    with pytest.raises(ValueError, match=f"module {refs.LIN} is given twice \\(also as {refs.kohya(refs.LIN)}\\)"):
        lora.load_lora(state, refs.generic_key_map(refs.tiny_model()))
