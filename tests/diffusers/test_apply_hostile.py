"""trainer/diffusers/inference/ against hostile files and calls (issue 28 items 5 and 6, and in-memory state dicts).

A real tiny diffusers SD1.5 pipeline; references are the model's own weights before anything was
applied (bit for bit) and the float64 dense reference of tests/host/tlora_refs.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from comfyui_tlora.tlora import ModuleAdapter  # noqa: E402
from comfyui_tlora.trainer.diffusers import inference as A  # noqa: E402
from tests.host import tlora_refs as R  # noqa: E402


@pytest.fixture
def pipe():
    from harness import tiny_diffusers as td
    return td.sd15(seed=0)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adapter(shape, seed: int) -> ModuleAdapter:
    """tlora_refs' random adapter as this package's ModuleAdapter (the refs import the core as `tlora`)."""
    return ModuleAdapter(dict(R.random_adapter(shape, seed=seed).tensors), name="test")


def _first_linear(unet: torch.nn.Module) -> str:
    return next(n for n, m in unet.named_modules() if n.endswith(".to_q"))


def test_a_fuse_that_would_write_inf_is_refused_and_the_model_stays_usable(pipe, tmp_path):
    """Entries of 1e3 (transform) and 1e4 (residual) are finite and under the readers' bound; W0 T + s Delta is
    not finite in a float16 UNet. The fuse used to write NaN/inf, then unfuse() raised on its own NaN tolerance
    and remove() was refused."""
    unet = pipe.unet.to(torch.float16)
    path = _first_linear(unet)
    shape = tuple(unet.get_submodule(path).weight.shape)
    huge = {k: (v * 1e3 if k.startswith("tlora_t.") else v * 1e4 if k.startswith("tlora_r.") else v)
            for k, v in R.random_adapter(shape, seed=1).tensors.items()}
    base = _weights(unet)
    A.load_tlora(pipe, {f"unet.{path}": ModuleAdapter(huge, name=f"unet.{path}")}, name="huge")
    with pytest.raises(A.TLoRAError, match=f"{path}: fusing TLoRA 'huge' would write NaN or inf"):
        A.fuse(pipe)
    assert not A.is_fused(pipe)
    A.remove(pipe, "huge")
    after = _weights(unet)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_a_refused_fuse_puts_back_the_weights_fused_before_it(pipe, tmp_path):
    """Two adapters in order: the first fuses, the second would overflow: both weights come back bit for bit."""
    unet = pipe.unet.to(torch.float16)
    names = [n for n, m in unet.named_modules() if n.endswith(".to_q")][:2]
    shapes = {n: tuple(unet.get_submodule(n).weight.shape) for n in names}
    good = {f"unet.{names[0]}": _adapter(shapes[names[0]], seed=2)}
    tensors = R.random_adapter(shapes[names[1]], seed=3).tensors
    bad = {f"unet.{names[1]}": ModuleAdapter({k: v * 1e5 if k.startswith("tlora_r.") else v
                                              for k, v in tensors.items()}, name="bad")}
    base = _weights(unet)
    A.load_tlora(pipe, good, name="good")
    A.load_tlora(pipe, bad, name="bad")
    with pytest.raises(A.TLoRAError, match="nothing was fused"):
        A.fuse(pipe)
    A.remove(pipe)
    after = _weights(unet)
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_a_key_inside_another_tloras_layer_is_refused(pipe, tmp_path):
    """`unet.<path>.base` after a file on `unet.<path>`: it wrapped the wrapper's own base, and from then on
    remove() raised and adapters() raised KeyError."""
    unet = pipe.unet
    path = _first_linear(unet)
    shape = tuple(unet.get_submodule(path).weight.shape)
    A.load_tlora(pipe, {f"unet.{path}": _adapter(shape, seed=1)}, name="outer")
    with pytest.raises(A.TLoRAApplyError, match=rf"unet.{path}.base is inside the adapter layer unet.{path}"):
        A.load_tlora(pipe, {f"unet.{path}.base": _adapter(shape, seed=2)}, name="inner")
    assert A.adapters(pipe) == {"outer": 1.0}
    A.remove(pipe)
    assert A.adapters(pipe) == {} and type(unet.get_submodule(path)) is torch.nn.Linear


def test_an_in_memory_state_dict_applies_like_its_file(pipe, tmp_path):
    """`load_tlora(pipe, {name: Tensor})` raised AttributeError; a state dict is a file's content."""
    unet = pipe.unet
    path = _first_linear(unet)
    w0 = unet.get_submodule(path).weight.detach().clone()
    adapter = R.random_adapter(tuple(w0.shape), seed=4)
    state = {f"unet.{path}.{k}": v for k, v in adapter.tensors.items()}
    A.load_tlora(pipe, state, name="sd", strength=0.5)
    A.fuse(pipe)
    R.assert_close64(unet.get_submodule(path).weight.detach(), R.ref_patched(w0, adapter.tensors, 0.5), path)
    A.unfuse(pipe)
    A.remove(pipe)
    with pytest.raises(A.TLoRAApplyError, match="key 'unet.x.weight' is not a TLoRA tensor name"):
        A.load_tlora(pipe, {"unet.x.weight": torch.zeros(2)})
    with pytest.raises(A.TLoRAApplyError, match="'unet.x' is a list"):
        A.load_tlora(pipe, {"unet.x": [1, 2]})
