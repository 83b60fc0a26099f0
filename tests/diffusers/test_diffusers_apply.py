"""TLoRA files applied to real diffusers models (trainer/diffusers/inference/) and the one name mapping.

References are independent of the code under test: ComfyUI's own key maps and patched weights
(the same checkpoint, saved by ComfyUI's classes, loaded in both hosts: diffusers through its
own single-file conversion), the float64 dense W0 T + s Delta of tests/host/tlora_refs.py, the
base model's exact weights after unfuse, and the diffusers model structure itself.
Runs only in `.venv-diffusers`.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from comfyui_tlora.tlora import arch  # noqa: E402
from comfyui_tlora.tlora import diffusers_names as N  # noqa: E402
from comfyui_tlora.trainer.diffusers import inference as A  # noqa: E402
from tests.diffusers import diffusers_refs as D  # noqa: E402
from tests.host import tlora_refs as R  # noqa: E402

os.environ.setdefault("TLORA_AUTOTUNE", "0")  # the cost model picks forms: no timing on a shared machine
torch.set_num_threads(1)


def _module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(A.resolve_path(root, path))


def _rows_of(weight: torch.Tensor, pieces) -> torch.Tensor:
    return weight if pieces is None else torch.cat([weight[o:o + c] for o, c in pieces])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the mapping
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """What ComfyUI 0.3.75 (.venv) wrote: per family checkpoint, TLoRA file, patched weights; its key maps."""
    if not D.COMFY_PYTHON.exists():
        pytest.skip("the ComfyUI environment .venv is missing (make bootstrap)")
    return D.run_comfy_side(tmp_path_factory.mktemp("comfy_side"))


@pytest.mark.parametrize("arch_name", ["sd15", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large"])
def test_mapping_is_comfyuis_key_map(comfy, arch_name):
    """Every denoiser module maps as ComfyUI's unet/flux/mmdit_to_diffusers says (slices and swaps included)."""
    theirs = comfy["maps"][arch_name]
    rows = N.diffusers_rows(arch_name)
    component = N.denoiser_component(arch_name) + "."
    checked = 0
    for generic, targets in rows.items():
        if not generic.startswith(arch.UNET_PREFIX):
            continue
        for path, pieces in targets:
            key, span = theirs[path.removeprefix(component) + ".weight"]
            assert key == generic.removeprefix(arch.UNET_PREFIX) + ".weight", path
            if pieces is None:
                assert span is None, path
            elif len(pieces) == 1:
                assert span == list(pieces[0]), path
            else:
                h = pieces[1][1]
                assert span == "swap" and pieces == ((h, h), (0, h)), path
            checked += 1
    assert checked >= len([g for g in rows if g.startswith(arch.UNET_PREFIX)])
    assert set(rows) == set(arch.all_modules(arch_name))  # every module any preset can target
    contiguous = N.diffusers_map(arch_name)
    assert set(contiguous) | set(N.unmapped(arch_name)) == set(rows)


def _released(arch_name: str):
    """The released diffusers models built on the meta device from their published configs."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        if arch_name == "sd15":
            den = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        elif arch_name == "sdxl":
            den = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                       "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
        elif arch_name == "flux":
            den = FluxTransformer2DModel(guidance_embeds=True)
        else:
            depth = 38 if arch_name == "sd35-large" else 24
            den = SD3Transformer2DModel(
                sample_size=128, num_layers=depth, attention_head_dim=64, num_attention_heads=depth,
                caption_projection_dim=64 * depth, pooled_projection_dim=2048, joint_attention_dim=4096,
                pos_embed_max_size=192, dual_attention_layers=tuple(range(13)) if arch_name == "sd35-medium" else ())
        comps = {N.denoiser_component(arch_name): den}
        for te in arch.ARCHS[arch_name].text_encoders:
            comps[N.TEXT_ENCODER_COMPONENT[te.name]] = CLIPTextModel(CLIPTextConfig(
                hidden_size=te.width, intermediate_size=te.mlp, num_hidden_layers=te.layers,
                num_attention_heads=te.width // 64))
    return comps


@pytest.mark.parametrize("arch_name", ["sd15", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large"])
def test_mapping_names_real_diffusers_modules(arch_name):
    """Each mapped path is a Linear/Conv2d of the released diffusers model with the generic weight's rows/shape."""
    comps = _released(arch_name)
    shapes = arch.all_modules(arch_name)
    for generic, targets in N.diffusers_rows(arch_name).items():
        rows = 0
        for path, pieces in targets:
            comp, _, sub = path.partition(".")
            module = _module(comps[comp], sub)
            assert isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)), path
            w = tuple(module.weight.shape)
            assert w[1:] == tuple(shapes[generic][1:]), path
            rows += w[0]
            if pieces is not None:
                assert sum(c for _, c in pieces) == w[0], path
        assert rows == shapes[generic][0], generic
        if len(targets) == 1 and targets[0][1] is None:
            assert N.generic_name(arch_name, targets[0][0]) == generic
        else:
            assert all(N.generic_name(arch_name, p) is None for p, _ in targets)
    # The tables our host side builds from a live model are the released ones.
    family, built = A.arch_of(comps)
    assert N.diffusers_rows(built) == N.diffusers_rows(arch_name)


# --------------------------------------------------------------------------- cross-host
def test_sd15_same_checkpoint_same_patched_weights(comfy, tmp_path):
    """ComfyUI-saved SD1.5 checkpoint: diffusers' from_single_file + our TLoRA fuse == ComfyUI's TLoRA loader."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel
    info = comfy["sd15"]
    unet = UNet2DConditionModel.from_single_file(
        info["ckpt"], config=str(D.write_config(tmp_path / "unet", UNet2DConditionModel, D.SD15_UNET)),
        local_files_only=True)
    ckpt, patched = load_file(info["ckpt"]), load_file(info["patched"])
    te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)).eval().to(torch.float16)  # ComfyUI's CLIP dtype
    prefix = "cond_stage_model.transformer."  # the CLIP of an SD1.x checkpoint is the HF model under this prefix
    te_sd = {A.resolve_path(te, k[len(prefix):]): v for k, v in ckpt.items() if k.startswith(prefix)}
    missing = te.load_state_dict(te_sd, strict=False).missing_keys
    assert not [k for k in missing if k.endswith(".weight")], missing
    roots = {"unet": unet, "text_encoder": te}
    _, live = A.arch_of(roots)
    rows = N.diffusers_rows(live)
    for generic, targets in rows.items():  # diffusers' own conversion agrees with the mapping on the base
        source = ckpt["model." + generic + ".weight"] if generic.startswith("diffusion") else \
            ckpt["cond_stage_model." + generic.removeprefix("text_encoders.clip_l.") + ".weight"]
        for path, pieces in targets:
            comp, _, sub = path.partition(".")
            assert torch.equal(_module(roots[comp], sub).weight, _rows_of(source, pieces)), path
    base = {c: _weights(m) for c, m in roots.items()}
    pipe = type("Pipe", (), {"components": roots})()
    handle = A.load_tlora(pipe, info["tlora"], strength=D.STRENGTH)
    assert handle.modules == len(rows) and not handle.skipped
    A.fuse(pipe)
    for generic, targets in rows.items():
        for path, pieces in targets:
            comp, _, sub = path.partition(".")
            got = _module(roots[comp], sub).weight
            want = _rows_of(patched[generic + ".weight"], pieces)
            if generic.startswith("diffusion"):  # the file really changes every weight
                assert not torch.equal(patched[generic + ".weight"], ckpt["model." + generic + ".weight"]), generic
            rtol, atol = (1e-5, 1e-6) if got.dtype == torch.float32 else R.tolerance(got.dtype)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{generic} -> {path}: {m}")
    A.unfuse(pipe)
    for comp, model in roots.items():
        after = _weights(model)
        assert after.keys() == base[comp].keys()
        assert all(torch.equal(after[k], base[comp][k]) for k in after), comp
    handle.remove()
    assert not any(isinstance(m, A.WRAPPERS) for r in roots.values() for m in r.modules())


def test_sd3_same_checkpoint_same_patched_weights(comfy, tmp_path):
    """ComfyUI-saved SD3.5-medium-like twin (q/k/v slices, attn2, swapped modulations) through diffusers' conversion."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    info = comfy["sd3"]
    model = SD3Transformer2DModel.from_single_file(
        info["ckpt"], config=str(D.write_config(tmp_path / "sd3", SD3Transformer2DModel, D.SD3)),
        local_files_only=True)
    ckpt, patched = load_file(info["ckpt"]), load_file(info["patched"])
    base = _weights(model)
    rows = N.diffusers_rows(A.arch_of({"transformer": model})[1])
    assert any(len(p or ()) == 2 for t in rows.values() for _, p in t)  # the swapped modulations are covered
    for generic, targets in rows.items():
        for path, pieces in targets:
            assert torch.equal(model.get_submodule(path.partition(".")[2]).weight,
                               _rows_of(ckpt["model." + generic + ".weight"], pieces)), path
    A.load_tlora(model, info["tlora"], strength=D.STRENGTH)
    x = torch.randn(3, 128)
    attn = model.transformer_blocks[0].attn
    before_fuse = attn.to_k(x)
    A.fuse(model)
    for generic, targets in rows.items():
        for path, pieces in targets:
            torch.testing.assert_close(model.get_submodule(path.partition(".")[2]).weight,
                                       _rows_of(patched[generic + ".weight"], pieces), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{generic} -> {path}: {m}")
    torch.testing.assert_close(attn.to_k(x), before_fuse, rtol=1e-4, atol=1e-5)  # activation side == fused
    A.unfuse(model)
    assert all(torch.equal(v, base[k]) for k, v in _weights(model).items())


# --------------------------------------------------------------------------- Flux: dense reference
def test_flux_generic_file_against_the_dense_reference(tmp_path):
    """Flux: diffusers' single-file conversion is fixed at 3072 wide (no tiny twin converts), so the tiny
    FluxTransformer2DModel is checked against the float64 dense W0 T + s Delta of the generic weights,
    built by ComfyUI's flux_to_diffusers rule (q, k, v rows of qkv; q, k, v, mlp of linear1; swapped final modulation)."""
    from diffusers import FluxTransformer2DModel
    model = D.seeded(0, lambda: FluxTransformer2DModel(**D.FLUX))
    h = 128
    cfg = arch.FluxConfig(hidden=h, depth=1, depth_single=1, in_channels=64, context=64, vec=32)
    b, s = "transformer_blocks.0", "single_transformer_blocks.0"
    fused = {"diffusion_model.double_blocks.0.img_attn.qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
             "diffusion_model.double_blocks.0.txt_attn.qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj",
                                                              f"{b}.attn.add_v_proj"],
             "diffusion_model.single_blocks.0.linear1": [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v",
                                                         f"{s}.proj_mlp"]}
    shapes = {name: shape for name, shape, _ in cfg.modules()}
    adapters = R.random_adapters(shapes, seed=3)
    path = R.write_tlora(tmp_path / "flux.safetensors", adapters)
    base = _weights(model)
    live = A.arch_of({"transformer": model})[1]
    sources = {g: t for g, t in N.diffusers_rows(live).items()}

    def generic_w0(generic):
        if generic in fused:
            return torch.cat([base[p + ".weight"] for p in fused[generic]])
        if generic.endswith("final_layer.adaLN_modulation.1"):
            scale, shift = base["norm_out.linear.weight"].chunk(2)
            return torch.cat([shift, scale])
        (target, _), = sources[generic]
        return base[target.partition(".")[2] + ".weight"]

    handle = A.load_tlora(model, path, strength=0.6)
    assert handle.modules == len(shapes)
    x = torch.randn(4, h, dtype=torch.float32)
    for generic, targets in sources.items():
        ref = R.ref_patched(generic_w0(generic), adapters[generic].tensors, 0.6)
        if generic.endswith("final_layer.adaLN_modulation.1"):
            shift, scale = ref.chunk(2)
            ref = torch.cat([scale, shift])
            targets = [(targets[0][0], None)]
        offset = 0
        for target, pieces in targets:
            module = model.get_submodule(target.partition(".")[2])
            n = module.weight.shape[0]
            want = ref[offset:offset + n] if generic in fused else ref
            offset += n
            inp = torch.randn(4, module.weight.shape[1])
            bias = module.bias.double() if module.bias is not None else 0
            torch.testing.assert_close(module(inp).double(), inp.double() @ want.t() + bias, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"activation side {generic} -> {target}: {m}")
            A.fuse(model)
            R.assert_close64(module.weight, want, f"fused {generic} -> {target}")
            A.unfuse(model)
    assert all(torch.equal(v, base[k]) for k, v in _weights(model).items())
    del x


# --------------------------------------------------------------------------- strength, stacking, errors
@pytest.fixture
def sd15_pipe():
    from harness import tiny_diffusers as td
    return td.sd15(seed=0)


def _unet_linears(unet, count=None):
    names = [n for n, m in unet.named_modules() if n.endswith((".to_q", ".to_v", ".proj_in", ".ff.net.2"))]
    return names[:count]


def test_strength_at_run_time_and_two_adapters_stack_in_order(sd15_pipe, tmp_path):
    """Activation side at any strength; A then B is B applied to the weight A gives (ComfyUI's patch order)."""
    unet = sd15_pipe.unet
    paths = _unet_linears(unet)
    shapes = {f"unet.{p}": tuple(unet.get_submodule(p).weight.shape) for p in paths}
    file_a = R.write_tlora(tmp_path / "a.safetensors", R.random_adapters(shapes, seed=1))
    file_b = R.write_tlora(tmp_path / "b.safetensors", R.random_adapters(shapes, seed=2))
    from safetensors.torch import load_file
    ta, tb = load_file(file_a), load_file(file_b)

    def tensors(sd, prefix):
        return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}

    base = _weights(unet)
    a = A.load_tlora(sd15_pipe, file_a, name="a", strength=1.0)
    b = A.load_tlora(sd15_pipe, file_b, name="b", strength=0.5)
    assert A.adapters(sd15_pipe) == {"a": 1.0, "b": 0.5}
    for sa in (1.0, -0.5):
        a.strength = sa
        for p in paths:
            module = unet.get_submodule(p)
            w0 = base[p + ".weight"]
            w_a = R.ref_patched(w0, tensors(ta, f"unet.{p}"), sa)
            want = R.ref_patched(w_a, tensors(tb, f"unet.{p}"), 0.5)
            x = torch.randn(2, 3, w0.shape[1]) if w0.dim() == 2 else torch.randn(1, w0.shape[1], 4, 4)
            out = module(x).double()
            bias = None if module.bias is None else module.bias.double()
            ref = (torch.nn.functional.linear(x.double(), want, bias) if w0.dim() == 2 else
                   torch.nn.functional.conv2d(x.double(), want, bias))
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{p} at {sa}: {m}")
    A.fuse(sd15_pipe)
    with pytest.raises(A.TLoRAError, match="unfuse"):
        a.strength = 0.3
    p = paths[0]
    want = R.ref_patched(R.ref_patched(base[p + ".weight"], tensors(ta, f"unet.{p}"), -0.5),
                         tensors(tb, f"unet.{p}"), 0.5)
    R.assert_close64(unet.get_submodule(p).weight, want, "fused a then b")
    A.unfuse(sd15_pipe)
    assert all(torch.equal(v, base[k]) for k, v in _weights(unet).items())
    a.remove()  # b alone stays, now on W0
    assert A.adapters(sd15_pipe) == {"b": 0.5}
    A.fuse(sd15_pipe)
    R.assert_close64(unet.get_submodule(p).weight, R.ref_patched(base[p + ".weight"], tensors(tb, f"unet.{p}"), 0.5),
                     "b alone")
    A.unfuse(sd15_pipe)
    A.remove(sd15_pipe)
    assert all(torch.equal(v, base[k]) for k, v in _weights(unet).items())
    assert not any(isinstance(m, A.WRAPPERS) for m in unet.modules())


def _peft_lora(unet, paths, rank=2, seed=0):
    """A diffusers/PEFT-format LoRA state dict {unet.<path>.lora_A/B.weight} and its dense B A per path."""
    g = torch.Generator().manual_seed(seed)
    sd, dense = {}, {}
    for p in paths:
        w = unet.get_submodule(p).weight
        down = 0.2 * torch.randn(rank, w.shape[1], generator=g)
        up = 0.2 * torch.randn(w.shape[0], rank, generator=g)
        sd[f"unet.{p}.lora_A.weight"], sd[f"unet.{p}.lora_B.weight"] = down, up
        dense[p] = up.double() @ down.double()  # alpha = rank: scale 1
    return sd, dense


@pytest.mark.parametrize("order", ["tlora_first", "lora_first"])
def test_diffusers_load_lora_weights_beside_a_tlora(sd15_pipe, tmp_path, order):
    """pipe.load_lora_weights works with a TLoRA applied, either order: the LoRA goes beside (W0 T + s Delta + B A)."""
    from peft.utils import get_peft_model_state_dict
    unet = sd15_pipe.unet
    paths = [n for n, _ in unet.named_modules() if n.endswith((".attn1.to_q", ".attn2.to_v"))]
    shapes = {f"unet.{p}": tuple(unet.get_submodule(p).weight.shape) for p in paths}
    adapters = R.random_adapters(shapes, seed=4)
    file = R.write_tlora(tmp_path / "t.safetensors", adapters)
    lora, dense = _peft_lora(unet, paths)
    base = _weights(unet)
    if order == "tlora_first":
        A.load_tlora(sd15_pipe, file, name="t")
        sd15_pipe.load_lora_weights(dict(lora), adapter_name="plain")
    else:
        sd15_pipe.load_lora_weights(dict(lora), adapter_name="plain")
        A.load_tlora(sd15_pipe, file, name="t")
    for p in paths:
        w0 = base[p + ".weight"]
        t = adapters[f"unet.{p}"].tensors
        want = R.ref_patched(w0, t, 1.0) + dense[p]  # the LoRA beside the TLoRA, whatever the order
        x = torch.randn(2, w0.shape[1])
        bias = unet.get_submodule(p).bias
        want_out = torch.nn.functional.linear(x.double(), want, None if bias is None else bias.double())
        torch.testing.assert_close(unet.get_submodule(p)(x).double(), want_out, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{order} {p}: {m}")
    peft_sd = get_peft_model_state_dict(unet, adapter_name="plain")
    assert peft_sd and all(".lora_A." in k or ".lora_B." in k for k in peft_sd), sorted(peft_sd)[:4]
    assert len(peft_sd) == 2 * len(paths)
    A.fuse(sd15_pipe)  # ours first, then PEFT's: the LoRA merges onto W0 T + s Delta
    sd15_pipe.fuse_lora(adapter_names=["plain"])
    p = paths[0]
    R.assert_close64(unet.get_submodule(p).weight,
                     R.ref_patched(base[p + ".weight"], adapters[f"unet.{p}"].tensors, 1.0) + dense[p],
                     "tlora fused, then lora fused", rtol=1e-4, atol=1e-5)
    with pytest.raises(A.TLoRAError, match="changed after fuse"):  # PEFT's merge is still in the weight
        A.unfuse(sd15_pipe)
    sd15_pipe.unfuse_lora()
    A.unfuse(sd15_pipe)
    assert all(torch.equal(unet.get_submodule(q).weight, base[q + ".weight"]) for q in paths)  # bit for bit
    sd15_pipe.unload_lora_weights()
    A.remove(sd15_pipe, "t")
    after = _weights(unet)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_peft_custom_module_registration(sd15_pipe, tmp_path):
    """register_peft: a user's LoraConfig targets TLoRA-wrapped layers; the PEFT state dict holds only LoRA tensors."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    unet = sd15_pipe.unet
    paths = [n for n, _ in unet.named_modules() if n.endswith(".attn1.to_q")]
    shapes = {f"unet.{p}": tuple(unet.get_submodule(p).weight.shape) for p in paths}
    A.load_tlora(sd15_pipe, R.write_tlora(tmp_path / "t.safetensors", R.random_adapters(shapes, seed=5)))
    config = A.register_peft(LoraConfig(r=2, target_modules=["to_q"]))
    inject_adapter_in_model(config, unet, adapter_name="mine")
    sd = get_peft_model_state_dict(unet, adapter_name="mine")
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd), sorted(sd)[:4]
    assert not any("tlora" in k or ".base." in k for k in unet.state_dict())


def test_refused_files_name_the_file_and_module_and_apply_nothing(sd15_pipe, tmp_path):
    unet = sd15_pipe.unet
    p = _unet_linears(unet, 1)[0]
    shape = tuple(unet.get_submodule(p).weight.shape)
    good = {f"unet.{p}": R.random_adapter(shape, seed=1)}
    cases = {
        "missing": {**good, "diffusion_model.nowhere.to_q": R.random_adapter((8, 8), seed=2)},
        "shape": {**good, f"unet.{_unet_linears(unet)[1]}": R.random_adapter((shape[0] + 1, shape[1]), seed=3)},
        "twice": {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": R.random_adapter((32, 32), seed=4),
                  "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": R.random_adapter((32, 32), seed=5)},
    }
    before = [type(m) for m in unet.modules()]
    for label, adapters in cases.items():
        file = R.write_tlora(tmp_path / f"{label}.safetensors", adapters)
        with pytest.raises(A.TLoRAApplyError) as err:
            A.load_tlora(sd15_pipe, file)
        message = str(err.value)
        assert "\n" not in message and f"{label}.safetensors" in message and "Nothing was applied" in message, message
        assert [type(m) for m in unet.modules()] == before, label
    (tmp_path / "plain.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(A.TLoRAApplyError, match="plain.safetensors"):
        A.load_tlora(sd15_pipe, tmp_path / "plain.safetensors")
    A.load_tlora(sd15_pipe, R.write_tlora(tmp_path / "ok.safetensors", good), name="x")
    with pytest.raises(A.TLoRAApplyError, match="already applied"):
        A.load_tlora(sd15_pipe, tmp_path / "ok.safetensors", name="x")
