"""SD.Next (snapshot in .host/webui/sdnext): TLoRA files through its native LoRA path, on real tiny diffusers pipelines.

Real host code: modules/lora/{lora_load (network_load, load_safetensors and its per-family dispatch), lora_common
(module_types), network, network_lora (the ordinary LoRA beside ours) and the other network_* types, lora_convert
(KeyConvert, assign_network_names_to_compvis_modules), lora_apply and networks (network_activate / network_deactivate in
fuse and backup modes), lora_overrides (which loader a model gets), lora_diffusers, lora_nunchaku, lora_timers,
lyco_helpers}, modules/errorlimiter.py, diffusers (the pipelines of harness/tiny_diffusers.py). Stood in, because they
are the webui's state, logging and model management: modules.{shared (opts, state, the loaded model and its type),
devices, errors, logger (its lines are kept for the asserts), sd_models (read_state_dict = safetensors' load_file, as
the real one reads .safetensors; offload calls do nothing), sd_models_compile, files_cache, hashes, sd_checkpoint
(the real reader of safetensors metadata is replaced by safetensors' own)}.

SD.Next's LoRA code imports diffusers: this module runs in the environment that has it (.venv-diffusers) and is skipped,
saying so, elsewhere.
"""
import contextlib
import io
import logging
import os
import types

import pytest
import torch

import webui_refs as refs

HOST = refs.host_dir("sdnext")
pytestmark = pytest.mark.skipif(HOST is None, reason="no SD.Next snapshot extracted (see the bootstrap's message)")
pytest.importorskip("diffusers.models.lora", reason="SD.Next's LoRA code imports diffusers: run tests/webui/test_sdnext.py in "
                                        ".venv-diffusers")
from harness import tiny_diffusers as td  # noqa: E402 (the repository root is on the path: webui_refs)

STRENGTHS = refs.STRENGTHS


class _Log(logging.Logger):
    """modules.logger.log: SD.Next's rich logger, kept as lines."""

    def __init__(self):
        super().__init__("sdnext-test")
        self.lines: list[str] = []

    def _log(self, level, msg, args, **kwargs):  # noqa: D401 - logging's hook
        self.lines.append(f"{logging.getLevelName(level)} {msg}")

    def trace(self, msg, *a, **k):
        self.lines.append(f"TRACE {msg}")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from rich.console import Console
    from safetensors import safe_open
    from safetensors.torch import load_file
    lora_dir = str(tmp_path_factory.mktemp("Lora"))
    with refs.isolated([HOST]):
        log = _Log()
        pkg = refs.stand_in("modules")
        pkg.__path__ = [os.path.join(HOST, "modules")]  # the real modules/lora/* and errorlimiter are found
        opts = types.SimpleNamespace(lora_fuse_native=True, lora_force_diffusers=False, lora_fuse_diffusers=False,
                                     diffusers_offload_mode="none", extra_networks_default_multiplier=1.0,
                                     lora_in_memory_limit=0, cuda_compile=[], hfcache_dir="", sdnq_svd_steps=0)
        shared = refs.stand_in(
            "modules.shared", opts=opts, sd_model=None, sd_model_type="none", sd_loaded=True, compiled_model_state=None,
            max_workers=1, cmd_opts=types.SimpleNamespace(lora_dir=lora_dir, no_metadata=False),
            state=types.SimpleNamespace(interrupted=False, begin=lambda *a, **k: None, end=lambda *a, **k: None),
            readfile=lambda *a, **k: {})
        refs.stand_in("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"), dtype=torch.float32,
                      inference_context=torch.no_grad)
        refs.stand_in("modules.errors", display=lambda e, *a, **k: log.lines.append(f"DISPLAY {e}"), get=lambda: [])
        refs.stand_in("modules.logger", log=log, console=Console(file=io.StringIO()))
        refs.stand_in("modules.sd_models", read_state_dict=lambda f, **k: load_file(f),
                      **{n: (lambda *a, **k: None) for n in ("disable_offload", "move_model", "set_diffuser_offload",
                                                              "get_diffusers_task", "unload_model_weights",
                                                              "reload_model_weights", "set_diffuser_pipe")},
                      apply_balanced_offload=lambda model, **k: model)
        refs.stand_in("modules.sd_models_compile")
        refs.stand_in("modules.files_cache", list_files=lambda *a, **k: [])
        refs.stand_in("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")

        def metadata(filename):
            with safe_open(filename, "pt") as handle:
                return handle.metadata() or {}

        refs.stand_in("modules.sd_checkpoint", read_metadata_from_safetensors=metadata)
        from modules.lora import lora_common, lora_load, network, networks
        from tlora_webui import sdnext
        sdnext.install()
        yield types.SimpleNamespace(shared=shared, log=log, common=lora_common, load=lora_load, network=network,
                                    networks=networks, opts=opts)


PIPES = {"sd": td.sd15, "sdxl": td.sdxl, "f1": td.flux, "sd3": td.sd3, "zimage": td.zimage}
_BUILT: dict = {}


@pytest.fixture
def pipe(host, request):
    """The tiny pipeline of the model type (request.param), built once, as SD.Next's current model; afterwards its
    weights are put back and SD.Next's marks on its layers (backups, applied names) removed."""
    if request.param not in _BUILT:
        with contextlib.redirect_stderr(io.StringIO()):
            built = PIPES[request.param](seed=0)
        _BUILT[request.param] = (built, {c: {k: v.clone() for k, v in m.state_dict().items()}
                                         for c, m in _components(built).items()})
    model, saved = _BUILT[request.param]
    host.shared.sd_model, host.shared.sd_model_type = model, request.param
    host.common.loaded_networks.clear()
    host.common.previously_loaded_networks = []
    host.load.lora_cache.clear()
    host.log.lines.clear()
    cls = {c: type(m) for c, m in _components(model).items()}
    yield model
    for comp, module in _components(model).items():
        module.__class__ = cls[comp]
        for layer in module.modules():
            for mark in ("network_weights_backup", "network_bias_backup", "network_current_names"):
                layer.__dict__.pop(mark, None)
        module.load_state_dict(saved[comp])


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if isinstance(getattr(pipe, c, None), torch.nn.Module)}


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in _components(pipe).items() for k, v in m.state_dict().items()}


def _activate(host, files, strength):
    """What extra_networks_lora.activate does for <lora:...> with the native method: load, deactivate the previous
    networks (fuse mode), activate."""
    names = []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        entry = host.network.NetworkOnDisk(name, path)
        host.load.available_networks[name] = host.load.available_network_aliases[name] = entry
        names.append(name)
    n = len(names)
    host.load.network_load(names, te_multipliers=[strength] * n, unet_multipliers=[strength] * n, dyn_dims=[None] * n,
                           activate=False)
    if host.common.previously_loaded_networks:
        host.networks.network_deactivate()
    host.networks.network_activate()
    host.common.previously_loaded_networks = host.common.loaded_networks.copy()


def _errors(host) -> list[str]:
    return [line for line in host.log.lines if line.startswith("ERROR")]


# ----- SD1.5 / SDXL: the UNet and CLIP, named three ways -----------------------------------------------------------
UNET_LIN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_CONV = "down_blocks.0.resnets.0.conv1"
UNET_PLAIN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
NAMES = {  # diffusers path -> the module's name in a file, by naming
    "comfy": {UNET_LIN: "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
              UNET_CONV: "diffusion_model.input_blocks.1.0.in_layers.2"},
    "kohya": {UNET_LIN: "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
              UNET_CONV: "lora_unet_down_blocks_0_resnets_0_conv1"},
    "diffusers": {UNET_LIN: "unet." + UNET_LIN, UNET_CONV: "unet." + UNET_CONV},
}


def _unet_file(tmp_path, pipe, naming: str):
    from safetensors.torch import save_file
    modules, tensors = {}, {}
    for seed, (path, name) in enumerate(NAMES[naming].items()):
        shape = tuple(pipe.unet.get_submodule(path).weight.shape)
        modules[path] = refs.trained_module(shape, "trm:2", "lora:2" if len(shape) == 4 else "tr:3", 30 + seed)
        tensors.update({f"{name}.{k}": v for k, v in modules[path].items()})
    file = str(tmp_path / f"tiny_{naming}.safetensors")
    save_file(tensors, file, metadata={"tlora.version": "1"})
    return file, modules


def _plain_lora(tmp_path, pipe):
    """An ordinary kohya LoRA on UNET_PLAIN (rank 2, alpha 1); its dense update at strength 1."""
    from safetensors.torch import save_file
    out_f, in_f = pipe.unet.get_submodule(UNET_PLAIN).weight.shape
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(out_f, 2, generator=gen), torch.randn(2, in_f, generator=gen)
    name = "lora_unet_" + UNET_PLAIN.replace(".", "_")
    path = str(tmp_path / "plain.safetensors")
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}, path)
    return path, (up.double() @ down.double()) * 0.5


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("naming", list(NAMES))
@pytest.mark.parametrize("pipe", ["sd", "sdxl"], indirect=True)
def test_unet_weights_match_reference_beside_a_plain_lora(host, pipe, tmp_path, naming, strength):
    path, modules = _unet_file(tmp_path, pipe, naming)
    plain, update = _plain_lora(tmp_path, pipe)
    before = _weights(pipe)
    _activate(host, [path, plain], strength)
    assert _errors(host) == [], host.log.lines
    got = _weights(pipe)
    for layer, tensors in modules.items():
        key = f"unet.{layer}.weight"
        if strength == 0:
            assert torch.equal(got[key], before[key]), f"{layer}: strength 0 is not the base weight"
        else:
            refs.assert_matches(got[key], refs.ref_patched(before[key], tensors, strength), layer)
    key = f"unet.{UNET_PLAIN}.weight"
    refs.assert_matches(got[key], before[key].double() + strength * update, "plain LoRA")


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_comfy_named_text_encoder_module(host, pipe, tmp_path):
    """`text_encoders.clip_l.transformer.<path>` (our trainer's names) reaches SD.Next's lora_te_ layer."""
    from safetensors.torch import save_file
    layer = next(n for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    w0 = pipe.text_encoder.get_submodule(layer).weight.detach().clone()
    tensors = refs.trained_module(tuple(w0.shape), "trm:2", "tr:2", 5)
    prefix = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    path = str(tmp_path / "te.safetensors")
    save_file({f"{prefix}.{k}": v for k, v in tensors.items()}, path)
    _activate(host, [path], 0.5)
    assert _errors(host) == [], host.log.lines
    refs.assert_matches(pipe.text_encoder.get_submodule(layer).weight, refs.ref_patched(w0, tensors, 0.5), prefix)


# ----- Flux.1 / SD3 (and Z-Image, a per-family native loader): fused ComfyUI modules on split diffusers layers ------
# model type -> (ComfyUI module of a fused q/k/v, its diffusers layers in row order, a whole module, its layer)
DITS = {
    "f1": ("diffusion_model.double_blocks.0.img_attn.qkv", ["transformer_blocks.0.attn.to_q",
           "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
           "lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0"),
    "sd3": ("diffusion_model.joint_blocks.0.x_block.attn.qkv", ["transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
            "transformer.transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff.net.2"),
    "zimage": ("diffusion_model.layers.0.attention.qkv", ["layers.0.attention.to_q", "layers.0.attention.to_k",
               "layers.0.attention.to_v"], "transformer.layers.0.feed_forward.w2", "layers.0.feed_forward.w2"),
}


@pytest.mark.parametrize("strength", (0.0, 1.0, -1.0))
@pytest.mark.parametrize("pipe", list(DITS), indirect=True)
def test_fused_comfy_module_on_split_diffusers_layers(host, pipe, tmp_path, strength):
    """The fused q/k/v module reaches the three diffusers layers, each with its rows of the fused reference
    (W_qkv = [W_q; W_k; W_v] patched as one weight); a kohya- or diffusers-named whole module beside it."""
    from safetensors.torch import save_file
    fused, parts, whole, whole_layer = DITS[host.shared.sd_model_type]
    t = pipe.transformer
    w_parts = [t.get_submodule(p).weight.detach().clone() for p in parts]
    w_fused = torch.cat(w_parts)
    w_whole = t.get_submodule(whole_layer).weight.detach().clone()
    a = refs.trained_module(tuple(w_fused.shape), "trm:2", "tr:3", 7)
    b = refs.trained_module(tuple(w_whole.shape), "trm:2", "lora:2", 8)
    path = str(tmp_path / "dit.safetensors")
    save_file({**{f"{fused}.{k}": v for k, v in a.items()}, **{f"{whole}.{k}": v for k, v in b.items()}}, path)
    _activate(host, [path], strength)
    assert _errors(host) == [], host.log.lines
    want = refs.ref_patched(w_fused, a, strength)
    start = 0
    for p, w0 in zip(parts, w_parts):
        got = t.get_submodule(p).weight
        if strength == 0:
            assert torch.equal(got, w0), p
        else:
            refs.assert_matches(got, want[start:start + len(w0)], p)
        start += len(w0)
    got = t.get_submodule(whole_layer).weight
    if strength == 0:
        assert torch.equal(got, w_whole)
    else:
        refs.assert_matches(got, refs.ref_patched(w_whole, b, strength), whole_layer)


# ----- modes: a strength change in backup mode, removal in fuse mode -----------------------------------------------
@pytest.mark.parametrize("fuse", [True, False], ids=["fuse", "backup"])
@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_a_strength_change_and_removal_start_from_the_base_weight(host, pipe, tmp_path, fuse):
    """Each TLoRA update is computed from W0: a second activation at another strength is not computed on the first's
    result, and taking the network away gives W0 back (fuse mode subtracts exactly what it added)."""
    host.opts.lora_fuse_native = fuse
    try:
        path, modules = _unet_file(tmp_path, pipe, "diffusers")
        before = _weights(pipe)
        _activate(host, [path], 1.0)
        _activate(host, [path], 0.5)
        got = _weights(pipe)
        for layer, tensors in modules.items():
            key = f"unet.{layer}.weight"
            refs.assert_matches(got[key], refs.ref_patched(before[key], tensors, 0.5), layer)
        _activate(host, [], 1.0)
        got = _weights(pipe)
        for layer in modules:
            key = f"unet.{layer}.weight"
            refs.assert_matches(got[key], before[key].double(), f"{layer} after removal")
        assert _errors(host) == [], host.log.lines
    finally:
        host.opts.lora_fuse_native = True


# ----- refusals: one line, nothing applied, the other networks still load -------------------------------------------
def _refused(host, pipe, path, words, plain=None):
    before = _weights(pipe)
    _activate(host, [path] + ([plain[0]] if plain else []), 1.0)
    errors = _errors(host)
    assert len(errors) == 1 and words in errors[0] and errors[0].count("\n") == 0, host.log.lines
    got = _weights(pipe)
    changed = {k for k in before if not torch.equal(before[k], got[k])}
    assert changed == ({f"unet.{UNET_PLAIN}.weight"} if plain else set()), changed


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_a_module_that_does_not_fit_refuses_the_file(host, pipe, tmp_path):
    from safetensors.torch import save_file
    tensors = refs.trained_module((32, 16), "trm:2", "tr:3", 1)  # to_q is 32 x 32
    path = str(tmp_path / "misfit.safetensors")
    save_file({f"unet.{UNET_LIN}.{k}": v for k, v in tensors.items()}, path)
    _refused(host, pipe, path, "TLoRA file does not fit this model: unet.down_blocks.0.attentions.0.transformer_"
             "blocks.0.attn1.to_q: does not fit weight (32, 32)", plain=_plain_lora(tmp_path, pipe))


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_a_broken_module_refuses_the_file(host, pipe, tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = _unet_file(tmp_path, pipe, "kohya")
    broken = str(tmp_path / "broken.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("conv1.tlora_scale")}, broken)
    _refused(host, pipe, broken, "broken TLoRA file: lora_unet_down_blocks_0_resnets_0_conv1: ")


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_modules_that_match_no_layer_refuse_the_file(host, pipe, tmp_path):
    """SD.Next logs unmatched keys as a warning count and applies the rest: a file for another model in part."""
    from safetensors.torch import load_file, save_file
    path, _ = _unet_file(tmp_path, pipe, "diffusers")
    extra = refs.trained_module((8, 16), "trm:2", "tr:3", 2)
    partly = str(tmp_path / "partly.safetensors")
    save_file({**load_file(path), **{f"unet.nowhere.{k}": v for k, v in extra.items()}}, partly)
    _refused(host, pipe, partly, "TLoRA 'partly.safetensors' does not fit this model: 1 of 3 modules did not match "
             "(1 not in this model, e.g. unet.nowhere)")


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_the_diffusers_method_refuses_the_file(host, pipe, tmp_path):
    """With 'LoRA load using Diffusers method' (or a model type without a native loader) the file would go to PEFT."""
    path, _ = _unet_file(tmp_path, pipe, "diffusers")
    host.opts.lora_force_diffusers = True
    try:
        before = _weights(pipe)
        _activate(host, [path], 1.0)
    finally:
        host.opts.lora_force_diffusers = False
    errors = _errors(host)
    assert any("transformed LoRA (TLoRA, arXiv 2501.08727) file tiny_diffusers.safetensors: SD.Next loads LoRAs for "
               "this sd model through diffusers/PEFT" in e for e in errors), host.log.lines
    got = _weights(pipe)
    assert all(torch.equal(before[k], got[k]) for k in before)


@pytest.mark.parametrize("pipe", ["zimage"], indirect=True)
def test_a_family_without_a_table_refuses_comfy_names_naming_the_family(host, pipe, tmp_path):
    """ComfyUI-named modules on a transformer the core has no table for (SD.Next's Anima and Krea 2): one line."""
    from safetensors.torch import save_file
    pipe.transformer.__class__ = type("Krea2Transformer2DModel", (type(pipe.transformer),), {})
    host.shared.sd_model_type = "krea2"
    tensors = refs.trained_module((8, 16), "trm:2", "tr:3", 2)
    path = str(tmp_path / "k2.safetensors")
    save_file({f"diffusion_model.blocks.0.attn.wq.{k}": v for k, v in tensors.items()}, path)
    before = _weights(pipe)
    _activate(host, [path], 1.0)
    errors = _errors(host)
    assert "SD.Next's krea2 model (Krea2Transformer2DModel) has no name table here; name them by diffusers path" \
        in errors[0], host.log.lines
    got = _weights(pipe)
    assert all(torch.equal(before[k], got[k]) for k in before)


@pytest.mark.parametrize("pipe", ["sd"], indirect=True)
def test_startup_script_names_sdnext_and_registers_once(host, pipe, capsys):
    refs.run_startup_script()
    out = capsys.readouterr()
    line = "[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) registered with SD.Next (2026-07-23): "
    assert out.out.count(line) == 2 and out.out.count("\n") == 2 and out.err == "", out
    assert sum(type(t).__name__ == "ModuleTypeTLoRA" for t in host.common.module_types) == 1
