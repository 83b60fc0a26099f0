"""A TLoRA exported as an ordinary LoRA, loaded by the host's stock LoraLoader (issue 27).

Tiny SD1.5, SDXL and Flux twins from the host's classes, saved with the host's own save path
(`comfy.sd.save_checkpoint`); the export reads that file (`python -m tlora export-lora`) or the
live MODEL/CLIP (the `TLoRAExportLoRA` node). References are independent of the code under test:
the float64 dense W0 T + s Delta of tests/host/tlora_refs.py on the live model's base weights, and
torch.linalg.svd of that reference delta; the exported file is only ever read by the stock loader.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.host import tlora_refs as R
from tlora.cli import main

RANK = 3
H_FLUX = 128  # the tiny Flux twin's width
# Flux q/k/v as the diffusers command-line trainer names them: row thirds of the fused img_attn.qkv.
FLUX_SLICES = [f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
FLUX_QKV = "diffusion_model.double_blocks.0.img_attn.qkv"


def _te_modules(clip, names=("self_attn.q_proj", "self_attn.k_proj", "mlp.fc1")) -> dict[str, tuple]:
    sd = clip.cond_stage_model.state_dict()
    return {f"text_encoders.{k[:-len('.weight')]}": tuple(v.shape) for k, v in sd.items()
            if k.endswith(".weight") and ".layers.0." in k and k[:-len(".weight")].endswith(names)}


@pytest.fixture(scope="module", params=["sd15", "sdxl", "flux"])
def twin(request, tm, tmp_path_factory):
    """(family, patcher, clip or None, checkpoint path, {file module: weight shape}, adapters)."""
    import comfy.sd
    family = request.param
    if family == "sd15":
        t, clip = tm.tiny_sd15(seed=0), tm.tiny_clip(seed=1, kind="sd15", hidden=64, layers=2)
    elif family == "sdxl":
        t, clip = tm.tiny_sdxl(seed=0), tm.tiny_clip(seed=1, kind="sdxl", hidden=64, layers=3)
    else:
        t, clip = tm.tiny_dit("flux", seed=0), None
    sd = t.model.state_dict()
    if family == "flux":
        paths = ["double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear1",
                 "single_blocks.0.linear2"]
    else:
        paths = [p.removeprefix("diffusion_model.") for p in t.attention_modules()][:6]
        paths += ["input_blocks.1.0.in_layers.2"]  # a 3x3 conv
    shapes = {f"diffusion_model.{p}": tuple(sd[f"diffusion_model.{p}.weight"].shape) for p in paths}
    if clip is not None:
        shapes.update(_te_modules(clip))
    adapters = R.random_adapters(shapes, seed=5)
    if family == "flux":
        adapters.update({n: R.random_adapter((H_FLUX, H_FLUX), "trm:2", "lora:2", seed=20 + i)
                         for i, n in enumerate(FLUX_SLICES)})
    folder = tmp_path_factory.mktemp(f"export_{family}")
    ckpt = folder / f"{family}.safetensors"
    comfy.sd.save_checkpoint(str(ckpt), t.patcher, clip)
    if clip is not None:
        import comfy.utils
        from safetensors.torch import load_file
        saved = load_file(str(ckpt))
        if not any(k.startswith(("cond_stage_model.", "conditioner.")) for k in saved):
            # ComfyUI 0.12.1's ModelPatcher.state_dict_for_saving drops the CLIP it is handed: add it through
            # the same host path the other versions take (the model's state_dict_for_saving).
            clip_sd = clip.get_sd() if hasattr(clip, "get_sd") else clip.state_dict_for_saving()
            saved.update(t.model.state_dict_for_saving({}, clip_sd))
            comfy.utils.save_torch_file({k: v.contiguous() for k, v in saved.items()}, str(ckpt))
    return family, t.patcher, clip, ckpt, adapters


def _live_w0(patcher, clip, module: str) -> torch.Tensor:
    """A module's base weight as the live model holds it (generic name)."""
    if module.startswith("text_encoders."):
        return clip.cond_stage_model.state_dict()[module.removeprefix("text_encoders.") + ".weight"].detach().clone()
    return patcher.model.state_dict()[module + ".weight"].detach().clone()


def _expected(patcher, clip, adapters, rank: int | None) -> dict[str, torch.Tensor]:
    """{weight key: W0 + the rank-r truncated SVD of the float64 reference delta} (rank None: the full delta)."""
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, adapter in adapters.items():
        if module in FLUX_SLICES:
            continue
        w0 = _live_w0(patcher, clip, module)
        deltas[module] = (w0, R.ref_target(w0, adapter.tensors) - w0.double())
    if any(m in FLUX_SLICES for m in adapters):  # the slices are rows of the fused weight: one delta for it
        w0 = _live_w0(patcher, clip, FLUX_QKV)
        rows = [R.ref_target(w0[i * H_FLUX:(i + 1) * H_FLUX], adapters[n].tensors) - w0[i * H_FLUX:(i + 1) * H_FLUX]
                .double() for i, n in enumerate(FLUX_SLICES)]
        deltas[FLUX_QKV] = (w0, torch.cat(rows))
    out = {}
    for module, (w0, delta) in deltas.items():
        matrix = delta.reshape(w0.shape[0], -1)
        if rank is not None:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            matrix = (u[:, :rank] * s[:rank]) @ vh[:rank]
        key = module.removeprefix("text_encoders.") + ".weight"
        out[key] = w0.double() + matrix.reshape(w0.shape)
    return out


def _stock_patched(patcher, clip, name: str, keys) -> dict[str, torch.Tensor]:
    unet_keys = [k for k in keys if k.startswith("diffusion_model.")]
    if clip is None:
        return R.patched_weights(R.stock_model_only(patcher, name, 1.0), unet_keys)
    model, clip2 = R.stock_full(patcher, clip, name, 1.0, 1.0)
    got = R.patched_weights(model, unet_keys)
    got.update(R.clip_patched_weights(clip2, [k for k in keys if k not in unet_keys]))
    return got


def _check(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        R.assert_close64(got[key], value, f"{what} {key}")


def test_cli_export_loads_in_the_stock_loader_as_the_truncated_svd(twin, loras_dir):
    family, patcher, clip, ckpt, adapters = twin
    R.write_tlora(loras_dir / f"t_{family}.safetensors", adapters)
    for rank, label in ((RANK, "low"), (100000, "full")):
        out = loras_dir / f"exp_{family}_{label}.safetensors"
        assert main(["export-lora", str(loras_dir / f"t_{family}.safetensors"), "--base", str(ckpt),
                     "--rank", str(rank), "-o", str(out), "--no-progress"]) == 0
        want = _expected(patcher, clip, adapters, None if label == "full" else rank)
        got = _stock_patched(patcher, clip, out.name, list(want))
        _check(got, want, f"{family} stock loader, rank {rank}:")
    # At full rank the LoRA is the TLoRA: the same weights as our loader patches with the TLoRA itself.
    if clip is None:
        ours = R.patched_weights(R.tlora_model_only(patcher, f"t_{family}.safetensors", 1.0), list(want))
    else:
        model, clip2 = R.tlora_full(patcher, clip, f"t_{family}.safetensors", 1.0, 1.0)
        ours = R.patched_weights(model, [k for k in want if k.startswith("diffusion_model.")])
        ours.update(R.clip_patched_weights(clip2, [k for k in want if not k.startswith("diffusion_model.")]))
    for key in want:
        torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=2e-5, msg=lambda m: f"{family} {key}: {m}")


def test_node_exports_from_the_live_model(twin, loras_dir):
    family, patcher, clip, _, adapters = twin
    R.write_tlora(loras_dir / f"n_{family}.safetensors", adapters)
    node = R.loader("TLoRAExportLoRA")
    kwargs = dict(model=patcher, adapter_name=f"n_{family}.safetensors", rank=RANK, max_error=0.05,
                  filename_prefix=f"node_{family}/lora")
    if clip is not None:
        kwargs["clip"] = clip
    report = node.execute(**kwargs).result[0]
    written = sorted(os.listdir(loras_dir / f"node_{family}"))
    assert written == ["lora_00001_.safetensors"] and "relative error" in report
    want = _expected(patcher, clip, adapters, RANK)
    _check(_stock_patched(patcher, clip, f"node_{family}/lora_00001_.safetensors", list(want)), want,
           f"{family} node export, stock loader:")
    node.execute(**kwargs)  # a second run takes the next name, never the first file's
    assert sorted(os.listdir(loras_dir / f"node_{family}")) == ["lora_00001_.safetensors", "lora_00002_.safetensors"]


def test_node_refuses_an_adapter_for_another_model_and_writes_nothing(twin, loras_dir):
    TLoRAError = R.pack("tlora.errors").TLoRAError  # the pack's own class (ComfyUI imports it under its folder name)
    family, patcher, clip, _, adapters = twin
    wrong = {m: R.random_adapter((a.out_features or 8, 7), "none", "lora:2", seed=1)
             for m, a in list(adapters.items())[:1]}
    R.write_tlora(loras_dir / f"w_{family}.safetensors", wrong)
    R.write_tlora(loras_dir / f"te_{family}.safetensors", {m: a for m, a in adapters.items()
                                                          if m.startswith("text_encoders.")} or wrong)
    node = R.loader("TLoRAExportLoRA")
    for name in (f"w_{family}.safetensors", f"te_{family}.safetensors"):
        with pytest.raises(TLoRAError) as err:
            node.execute(model=patcher, adapter_name=name, rank=2, max_error=0.05, filename_prefix=f"bad_{family}/x")
        assert "\n" not in str(err.value)
    assert not (loras_dir / f"bad_{family}").exists() or not os.listdir(loras_dir / f"bad_{family}")


def test_exported_lora_fits_back_into_tlora_star_exactly(twin, loras_dir):
    """`fit` of the stock-loadable export (kohya names, SD1.x in diffusers layout) into TLoRA*(2, r) is exact:
    our loader patches W0 + the truncated SVD, as the stock loader does with the LoRA."""
    family, patcher, clip, ckpt, adapters = twin
    R.write_tlora(loras_dir / f"rt_{family}.safetensors", adapters)
    lora, back = loras_dir / f"rt_{family}_lora.safetensors", loras_dir / f"rt_{family}_back.safetensors"
    assert main(["export-lora", str(loras_dir / f"rt_{family}.safetensors"), "--base", str(ckpt), "--rank", str(RANK),
                 "-o", str(lora), "--no-progress"]) == 0
    assert main(["fit", str(lora), "--base", str(ckpt), "--transform", "trm:2", "--residual", f"lora:{RANK}",
                 "--iters", "5", "-o", str(back), "--no-progress"]) == 0
    want = _expected(patcher, clip, adapters, RANK)
    unet_keys = [k for k in want if k.startswith("diffusion_model.")]
    if clip is None:
        got = R.patched_weights(R.tlora_model_only(patcher, back.name, 1.0), unet_keys)
    else:
        model, clip2 = R.tlora_full(patcher, clip, back.name, 1.0, 1.0)
        got = R.patched_weights(model, unet_keys)
        got.update(R.clip_patched_weights(clip2, [k for k in want if k not in unet_keys]))
    _check(got, want, f"{family} export then fit, our loader:")
