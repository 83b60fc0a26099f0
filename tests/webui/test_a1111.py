"""A1111 1.10.1 (snapshot in .host/webui/a1111): TLoRA files through extensions-builtin/Lora.

Real host code: networks.py (load_networks, load_network, network_apply_weights), network.py
(NetworkOnDisk, NetworkModule), network_lora.py, lora_patches.py, modules/patches.py and the
real read_metadata_from_safetensors (taken from modules/sd_models.py's source). Stood in, because
they pull in gradio, the webui's start-up state and the separately cloned `ldm`, are only these
infrastructure modules: gradio, modules.{shared, devices, errors (records display/report), cache,
hashes, scripts, sd_hijack, textual_inversion.textual_inversion, models.sd3.mmdit} and
modules.sd_models (read_state_dict = safetensors.torch.load_file, as the real one does for
.safetensors). The model is a stand-in shared.sd_model holding real Linear/Conv2d layers in its
network_layer_mapping (what assign_network_names_to_compvis_modules builds on a real model).
"""
import ast
import os
import sys
import types

import pytest
import torch

import webui_refs as refs

HOST = refs.host_dir("a1111")
pytestmark = pytest.mark.skipif(HOST is None, reason="no A1111 snapshot extracted (see the bootstrap's message)")
LORA_DIR = os.path.join(HOST or "", "extensions-builtin", "Lora")
HOST_MODULES = ("gradio", "modules", "networks", "network", "network_lora", "network_glora", "network_hada",
                "network_ia3", "network_lokr", "network_full", "network_norm", "network_oft", "lora_patches",
                "lyco_helpers", "lora_logger", "extra_networks_lora")


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _real_function(path, name, namespace):
    """One function of a host file, compiled from its own source (the rest of the file needs the webui)."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], []), path, "exec"), namespace)
    return namespace[name]


class _Errors:
    def __init__(self):
        self.shown = []

    def display(self, e, task, **_):
        self.shown.append(f"{task}: {e}")

    def report(self, message, exc_info=False):
        self.shown.append(message)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from safetensors.torch import load_file
    saved = {k: sys.modules[k] for k in list(sys.modules) if k.split(".")[0] in HOST_MODULES}
    for name in saved:
        del sys.modules[name]
    errors = _Errors()
    _module("gradio", Warning=lambda *a, **k: None)
    pkg = _module("modules")
    pkg.__path__ = [os.path.join(HOST, "modules")]  # so the real modules.patches is found
    opts = types.SimpleNamespace(lora_functional=False, lora_in_memory_limit=0, lora_preferred_name="Alias from file",
                                 lora_not_found_warning_console=False, lora_not_found_gradio_warning=False,
                                 lora_bundled_ti_to_infotext=False)
    shared = _module("modules.shared", opts=opts, sd_model=None, cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path_factory.mktemp("Lora")), lyco_dir_backcompat=""),
                     walk_files=lambda *a, **k: [])
    devices = _module("modules.devices", cpu=torch.device("cpu"), dtype=torch.float32, torch_gc=lambda: None,
                      cond_cast_unet=lambda x: x)
    sd_models = _module("modules.sd_models", read_state_dict=lambda f, **k: load_file(f))
    sd_models.read_metadata_from_safetensors = _real_function(
        os.path.join(HOST, "modules", "sd_models.py"), "read_metadata_from_safetensors", {"errors": errors})
    _module("modules.errors", display=errors.display, report=errors.report)
    _module("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    _module("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")
    _module("modules.scripts")
    embedding_db = types.SimpleNamespace(word_embeddings={}, expected_shape=-1, skipped_embeddings={},
                                         register_embedding_by_name=lambda *a: None)
    _module("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=embedding_db, comments=[]))
    _module("modules.textual_inversion")
    _module("modules.textual_inversion.textual_inversion")
    _module("modules.models")
    _module("modules.models.sd3")
    _module("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
    for name in [k for k in sys.modules if k.startswith("modules.")]:  # attributes, as real imports set them
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.path.insert(0, LORA_DIR)
    try:
        import network
        import networks
        from tlora_webui import a1111
        a1111.install(networks, network, sd_models)
        yield types.SimpleNamespace(networks=networks, network=network, shared=shared, errors=errors)
    finally:
        sys.path.remove(LORA_DIR)
        for name in [k for k in sys.modules if k.split(".")[0] in HOST_MODULES]:
            del sys.modules[name]
        sys.modules.update(saved)


def _model(host):
    """Layers by A1111 layer name (a real model's network_layer_mapping uses the compvis path with _)."""
    layers = refs.tiny_layers()
    mapping = {}
    for path, layer in layers.items():
        layer.network_layer_name = path.replace(".", "_")
        mapping[layer.network_layer_name] = layer
    host.shared.sd_model = types.SimpleNamespace(network_layer_mapping=mapping, is_sdxl=False)
    return layers


def _apply(host, layers, files, strength):
    """What the webui does for <lora:name:strength> per file: load_networks, then each layer's apply."""
    nets = host.networks
    nets.networks_in_memory.clear()
    names = []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        entry = host.network.NetworkOnDisk(name, path)
        nets.available_networks[name] = nets.available_network_aliases[name] = entry
        names.append(name)
    nets.load_networks(names, te_multipliers=[strength] * len(names), unet_multipliers=[strength] * len(names),
                       dyn_dims=[None] * len(names))  # as extra_networks_lora passes them
    with torch.no_grad():
        for layer in layers.values():
            nets.network_apply_weights(layer)
    return {path + ".weight": layer.weight.detach().clone() for path, layer in layers.items()}


@pytest.mark.parametrize("kohya", [False, True], ids=["comfy-names", "kohya-names"])
@pytest.mark.parametrize("strength", refs.STRENGTHS)
def test_weights_match_reference_beside_a_plain_lora(host, tmp_path, strength, kohya):
    _, modules = refs.standard_file(tmp_path)
    path = refs.write_tlora(str(tmp_path / "tiny_tlora.safetensors"), modules, kohya=kohya)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    layers = _model(host)
    before = {p + ".weight": layer.weight.detach().clone() for p, layer in layers.items()}
    host.errors.shown.clear()
    got = _apply(host, layers, [path, plain_path], strength)
    assert host.errors.shown == []
    assert [n.name for n in host.networks.loaded_networks] == ["tiny_tlora", "plain"]
    refs.assert_file_and_plain_lora_applied(got, before, modules, plain_update, strength)


def test_a_module_that_does_not_fit_is_reported_and_nothing_applied(host, tmp_path):
    layers = _model(host)
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               refs.CONV: refs.trained_module((4, 6, 3, 3), "trm:2", "lora:2", 2)}  # the model's conv has 8 inputs
    path = refs.write_tlora(str(tmp_path / "misfit.safetensors"), modules)
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    before = {p + ".weight": layer.weight.detach().clone() for p, layer in layers.items()}
    host.errors.shown.clear()
    got = _apply(host, layers, [path, plain_path], 1.0)
    assert len(host.errors.shown) == 1
    assert "loading network" in host.errors.shown[0] and "misfit.safetensors" in host.errors.shown[0]
    assert "does not fit this model: lora_unet_conv: does not fit weight (4, 8, 3, 3): transform is 6-wide" in host.errors.shown[0]
    assert [n.name for n in host.networks.loaded_networks] == ["plain"]
    for prefix in (refs.LIN, refs.CONV):
        assert torch.equal(got[prefix + ".weight"], before[prefix + ".weight"]), f"{prefix} was patched"
    refs.assert_matches(got[refs.PLAIN + ".weight"], before[refs.PLAIN + ".weight"].double() + plain_update, "plain")


def test_a_broken_module_is_reported_with_our_message(host, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = refs.standard_file(tmp_path)
    broken = str(tmp_path / "broken.safetensors")
    save_file({k: v for k, v in load_file(path).items() if k != refs.CONV + ".tlora_scale"}, broken)
    layers = _model(host)
    host.errors.shown.clear()
    _apply(host, layers, [broken], 1.0)
    assert len(host.errors.shown) == 1 and "broken TLoRA file: lora_unet_conv" in host.errors.shown[0]
    assert "tlora_scale" in host.errors.shown[0] and host.networks.loaded_networks == []


def test_card_metadata_is_read_from_our_file(host, tmp_path):
    path, _ = refs.standard_file(tmp_path)
    entry = host.network.NetworkOnDisk("tiny_tlora", path)
    # The card's "Kohya module:" row; not "tlora", which a T-LoRA (timestep LoRA) trainer writes.
    assert entry.metadata["ss_network_module"] == "transformed_lora"
    assert entry.metadata["modelspec.description"].startswith("transformed LoRA (TLoRA, arXiv 2501.08727)")
    assert entry.metadata["ss_base_model_version"] == "sd_v1"
    assert entry.sd_version == host.network.SdVersion.SD1
    assert entry.metadata["modelspec.title"] == "tiny"


def test_comfy_named_text_encoder_module_is_renamed_and_applied(host, tmp_path):
    """`text_encoders.clip_l.transformer.<path>` (as our trainer writes) reaches the layer A1111 names
    transformer_text_model_..., through the kohya name the host's own converter understands."""
    layer = torch.nn.Linear(16, 16)
    layer.network_layer_name = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    host.shared.sd_model = types.SimpleNamespace(network_layer_mapping={layer.network_layer_name: layer}, is_sdxl=False)
    prefix = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    module = refs.trained_module(layer.weight.shape, "trm:2", "tr:2", 5)
    path = refs.write_tlora(str(tmp_path / "te.safetensors"), {prefix: module})
    w0 = layer.weight.detach().clone()
    host.errors.shown.clear()
    got = _apply(host, {prefix: layer}, [path], 0.5)
    assert host.errors.shown == []
    refs.assert_matches(got[prefix + ".weight"], refs.ref_patched(w0, module, 0.5), prefix)


def test_functional_mode_forward_matches_the_reference_layer(host, tmp_path):
    """A1111's "Lora: use old method" (lora_functional): network_forward adds module.forward(x, y)."""
    path, modules = refs.standard_file(tmp_path)
    layers = _model(host)
    host.networks.networks_in_memory.clear()
    entry = host.network.NetworkOnDisk("tiny_tlora", path)
    host.networks.available_networks["tiny_tlora"] = host.networks.available_network_aliases["tiny_tlora"] = entry
    host.networks.load_networks(["tiny_tlora"], te_multipliers=[-1.0], unet_multipliers=[-1.0], dyn_dims=[None])
    torch.manual_seed(4)
    inputs = {refs.LIN: torch.randn(3, 16), refs.CONV: torch.randn(2, 8, 5, 5)}
    with torch.no_grad():
        for prefix, x in inputs.items():
            layer = layers[prefix]
            got = host.networks.network_forward(layer, x, type(layer).forward)
            w = refs.ref_patched(layer.weight, modules[prefix], -1.0)
            if w.dim() == 2:
                want = torch.nn.functional.linear(x.double(), w, layer.bias.double())
            else:
                want = torch.nn.functional.conv2d(x.double(), w, layer.bias.double(), padding=1)
            refs.assert_matches(got, want, prefix)


# ----- one adapter per weight, a known format, every module placed (issue 28) --------------------------------------
def _refused(host, layers, path, words):
    """The file fails to load with our one-line reason; no layer changes."""
    before = {p + ".weight": layer.weight.detach().clone() for p, layer in layers.items()}
    host.errors.shown.clear()
    got = _apply(host, layers, [path], 1.0)
    assert len(host.errors.shown) == 1 and words in host.errors.shown[0], host.errors.shown
    assert host.networks.loaded_networks == []
    assert all(torch.equal(got[k], before[k]) for k in before), "a refused file changed a weight"


@pytest.mark.parametrize("lora_name", [refs.LIN, refs.kohya(refs.LIN)], ids=["same-name", "kohya-name"])
def test_a_lora_and_a_tlora_for_one_weight_are_refused(host, tmp_path, lora_name):
    """A1111 let its LoRA module type claim the module and dropped the TLoRA half without a word."""
    path = refs.write_mixed(str(tmp_path / "mixed.safetensors"), lora_name)
    _refused(host, _model(host), path, f"also has {lora_name}.lora_up.weight, another adapter's tensor")


def test_one_module_under_two_names_is_refused(host, tmp_path):
    """Renamed to kohya names, the two copies of LIN became one key and one copy was applied silently."""
    _refused(host, _model(host), refs.write_twice(str(tmp_path / "twice.safetensors")),
             f"module {refs.LIN} is given twice (also as {refs.kohya(refs.LIN)})")


def test_a_newer_format_version_is_refused(host, tmp_path):
    from safetensors.torch import load_file, save_file
    from tlora import format as tformat
    path, _ = refs.standard_file(tmp_path)
    save_file(load_file(path), str(tmp_path / "v99.safetensors"), metadata={**tformat.read_metadata(path),
                                                                          "tlora.version": "99"})
    _refused(host, _model(host), str(tmp_path / "v99.safetensors"), "written in TLoRA format version 99")


def test_modules_that_match_no_layer_are_refused_not_skipped(host, tmp_path):
    """A1111 logs unmatched keys at debug level only: a file for another model applied in part."""
    layers = _model(host)
    modules = {refs.LIN: refs.trained_module(layers[refs.LIN].weight.shape, "trm:2", "tr:3", 1),
               "diffusion_model.elsewhere": refs.trained_module((8, 16), "trm:2", "tr:3", 2)}
    path = refs.write_tlora(str(tmp_path / "partly.safetensors"), modules)
    _refused(host, layers, path, "1 of 2 modules match no layer of this model (e.g. lora_unet_elsewhere)")


def test_a_header_nested_too_deeply_is_one_line_not_a_recursion_error(host, tmp_path):
    """The webui reads every listed file's header for its cards; json's RecursionError was printed with a traceback."""
    import struct
    header = b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    host.errors.shown.clear()
    host.network.NetworkOnDisk("deep", str(path))
    assert len(host.errors.shown) == 1, host.errors.shown
    assert "deep.safetensors: its safetensors header is JSON nested too deeply" in host.errors.shown[0]
    assert "ecursion" not in host.errors.shown[0]


def test_startup_script_names_a1111_and_registers_once(host, capsys):
    """scripts/tlora_webui.py as the webui runs it after the Lora extension (twice: a reload must not stack)."""
    refs.run_startup_script()
    out = capsys.readouterr()
    line = "[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) registered with A1111 (1.10.1): "
    assert out.out.count(line) == 2 and out.out.count("\n") == 2 and out.err == "", out
    assert sum(type(t).__name__ == "ModuleTypeTLoRA" for t in host.networks.module_types) == 1


def test_startup_without_a_lora_loader_is_one_line_not_a_traceback(host, capsys, monkeypatch):
    """A webui with none of the loaders (the Lora extension disabled): one line on stderr saying why."""
    monkeypatch.delitem(sys.modules, "networks")
    refs.run_startup_script(times=1)
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out
    assert out.err.startswith("[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) not enabled: this webui has none "
                              "of the LoRA loaders it registers with")


def test_files_are_told_apart_by_keys_not_by_ss_network_module(host, tmp_path):
    """A file of ours written before the rename (ss_network_module "tlora") still applies as TLoRA; a T-LoRA file
    (ordinary LoRA keys, and the same "tlora" that a T-LoRA trainer writes) stays the host's ordinary LoRA."""
    from safetensors.torch import load_file, save_file
    path, modules = refs.standard_file(tmp_path)
    old = str(tmp_path / "old_tlora.safetensors")
    save_file(load_file(path), old, metadata={"tlora.version": "1", "ss_network_module": "tlora"})
    plain_path, plain_update = refs.write_plain_lora(str(tmp_path / "plain.safetensors"))
    timestep = str(tmp_path / "timestep_lora.safetensors")
    save_file(load_file(plain_path), timestep, metadata={"ss_network_module": "tlora",
                                                         "ss_network_args": '{"algo": "tlora", "min_rank": 1}'})
    layers = _model(host)
    before = {p + ".weight": layer.weight.detach().clone() for p, layer in layers.items()}
    host.errors.shown.clear()
    got = _apply(host, layers, [old, timestep], 1.0)
    assert host.errors.shown == []
    refs.assert_file_and_plain_lora_applied(got, before, modules, plain_update, 1.0)
