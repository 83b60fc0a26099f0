"""Target tables, tensorization, the planner and `python -m tlora plan`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tlora import ModuleAdapter, arch, cli, factorize, plan, save_file
from tlora.adapter import MAX_TRANSFORM_FACTOR, layout
from tlora.shapes import PAPER_SHAPES, auto_factors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = {("trm:2", "tr:6"): 400_288, ("trm:2", "lora:4"): 941_440, ("none", "lora:4"): 797_184}


# ----- factorize ----------------------------------------------------------------------------
def test_factorize_every_small_number() -> None:
    for n in range(1, 5001):  # `paper` is `auto` outside its table
        f = factorize(n, "auto")
        assert math.prod(f) == n and 1 <= len(f) <= 3 and all(x >= 1 for x in f), (n, f)


@pytest.mark.parametrize("n", [7919, 65537, 999_983, 1_000_003, 2**20, 10**6, 3 * 5 * 7 * 11 * 13 * 17, 2**31 - 1])
def test_factorize_large_and_prime(n: int) -> None:
    f = factorize(n, "auto")
    assert math.prod(f) == n and len(f) <= 3


def test_paper_shapes_and_prime_fallback() -> None:
    for n, f in PAPER_SHAPES.items():
        assert factorize(n, "paper") == f
    assert factorize(1536, "auto") == auto_factors(1536)
    assert factorize(257, "auto") == (257,)
    # A prime width wider than MAX_TRANSFORM_FACTOR gets a diag transform, not a huge core.
    adapter = ModuleAdapter.create((10, 257), "trm:2", "lora:1", shapes="auto")
    assert str(adapter.transform) == "diag" and 257 > MAX_TRANSFORM_FACTOR


# ----- arch tables -----------------------------------------------------------------------------
def test_sd15_attention_table() -> None:
    t = arch.targets("sd15", "attn")
    assert len(t) == 128
    blk = "diffusion_model.input_blocks.1.1.transformer_blocks.0"
    assert t[f"{blk}.attn2.to_k"] == (320, 768)
    assert t[f"{blk}.attn2.to_v"] == (320, 768)
    assert t[f"{blk}.attn1.to_k"] == (320, 320)
    assert t[f"{blk}.attn1.to_out.0"] == (320, 320)
    assert t["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_q"] == (1280, 1280)
    assert t["diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k"] == (320, 768)
    assert sum(1 for k in t if k.endswith(".attn2.to_k")) == 16
    assert all(k.startswith("diffusion_model.") for k in t)


def test_presets_nest_and_shapes() -> None:
    for name in arch.ARCHS:
        a, f, al = (arch.targets(name, p) for p in arch.PRESETS)
        assert set(a) < set(f) < set(al)
        assert list(a) == [k for k in al if k in a]  # one order for all presets
    ff = arch.targets("sd15", "attn-ff")
    assert ff["diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"] == (2560, 320)
    assert ff["diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2"] == (320, 1280)
    sd15_all, sdxl_all = arch.targets("sd15", "all-linear"), arch.targets("sdxl", "all-linear")
    assert sd15_all["diffusion_model.input_blocks.1.1.proj_in"] == (320, 320, 1, 1)  # 1x1 conv on SD1.5
    assert sdxl_all["diffusion_model.input_blocks.4.1.proj_in"] == (640, 640)  # Linear on SDXL
    sdxl = arch.targets("sdxl", "attn")
    assert len(sdxl) == 560
    assert sdxl["diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k"] == (640, 2048)
    assert sdxl["diffusion_model.output_blocks.0.1.transformer_blocks.9.attn1.to_q"] == (1280, 1280)
    assert "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn1.to_q" in sdxl
    assert not any(k.startswith("diffusion_model.output_blocks.6.") for k in sdxl)
    convs = arch.targets("sd15", "attn", with_convs=True)
    assert len(convs) == 128 + 64
    assert convs["diffusion_model.input_blocks.4.0.skip_connection"] == (640, 320, 1, 1)
    assert convs["diffusion_model.output_blocks.2.1.conv"] == (1280, 1280, 3, 3)
    with pytest.raises(ValueError):
        arch.targets("sd4", "attn")
    with pytest.raises(ValueError):
        arch.targets("sd15", "everything")


def test_transformer_family_tables() -> None:
    """Flux / SD3.5 / Qwen-Image counts and the fused shapes of the released models.

    (tests/host/test_dit.py checks the full tables against the host's own models.)
    """
    flux = arch.targets("flux", "attn")
    assert len(flux) == 19 * 4 + 38 * 2
    assert flux["diffusion_model.double_blocks.0.img_attn.qkv"] == (9216, 3072)
    assert flux["diffusion_model.single_blocks.37.linear1"] == (21504, 3072)
    assert flux["diffusion_model.single_blocks.0.linear2"] == (3072, 15360)
    assert arch.targets("flux", "attn-ff")["diffusion_model.double_blocks.18.txt_mlp.0"] == (12288, 3072)
    assert arch.targets("flux", "all-linear")["diffusion_model.guidance_in.in_layer"] == (3072, 256)
    large = arch.targets("sd35-large", "attn")
    assert large["diffusion_model.joint_blocks.0.x_block.attn.qkv"] == (3 * 2432, 2432)
    assert "diffusion_model.joint_blocks.37.context_block.attn.proj" not in large  # pre-only last context block
    assert len(large) == 38 * 4 - 1
    medium = arch.targets("sd35-medium", "attn")
    assert "diffusion_model.joint_blocks.12.x_block.attn2.qkv" in medium
    assert "diffusion_model.joint_blocks.13.x_block.attn2.qkv" not in medium
    qwen = arch.targets("qwen-image", "attn")
    assert len(qwen) == 60 * 8 and qwen["diffusion_model.transformer_blocks.59.attn.to_add_out"] == (3072, 3072)
    assert arch.kohya_name("diffusion_model.double_blocks.0.img_attn.qkv", "flux") == \
        "lora_unet_double_blocks_0_img_attn_qkv"
    assert arch.archs_for_host_model("SD3") == ("sd3", "sd35-medium", "sd35-large")


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35-large", "qwen-image"])
def test_cli_plan_knows_the_transformer_families(name, capsys) -> None:
    """`python -m tlora plan --arch <family> --json` counts what the tables say (released shapes)."""
    assert cli.main(["plan", "--arch", name, "--targets", "attn", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["modules"] == len(arch.targets(name, "attn")) and plan["params"] > 0


def test_text_encoder_tables_and_kohya_names() -> None:
    te = {k: v for k, v in arch.targets("sd15", "attn-ff", text_encoder=True).items()
          if k.startswith("text_encoders.")}
    assert len(te) == 12 * 6
    q = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    assert te[q] == (768, 768)
    assert te["text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc1"] == (3072, 768)
    assert arch.kohya_name(q, "sd15") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert arch.kohya_name(q, "sdxl") == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    g = "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2"
    assert arch.targets("sdxl", "attn-ff", text_encoder=True)[g] == (1280, 5120)
    assert arch.kohya_name(g, "sdxl") == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    unet = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0"
    assert arch.kohya_name(unet) == "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_out_0"
    for name in arch.ARCHS:
        table = arch.all_modules(name)
        kmap = arch.kohya_map(name)
        assert len(kmap) == len(table)  # the kohya form is unambiguous
        assert all(arch.module_path_from_kohya(arch.kohya_name(p, name), name) == p for p in table)
    assert arch.module_path_from_kohya("lora_unet_nothing", "sd15") is None
    with pytest.raises(ValueError):
        arch.kohya_name("model.layers.0")


# ----- planner -------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds,params", list(PAPER.items()))
def test_plan_paper_counts(kinds, params: int) -> None:
    result = plan("sd15", kinds[0], kinds[1], "attn", "paper")
    assert result["params"] == params and result["modules"] == 128
    assert sum(result["params_by_kind"].values()) == params
    assert sum(m["params"] for m in result["per_module"]) == params


def test_plan_paper_breakdown() -> None:
    result = plan("sd15", "trm:2", "tr:6", "attn", "paper")
    assert result["params_by_kind"] == {"trm:2": 144_256, "tr:6": 256_032}


def test_plan_matches_created_adapters() -> None:
    """The analytic counts follow ModuleAdapter.create (unique shapes of the largest tables)."""
    shapes = set(arch.targets("sd15", "all-linear", text_encoder=True, with_convs=True).values())
    shapes |= set(arch.targets("sdxl", "all-linear", text_encoder=True).values()) | {(10, 257), (7, 3, 3, 3)}
    for shape in sorted(shapes):
        for t, r in (("trm:2", "tr:2"), ("diag", "lora:1"), ("none", "tr:1")):
            t_kind, r_kind, tensors = layout(shape, t, r, "paper")
            made = ModuleAdapter.create(shape, t, r, shapes="paper")
            assert {k: tuple(v.shape) for k, v in made.tensors.items()} == tensors, shape
            assert (made.transform, made.residual) == (t_kind, r_kind)


def test_plan_file_size_matches_saved_file(tmp_path) -> None:
    table = dict(list(arch.targets("sd15", "attn").items())[:8])
    result = plan("sd15", "trm:2", "tr:6", table, "paper")
    adapters = {k: ModuleAdapter.create(s, "trm:2", "tr:6", shapes="paper") for k, s in table.items()}
    path = tmp_path / "p.safetensors"
    config = {k: result[k] for k in ("arch", "transform", "residual", "shapes", "targets", "alpha",
                                      "text_encoder", "with_convs")}
    save_file(adapters, path, metadata={"modelspec.title": "TLoRA adapter"}, config=config)
    assert abs(os.path.getsize(path) - result["file_bytes"]) <= 16
    half = plan("sd15", "trm:2", "tr:6", table, "paper", dtype=torch.float16)
    assert half["file_bytes"] < result["file_bytes"]


# ----- CLI ------------------------------------------------------------------------------------
def test_cli_plan_json_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "tlora", "plan", "--arch", "sd15", "--transform", "trm:2",
                           "--residual", "tr:6", "--targets", "attn", "--shapes", "paper", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object
    assert result["params"] == 400_288 and result["modules"] == 128
    assert isinstance(result["file_bytes"], int) and result["params_by_kind"]["tr:6"] == 256_032


@pytest.mark.parametrize("kinds,params", list(PAPER.items()))
def test_cli_plan_json_in_process(kinds, params: int, capsys) -> None:
    assert cli.main(["plan", "--arch", "sd15", "--transform", kinds[0], "--residual", kinds[1],
                     "--targets", "attn", "--shapes", "paper", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == params


def test_cli_plan_text(capsys) -> None:
    assert cli.main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "params: 400,288" in out and "modules: 128" in out and "file size:" in out


@pytest.mark.parametrize("argv", [
    ["plan", "--transform", "trm:x"], ["plan", "--residual", "tr:0"], ["plan", "--arch", "sd4"],
    ["plan", "--targets", "everything"], ["plan", "--transform", "none", "--residual", "none"],
    ["plan", "--alpha", "x"], ["inspect"], ["frobnicate"], []])
def test_cli_bad_arguments_exit_2_with_one_line(argv, capsys) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
