"""Forge Neo (snapshot in .host/webui/forge-neo: a third-party copy of Haoming02's `neo` branch, 2026-02): TLoRA files
through Neo's own per-file loader and its ComfyUI-style adapter registry.

Real host code: extensions-builtin/sd_forge_lora/networks.py (load_lora_for_models: the key maps, load_lora,
add_patches, the nunchaku and int8 branches) and network.py; modules_forge.packages.comfy.{lora, weight_adapter,
utils} (key maps incl. the Flux, Flux.2, Z-Image and Qwen-Image diffusers names, the registry); backend.patcher.{base,
lora} (ModelPatcher, LoraLoader.refresh: merge_lora_to_weight, the GGUF dequantize/requantize, the online
mode); backend.operations (ForgeOperationsGGUF.Linear's forward with online patches); backend.operations_gguf and Neo's
bundled gguf (a Q8_0 weight). Stood in, because they are the webui's logging, state and UI: backend.logging (a rich
console handler), modules.{errors, scripts, sd_models, shared, cache, hashes}; and backend.patcher.clip.CLIP by `_Clip` (the
real one imports diffusers for its tokenizer holders). Models are stand-in model objects
holding real layers at each family's paths (what the key maps read: config.huggingface_repo, diffusion_model.config).
"""
import os
import types

import pytest
import torch

import webui_refs as refs

HOST = refs.host_dir("forge-neo")
pytestmark = pytest.mark.skipif(HOST is None, reason="no Forge Neo snapshot extracted (see the bootstrap's message)")
LORA_EXT = os.path.join(HOST or "", "extensions-builtin", "sd_forge_lora")
FAMILIES = ("flux", "flux2-klein", "z-image", "qwen-image")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    paths = [HOST, os.path.join(HOST, "modules_forge", "packages"), LORA_EXT]
    with refs.isolated(paths, extra_names=("network", "networks")):
        import backend.args
        backend.args.args.cpu = True  # this machine has no GPU: the host's own switch
        refs.stand_in("backend.logging", setup_logger=lambda *a, **k: None)
        import modules
        refs.stand_in("modules.errors", display=lambda *a, **k: None, report=lambda *a, **k: None)
        refs.stand_in("modules.scripts", scripts_txt2img=types.SimpleNamespace(infotext_fields=[]))
        refs.stand_in("modules.sd_models", read_metadata_from_safetensors=lambda f: {},
                      model_data=types.SimpleNamespace(get_sd_model=lambda: None))
        refs.stand_in("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
        refs.stand_in("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")
        refs.stand_in("modules.shared", cmd_opts=types.SimpleNamespace(
            lora_dir=str(tmp_path_factory.mktemp("Lora")), lora_dirs=[]), walk_files=lambda *a, **k: [])
        assert modules.shared.cmd_opts.lora_dirs == []
        import networks
        import modules_forge.packages.comfy.weight_adapter as weight_adapter
        from backend.patcher.base import ModelPatcher
        from tlora_webui import neo
        networks.dynamic_args["ops"] = "ForgeOperations"  # what Neo's operations set when a float model loads
        neo.install(weight_adapter, ModelPatcher, networks)
        yield types.SimpleNamespace(networks=networks, registry=weight_adapter, ModelPatcher=ModelPatcher)


class _Clip:
    """backend.patcher.clip.CLIP as far as the LoRA loader uses it (the real module imports diffusers for its
    tokenizer holders): the encoders under their names, a real ModelPatcher, clone and add_patches."""

    def __init__(self, patcher_cls, encoders, patcher=None):
        self.cond_stage_model = torch.nn.ModuleDict(encoders)
        self.patcher = patcher or patcher_cls(self.cond_stage_model, torch.device("cpu"), torch.device("cpu"))

    def clone(self):
        return _Clip(None, dict(self.cond_stage_model), self.patcher.clone())

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


def _load(host, model, files, strength, clip=None, online=False):
    """As Neo's load_networks: each file's state dict through load_lora_for_models, then the patcher's refresh."""
    from backend.utils import load_torch_file
    patcher = host.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    for path in files:
        patcher, clip = host.networks.load_lora_for_models(patcher, clip, load_torch_file(path, safe_load=True),
                                                           strength, strength, filename=path, online_mode=online)
    patcher.refresh_loras()
    if clip is not None:
        clip.patcher.refresh_loras()
    return patcher


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sd15(model):
    """The tiny model as Neo's key map reads an SD1.5 model."""
    model.diffusion_model.config = {}
    model.config = types.SimpleNamespace(huggingface_repo="runwayml/stable-diffusion-v1-5")
    return model


@pytest.mark.parametrize("strength", refs.STRENGTHS)
@pytest.mark.parametrize("kohya", [False, True], ids=["comfy-names", "kohya-names"])
def test_weights_match_reference_beside_a_plain_lora(host, tmp_path, strength, kohya):
    _, modules = refs.standard_file(tmp_path)
    path = refs.write_tlora(str(tmp_path / "tiny_tlora.safetensors"), modules, kohya=kohya)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    model = _sd15(refs.tiny_model())
    before = _state(model)
    _load(host, model, [path, plain_path], strength)
    refs.assert_file_and_plain_lora_applied(_state(model), before, modules, plain_update, strength)


@pytest.mark.parametrize("strength", (0.0, -1.0, 0.5))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_files_named_three_ways_through_neos_key_map(host, tmp_path, family, strength):
    """Diffusers names (row slices of fused q/k/v), ComfyUI and kohya names, placed by Neo's model_lora_keys_unet."""
    model = refs.family_model(family)
    path, made = refs.family_file(tmp_path, family)
    before = _state(model)
    _load(host, model, [path], strength)
    refs.assert_family_applied(_state(model), before, made, strength)


def test_comfy_named_text_encoder_module_through_neos_clip(host, tmp_path):
    """`text_encoders.clip_l.transformer...` (our trainer's names) through Neo's CLIP patcher and its clip key map."""
    encoder = holder = torch.nn.Module()
    for part in "transformer.text_model.encoder.layers.0.self_attn".split("."):
        holder.add_module(part, torch.nn.Module())
        holder = getattr(holder, part)
    holder.q_proj = q_proj = torch.nn.Linear(16, 16)
    clip = _Clip(host.ModelPatcher, {"clip_l": encoder})
    prefix = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    module = refs.trained_module(q_proj.weight.shape, "trm:2", "tr:2", 5)
    path = refs.write_tlora(str(tmp_path / "te.safetensors"), {prefix: module})
    w0 = q_proj.weight.detach().clone()
    _load(host, _sd15(refs.tiny_model()), [path], -1.0, clip=clip)
    refs.assert_matches(q_proj.weight.detach(), refs.ref_patched(w0, module, -1.0), prefix)


def _refused(host, model, path, words, strength=1.0):
    before = _state(model)
    with pytest.raises(ValueError, match=words):
        _load(host, model, [path], strength)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused file changed a weight"


def test_a_module_that_does_not_fit_fails_the_file(host, tmp_path):
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module((4, 6, 3, 3), "trm:2", "lora:2", 2)}  # the model's conv has 8 inputs
    _refused(host, _sd15(refs.tiny_model()), refs.write_tlora(str(tmp_path / "misfit.safetensors"), modules),
             r"does not fit this model: diffusion_model.conv: .*6-wide.*nothing of it was applied")


def test_a_broken_module_is_refused_with_our_message(host, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = refs.standard_file(tmp_path)
    broken = str(tmp_path / "broken.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k != refs.CONV + ".tlora_scale"}, broken)
    _refused(host, _sd15(refs.tiny_model()), broken,
             r"broken TLoRA file: diffusion_model.conv: .*tlora_scale.*nothing of it was applied")


def test_modules_that_match_no_layer_are_refused_not_skipped(host, tmp_path):
    """Neo loads a file with under half its keys unmatched and logs the count at info level: applied in part."""
    layers = refs.tiny_layers()
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module(layers[refs.CONV].weight.shape, "trm:2", "lora:2", 2),
               "diffusion_model.elsewhere": refs.trained_module((8, 16), "trm:2", "tr:3", 3)}
    _refused(host, _sd15(refs.tiny_model()), refs.write_tlora(str(tmp_path / "partly.safetensors"), modules),
             r"TLoRA 'partly.safetensors' does not fit this model: 1 of 3 modules did not match \(1 not in this "
             r"model, e.g. diffusion_model.elsewhere\)\. .*Nothing was applied")


@pytest.mark.parametrize("lora_name", [refs.LIN, refs.kohya(refs.LIN)], ids=["same-name", "kohya-name"])
def test_a_lora_and_a_tlora_for_one_weight_are_refused(host, tmp_path, lora_name):
    _refused(host, _sd15(refs.tiny_model()), refs.write_mixed(str(tmp_path / "mixed.safetensors"), lora_name),
             f"also has {lora_name}.lora_up.weight, another adapter's tensor.*nothing of it")


def test_a_newer_format_version_is_refused(host, tmp_path):
    from safetensors.torch import load_file, save_file
    from tlora import format as tformat
    path, _ = refs.standard_file(tmp_path)
    newer = str(tmp_path / "v99.safetensors")
    save_file(load_file(path), newer, metadata={**tformat.read_metadata(path), "tlora.version": "99"})
    _refused(host, _sd15(refs.tiny_model()), newer, "written in TLoRA format version 99")


@pytest.mark.parametrize("first", [True, False], ids=["other-first", "other-last"])
def test_another_adapter_claiming_our_module_is_refused_wherever_it_sits(host, tmp_path, first):
    """Neo's load_lora keeps the LAST claimant's patch: another pack's adapter taking `.tlora_*` keys would
    silently replace ours (listed after us) or be replaced (listed before): the file is refused either way."""
    base = host.registry.WeightAdapterBase

    class Greedy(base):
        name, loaded_keys = "greedy", set()

        @classmethod
        def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
            return cls() if f"{x}.tlora_scale" in lora else None

    adapters = host.registry.adapters
    adapters.insert(0, Greedy) if first else adapters.append(Greedy)
    try:
        path, _ = refs.standard_file(tmp_path)
        _refused(host, _sd15(refs.tiny_model()), path, r"module diffusion_model.\w+ is also claimed by the Greedy "
                 r"adapter .*nothing of it was applied")
    finally:
        adapters.remove(Greedy)


@pytest.mark.parametrize("flag, value, words", [
    ("nunchaku", True, r"runs this model through nunchaku \(SVDQuant\)"),
    ("ops", "ForgeOperationsInt8", r"runs this model's layers as int8 \(ForgeOperationsInt8\)")])
def test_quantized_paths_that_take_lora_factors_only_refuse_the_file(host, tmp_path, flag, value, words):
    """Neo's nunchaku and int8 branches hand the file to LoRA-only code (up/down/alpha): one line, nothing applied."""
    args = host.networks.dynamic_args
    saved = args.get(flag)
    args[flag] = value
    try:
        path, _ = refs.standard_file(tmp_path)
        _refused(host, _sd15(refs.tiny_model()), path,
                 f"transformed LoRA \\(TLoRA, arXiv 2501.08727\\) file tiny_tlora.safetensors: Forge Neo {words}.*"
                 f"Nothing of it was applied")
    finally:
        args[flag] = saved


def _gguf_layer(weight: torch.Tensor):
    """A ForgeOperationsGGUF.Linear holding `weight` as a Q8_0 ParameterGGUF, baked as Neo bakes it on load."""
    from backend.operations import ForgeOperationsGGUF
    from backend.operations_gguf import ParameterGGUF
    from modules_forge.packages import gguf
    data = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    raw = types.SimpleNamespace(tensor_type=gguf.GGMLQuantizationType.Q8_0, shape=list(reversed(weight.shape)), data=data)
    layer = ForgeOperationsGGUF.Linear()
    layer.weight = ParameterGGUF(raw)  # computation dtype float16, as Neo's loader gives a float32 request
    layer.weight.gguf_cls.bake(layer.weight)
    return layer


@pytest.mark.parametrize("strength", (1.0, -0.5))
def test_gguf_layer_in_online_mode_runs_the_reference_weight(host, tmp_path, strength):
    """Neo's online mode keeps a GGUF weight quantized and merges the patches at every forward: the layer's output
    is the dense reference of the dequantized weight, and the stored Q8_0 bytes are untouched."""
    from backend.operations_gguf import dequantize_tensor
    torch.manual_seed(3)
    model = torch.nn.Module()
    model.diffusion_model = torch.nn.Module()
    model.diffusion_model.lin = _gguf_layer(torch.randn(8, 32))
    model.diffusion_model.config, model.config = {}, types.SimpleNamespace(huggingface_repo="Chroma")
    stored = model.diffusion_model.lin.weight.data.clone()
    w0 = dequantize_tensor(model.diffusion_model.lin.weight).float().clone()
    tensors = refs.trained_module((8, 32), "trm:2", "tr:3", 4)
    path = refs.write_tlora(str(tmp_path / "g.safetensors"), {"diffusion_model.lin": tensors})
    _load(host, model, [path], strength, online=True)
    x = torch.randn(5, 32)
    got = model.diffusion_model.lin(x)
    want = torch.nn.functional.linear(x.double(), refs.ref_patched(w0, tensors, strength))
    refs.assert_matches(got, want, "GGUF online")
    assert torch.equal(model.diffusion_model.lin.weight.data, stored), "the stored GGUF bytes changed"


def test_startup_script_names_neo_and_registers_once(host, capsys):
    refs.run_startup_script()
    out = capsys.readouterr()
    line = "[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) registered with Forge Neo (neo): "
    assert out.out.count(line) == 2 and out.out.count("\n") == 2 and out.err == "", out
    assert [getattr(a, "name", None) for a in host.registry.adapters].count("transformed_lora") == 1
    assert host.networks.load_lora_for_models.__wrapped__.__module__ == "networks"  # wrapped once, not twice


def test_applied_modules_are_read_from_a_comfyui_style_patcher_too(host, tmp_path):
    """Neo builds whose ModelPatcher is ComfyUI's (one `patches` dict, no per-file `lora_patches`) are read as well:
    the check that every module became a patch must not refuse every file there."""
    from safetensors.torch import load_file
    from tlora_webui import perfile
    path, _ = refs.standard_file(tmp_path)
    patches, _ = host.networks.load_lora(load_file(path), refs.generic_key_map(refs.tiny_model()))
    comfy_style = types.SimpleNamespace(patches={k: [(1.0, v, 1.0, None, None)] for k, v in patches.items()})
    assert perfile.applied_modules([comfy_style, None], path) == {refs.LIN, refs.CONV}
