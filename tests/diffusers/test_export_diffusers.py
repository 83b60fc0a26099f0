"""An exported LoRA loaded by diffusers' own `load_lora_weights` (issue 27), and the binding's export_lora.

SD1.5: the checkpoint ComfyUI's save path writes (tests/diffusers/export_refs.py, run in .venv), exported
by `python -m tlora export-lora`, loaded into the same checkpoint through diffusers' single-file
conversion. SD1.5, SDXL and Flux: `trainer.diffusers.export.export_lora` on tiny pipelines. References
are independent of the code under test: the float64 dense W0 T + s Delta of tests/host/tlora_refs.py on
the base weights as the checkpoint or the live modules hold them, and torch.linalg.svd of that reference
delta; the LoRA files are read by diffusers (PEFT) and fused, or by ComfyUI's (alpha / rank) up @ down rule.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from comfyui_tlora.tlora import arch  # noqa: E402
from comfyui_tlora.tlora import diffusers_names as N  # noqa: E402
from comfyui_tlora.tlora.cli import main  # noqa: E402
from comfyui_tlora.trainer.diffusers import apply as A  # noqa: E402
from comfyui_tlora.trainer.diffusers.export import export_lora  # noqa: E402
from tests.diffusers import diffusers_refs as D  # noqa: E402
from tests.diffusers import export_refs as E  # noqa: E402
from tests.host import tlora_refs as R  # noqa: E402

os.environ.setdefault("TLORA_AUTOTUNE", "0")
torch.set_num_threads(1)
RANK = 3


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(delta.shape)


def _module(roots, path: str) -> torch.nn.Module:
    comp, _, sub = path.partition(".")
    return roots[comp].get_submodule(A.resolve_path(roots[comp], sub))


def _fused_equal_reference(pipe, roots, w0s: dict, adapters: dict, rank: int, what: str) -> None:
    """After load_lora_weights + fuse_lora, each diffusers module holds the rows of W0 + the truncated SVD."""
    _, live = A.arch_of(roots)
    rows = N.diffusers_rows(live)
    for generic, adapter in adapters.items():
        w0 = w0s[generic]
        want = w0.double() + _truncated(R.ref_target(w0, adapter.tensors) - w0.double(), rank)
        for path, pieces in rows[generic]:
            got = _module(roots, path).weight
            ref = want if pieces is None else torch.cat([want[o:o + c] for o, c in pieces])
            R.assert_close64(got, ref, f"{what} {generic} -> {path}")


class _Tensors:
    """A module's file tensors, as tests/host/tlora_refs.py's references take them (`.tensors`)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}


def _lora_rule(path) -> dict[str, torch.Tensor]:
    """{kohya name: (alpha / rank) up @ down} (ComfyUI's rule) from a LoRA file."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    names = {k[:-len(".lora_up.weight")] for k in sd if k.endswith(".lora_up.weight")}
    return {n: float(sd[f"{n}.alpha"]) / sd[f"{n}.lora_down.weight"].shape[0] *
            (sd[f"{n}.lora_up.weight"].double().flatten(1) @ sd[f"{n}.lora_down.weight"].double().flatten(1))
            for n in names}


# --------------------------------------------------------------------------- SD1.5: the ComfyUI checkpoint
@pytest.fixture(scope="module")
def comfy_sd15(tmp_path_factory):
    if not (E.ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the ComfyUI environment .venv is missing (make bootstrap)")
    return E.run_comfy_sd15(tmp_path_factory.mktemp("export_comfy"))


def test_sd15_checkpoint_export_loads_in_diffusers(comfy_sd15, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness import tiny_diffusers as td
    info = comfy_sd15
    lora = tmp_path / "sd15_lora.safetensors"
    assert main(["export-lora", info["tlora"], "--base", info["ckpt"], "--rank", str(RANK), "-o", str(lora),
                 "--no-progress"]) == 0
    ckpt = load_file(info["ckpt"])
    unet = UNet2DConditionModel.from_single_file(
        info["ckpt"], config=str(D.write_config(tmp_path / "unet", UNet2DConditionModel, D.SD15_UNET)),
        local_files_only=True)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4)).eval()
    prefix = "cond_stage_model.transformer."
    own = te.state_dict()  # transformers 5 names them without `text_model.`
    te_sd = {k[len(prefix):] if k[len(prefix):] in own else k[len(prefix):].removeprefix("text_model."): v.float()
             for k, v in ckpt.items() if k.startswith(prefix)}
    missing = te.load_state_dict(te_sd, strict=False).missing_keys
    assert not [k for k in missing if k.endswith(".weight")], missing
    pipe = td.sd15(unet=D.SD15_UNET)
    pipe.register_modules(unet=unet, text_encoder=te)
    roots = {"unet": unet, "text_encoder": te}
    from safetensors.torch import load_file as read
    adapters = {}  # the file's own tensors per module (the references read them, never the core)
    for key, value in read(info["tlora"]).items():
        module, _, suffix = key.rpartition(".tlora_")
        adapters.setdefault(module, _Tensors()).tensors["tlora_" + suffix] = value
    w0s = {g: (ckpt["model." + g + ".weight"] if g.startswith("diffusion_model.") else
               ckpt["cond_stage_model." + g.removeprefix("text_encoders.clip_l.") + ".weight"]).float()
           for g in adapters}
    # The binding on the live pipeline writes the same LoRA as the command line on the checkpoint.
    binding = tmp_path / "binding.safetensors"
    result = export_lora(pipe, info["tlora"], binding, rank=RANK, progress=False)
    assert result.summary()["modules"] == len(adapters)
    rows = N.diffusers_rows(A.arch_of(roots)[1])
    # kohya's SD1 names are its diffusers-layout ones (what diffusers' SD1 loader reads), CLIP's as kohya spells them.
    kohya = {("lora_unet_" + rows[g][0][0].removeprefix("unet.").replace(".", "_") if g.startswith("diffusion_model.")
              else arch.kohya_name(g, "sd15")): g for g in adapters}
    assert set(_lora_rule(binding)) == set(kohya) == set(_lora_rule(lora))
    for name, delta in _lora_rule(binding).items():
        generic = kohya[name]
        want = _truncated(R.ref_target(w0s[generic], adapters[generic].tensors) - w0s[generic].double(), RANK)
        torch.testing.assert_close(delta.reshape(want.shape), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    pipe.load_lora_weights(str(lora), adapter_name="exported")
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["exported"])
    _fused_equal_reference(pipe, roots, w0s, adapters, RANK, "sd15 diffusers")


# --------------------------------------------------------------------------- SDXL and Flux: the binding
def _live_generic_w0(roots, generic: str, rows) -> torch.Tensor:
    parts = [(_module(roots, p).weight.detach().clone(), pieces) for p, pieces in rows[generic]]
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    n = sum(w.shape[0] for w, _ in parts)
    out = torch.empty((n,) + tuple(parts[0][0].shape[1:]))
    for w, pieces in parts:
        at = 0
        for o, c in pieces:
            out[o:o + c] = w[at:at + c]
            at += c
    return out


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_binding_export_loads_in_diffusers(family, tmp_path):
    from harness import tiny_diffusers as td
    pipe = td.sdxl(seed=0) if family == "sdxl" else td.flux(seed=0)
    roots = {c: m for c, m in pipe.components.items() if c in ("unet", "transformer", "text_encoder", "text_encoder_2")
             and isinstance(m, torch.nn.Module)}
    _, live = A.arch_of(roots)
    rows = N.diffusers_rows(live)
    table = {name: shape for name, shape, group in live.denoiser_modules()}
    if family == "sdxl":
        shapes = {n: s for n, s, g in live.denoiser_modules() if g == "attn"}
        shapes = dict(list(shapes.items())[:8])
        shapes.update({n: s for n, s, g in live.denoiser_modules() if n.endswith("input_blocks.1.0.in_layers.2")})
        for te in live.text_encoders:
            shapes.update({n: s for n, s, _ in arch.text_encoder_modules(te) if ".layers.1." in n})
    else:
        # diffusers' kohya Flux conversion splits linear1 at Flux.1's 3072 widths: a tiny twin cannot take it.
        shapes = {n: s for n, s, g in live.denoiser_modules()
                  if (g == "attn" and not n.endswith("linear1")) or n.endswith("final_layer.adaLN_modulation.1")}
    assert all(table.get(n, s) == s for n, s in shapes.items())
    adapters = R.random_adapters(shapes, seed=4)
    w0s = {g: _live_generic_w0(roots, g, rows) for g in shapes}
    if family == "flux":  # the fused q/k/v rows, and the modulation whose halves diffusers swaps
        b = "transformer.transformer_blocks.0.attn"
        torch.testing.assert_close(w0s["diffusion_model.double_blocks.0.img_attn.qkv"],
                                   torch.cat([_module(roots, f"{b}.{p}").weight for p in ("to_q", "to_k", "to_v")]))
        scale, shift = _module(roots, "transformer.norm_out.linear").weight.chunk(2)
        torch.testing.assert_close(w0s["diffusion_model.final_layer.adaLN_modulation.1"], torch.cat([shift, scale]))
    src = R.write_tlora(tmp_path / f"{family}.safetensors", adapters)
    out = tmp_path / f"{family}_lora.safetensors"
    result = export_lora(pipe, src, out, rank=RANK, progress=False)
    assert result.summary()["modules"] == len(shapes) and max(result.summary()["ranks"]) == RANK
    final = "diffusion_model.final_layer.adaLN_modulation.1"
    if family == "flux":
        # diffusers 0.42's kohya Flux conversion drops this module's LoRA (its keys lose the `transformer.`
        # prefix): the file itself is checked by ComfyUI's rule, against the generic (shift, scale) weight.
        delta = _lora_rule(out)["lora_unet_final_layer_adaLN_modulation_1"]
        want = _truncated(R.ref_target(w0s[final], adapters[final].tensors) - w0s[final].double(), RANK)
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)
    pipe.load_lora_weights(str(out), adapter_name="exported")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"] if family == "sdxl" else ["transformer"],
                   adapter_names=["exported"])
    _fused_equal_reference(pipe, roots, w0s, {g: a for g, a in adapters.items() if g != final}, RANK,
                           f"{family} diffusers")


def test_binding_refuses_a_file_for_another_model(tmp_path):
    from harness import tiny_diffusers as td
    pipe = td.sd15(seed=0)
    bad = R.write_tlora(tmp_path / "bad.safetensors",
                        {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q":
                         R.random_adapter((32, 7), "none", "lora:2", seed=1)})
    with pytest.raises(Exception) as err:
        export_lora(pipe, bad, tmp_path / "out.safetensors", rank=2, progress=False)
    assert "does not fit" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()
