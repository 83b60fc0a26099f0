"""tlora/format.py's file checks that every loader shares: one adapter per weight, a known version, real files."""
from __future__ import annotations

import os

import pytest
import torch

from tlora import ModuleAdapter
from tlora.errors import TLoRAFormatError
from tlora.format import check_one_adapter_per_weight, check_version, load, read_header, save_file

GENERIC = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
KOHYA = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"


def keys_of(prefix: str, *suffixes: str) -> set[str]:
    return {f"{prefix}.{s}" for s in suffixes}


@pytest.mark.parametrize("tlora_name, lora_name", [(GENERIC, GENERIC), (GENERIC, KOHYA), (KOHYA, GENERIC),
                                                   (KOHYA, KOHYA)])
@pytest.mark.parametrize("lora_suffix", ["lora_up.weight", "lora_A.weight", "hada_w1_a", "lokr_w1", "diff"])
def test_a_lora_beside_a_tlora_for_one_weight_is_refused_under_either_name(tlora_name, lora_name, lora_suffix):
    keys = keys_of(tlora_name, "tlora_t.0", "tlora_scale") | keys_of(lora_name, lora_suffix, "alpha")
    with pytest.raises(TLoRAFormatError, match=f"module {tlora_name} also has {lora_name}.{lora_suffix}"):
        check_one_adapter_per_weight(tlora_name, keys)


def test_a_bias_diff_or_an_alpha_beside_a_tlora_is_not_a_clash():
    """`x.diff_b` patches x's bias, a lone `x.alpha` patches nothing: the TLoRA of x's weight loses nothing."""
    check_one_adapter_per_weight(GENERIC, keys_of(GENERIC, "tlora_t.0", "tlora_scale", "diff_b", "alpha"))


@pytest.mark.parametrize("first, second", [(GENERIC, KOHYA), (KOHYA, GENERIC)])
def test_one_module_under_two_names_is_refused_from_either_name(first, second):
    keys = keys_of(first, "tlora_t.0", "tlora_scale") | keys_of(second, "tlora_r.up", "tlora_r.down", "tlora_scale")
    with pytest.raises(TLoRAFormatError, match=f"module {GENERIC} is given twice \\(also as {KOHYA}\\)"):
        check_one_adapter_per_weight(first, keys)


@pytest.mark.parametrize("version, words", [("99", "written in TLoRA format version 99"),
                                            ("x" * 1000, "unknown tlora.version 'xxxx")])
def test_unknown_versions_are_refused(version, words):
    with pytest.raises(TLoRAFormatError, match=words):
        check_version("f.safetensors", {"tlora.version": version})
    check_version("f.safetensors", {})  # absent: version 1


def test_a_fifo_as_adapter_path_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    for read in (read_header, load):
        with pytest.raises(TLoRAFormatError, match="pipe.safetensors: not a regular file"):
            read(str(tmp_path / "pipe.safetensors"))
    save_file({GENERIC: ModuleAdapter.create((8, 8), "trm:2", "lora:2")}, str(tmp_path / "ok.safetensors"))
    assert set(load(str(tmp_path / "ok.safetensors")).adapters) == {GENERIC}
    assert torch.is_tensor(load(str(tmp_path / "ok.safetensors")).adapters[GENERIC].tensors["tlora_scale"])


@pytest.mark.parametrize("suffix", ["tlora_t.0", "tlora_r.up", "tlora_scale"])
def test_finite_but_absurd_values_are_refused_by_every_reader(suffix):
    """1e30 is finite in float32: such files passed the checks and gave NaN or black images in every loader."""
    tensors = dict(ModuleAdapter.create((8, 8), "trm:2", "lora:2").tensors)
    tensors[suffix] = torch.full_like(tensors[suffix], 1e30)
    with pytest.raises(TLoRAFormatError, match=f"tensor '{suffix}' has values up to 1e\\+30"):
        ModuleAdapter(tensors, name="m")
    tensors[suffix] = torch.full_like(tensors[suffix], 0.5e6)  # large, but below the bound
    ModuleAdapter(tensors, name="m")
