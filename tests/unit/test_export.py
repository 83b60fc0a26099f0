"""`python -m tlora export-lora / fit / merge` on real safetensors files, host-free.

References are independent of the code under test: the float64 dense W0 T + s Delta of
tests/host/tlora_refs.py (written from docs/FORMAT.md, never calling the core), torch.linalg.svd
of that reference delta, ComfyUI's LoRA rule (alpha / rank) up @ down, kohya names spelled out
here by hand, and the checkpoint's own tensors read back with safetensors.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.host import tlora_refs as R
from tlora import arch
from tlora.cli import main

ROOT = Path(__file__).resolve().parents[2]
UNET = "model.diffusion_model."
# A small SD-like base: two attention linears, a 3x3 conv, a CLIP-L projection (SD1.x layout).
SHAPES = {"diffusion_model.blocks.0.attn1.to_q": (40, 32), "diffusion_model.blocks.0.attn2.to_k": (40, 24),
          "diffusion_model.blocks.0.in_layers.2": (16, 8, 3, 3),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (24, 24)}
KINDS = (("trm:2", "tr:3"), ("trm:1", "lora:4"), ("diag", "tr:2"), ("none", "lora:6"))


def _key(generic: str) -> str:
    """Where the SD1.x checkpoint layout keeps a generic weight."""
    if generic.startswith("diffusion_model."):
        return "model." + generic + ".weight"
    return "cond_stage_model." + generic.removeprefix("text_encoders.clip_l.") + ".weight"


def _kohya(generic: str) -> str:
    if generic.startswith("diffusion_model."):
        return "lora_unet_" + generic.removeprefix("diffusion_model.").replace(".", "_")
    return "lora_te_" + generic.split(".transformer.", 1)[1].replace(".", "_")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    g = torch.Generator().manual_seed(0)
    base = {_key(n): torch.randn(s, generator=g) for n, s in SHAPES.items()}
    base["model.diffusion_model.time_embed.0.bias"] = torch.randn(4, generator=g)  # not a module weight
    save_file(base, str(folder / "base.safetensors"))
    adapters = R.random_adapters(SHAPES, seed=1, kinds=KINDS)
    R.write_tlora(folder / "t.safetensors", adapters)
    return folder, base, adapters


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def _lora_deltas(path: Path) -> dict[str, torch.Tensor]:
    """{kohya name: (alpha / rank) up @ down} in float64, ComfyUI's rule, from the file's own tensors."""
    sd = load_file(str(path))
    names = {k.rsplit(".lora_up.weight", 1)[0] for k in sd if k.endswith(".lora_up.weight")}
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    return {n: (float(sd[f"{n}.alpha"]) / sd[f"{n}.lora_down.weight"].shape[0]) *
            (sd[f"{n}.lora_up.weight"].double().flatten(1) @ sd[f"{n}.lora_down.weight"].double().flatten(1))
            for n in names}


def _ref_delta(w0: torch.Tensor, tensors) -> torch.Tensor:
    return (R.ref_target(w0, tensors) - w0.double()).reshape(w0.shape[0], -1)


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_export_is_the_truncated_svd_of_the_reference_delta(files, tmp_path):
    folder, base, adapters = files
    out = tmp_path / "r3.safetensors"
    assert _run("export-lora", folder / "t.safetensors", "--base", folder / "base.safetensors", "--rank", 3,
                "-o", out, "--no-progress") == 0
    got = _lora_deltas(out)
    assert set(got) == {_kohya(n) for n in SHAPES}
    for name, adapter in adapters.items():
        want = _truncated(_ref_delta(base[_key(name)], adapter.tensors), 3)
        torch.testing.assert_close(got[_kohya(name)], want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        d = load_file(str(out))[_kohya(name) + ".lora_down.weight"]
        assert d.shape == (3,) + tuple(SHAPES[name][1:])  # conv factors keep kohya's conv shapes
    meta = safe_open(str(out), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "3"
    assert json.loads(meta["ss_tlora_source"])["inputs"][0]["file"] == "t.safetensors"
    errors = json.loads(meta["ss_tlora_module_errors"])
    for name, adapter in adapters.items():  # the per-module error is the SVD tail of the reference
        s = torch.linalg.svdvals(_ref_delta(base[_key(name)], adapter.tensors))
        assert errors[_kohya(name)][1] == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-6)


def test_full_rank_reproduces_the_tlora_and_max_error_picks_the_smallest_rank(files, tmp_path, capsys):
    folder, base, adapters = files
    full, target = tmp_path / "full.safetensors", 0.2
    assert _run("export-lora", folder / "t.safetensors", "--base", folder / "base.safetensors", "--rank", 1000,
                "-o", full, "--no-progress") == 0
    for name, delta in ((n, d) for n, d in _lora_deltas(full).items()):
        generic = next(g for g in SHAPES if _kohya(g) == name)
        w0 = base[_key(generic)]
        want = R.ref_target(w0, adapters[generic].tensors)  # the TLoRA's patched weight
        R.assert_close64((w0.double() + delta.reshape(w0.shape)).float(), want, f"full rank {name}")
    capsys.readouterr()
    out = tmp_path / "e.safetensors"
    assert _run("export-lora", folder / "t.safetensors", "--base", folder / "base.safetensors", "--max-error", target,
                "-o", out, "--no-progress", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    got = _lora_deltas(out)
    for name, adapter in adapters.items():
        s = torch.linalg.svdvals(_ref_delta(base[_key(name)], adapter.tensors))
        tails = [float(s[r:].norm() / s.norm()) for r in range(len(s) + 1)]
        rank = next(r for r, e in enumerate(tails) if e <= target)
        assert rank > 0 and tails[rank - 1] > target
        assert load_file(str(out))[_kohya(name) + ".lora_down.weight"].shape[0] == rank, name
        torch.testing.assert_close(got[_kohya(name)], _truncated(_ref_delta(base[_key(name)], adapter.tensors), rank),
                                   rtol=1e-5, atol=1e-5)
    assert report["rel_error"] <= target and len(report["module_reports"]) == len(SHAPES)


def _flux_base(folder: Path, h: int = 32) -> tuple[dict, dict]:
    cfg = arch.FluxConfig(hidden=h, depth=1, depth_single=1, in_channels=8, context=16, vec=8)
    g = torch.Generator().manual_seed(2)
    sd = {UNET + n.removeprefix("diffusion_model.") + ".weight": torch.randn(s, generator=g)
          for n, s, _ in cfg.modules()}
    save_file(sd, str(folder / "flux.safetensors"))
    return sd, {n: s for n, s, _ in cfg.modules()}


def test_slices_of_fused_weights_export_as_the_whole_weight(tmp_path):
    """diffusers-named q/k/v adapters (the command-line trainer's Flux files) and SDXL's OpenCLIP CLIP-G rows."""
    sd, _ = _flux_base(tmp_path)
    h, qkv = 32, "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    names = [f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    adapters = {n: R.random_adapter((h, h), "trm:2", "lora:3", seed=i) for i, n in enumerate(names)}
    R.write_tlora(tmp_path / "slices.safetensors", adapters)
    out = tmp_path / "slices_lora.safetensors"
    assert _run("export-lora", tmp_path / "slices.safetensors", "--base", tmp_path / "flux.safetensors",
                "--rank", 96, "-o", out, "--no-progress") == 0
    w0 = sd[qkv]
    want = torch.cat([_ref_delta(w0[i * h:(i + 1) * h], adapters[n].tensors) for i, n in enumerate(names)])
    got = _lora_deltas(out)
    assert list(got) == ["lora_unet_double_blocks_0_img_attn_qkv"]
    torch.testing.assert_close(got["lora_unet_double_blocks_0_img_attn_qkv"], want, rtol=1e-5, atol=1e-5)
    # SDXL's CLIP-G: q, k, v are row thirds of one in_proj_weight; k alone exports as kohya's te2 k_proj.
    w = 16
    clip_g = {"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * w, w),
              "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
                  torch.randn(w, w)}
    save_file(clip_g, str(tmp_path / "sdxl_te.safetensors"))
    k = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj"
    adapter = R.random_adapter((w, w), "trm:2", "tr:2", seed=5)
    R.write_tlora(tmp_path / "k.safetensors", {k: adapter})
    assert _run("export-lora", tmp_path / "k.safetensors", "--base", tmp_path / "sdxl_te.safetensors",
                "--rank", w, "-o", tmp_path / "k_lora.safetensors", "--no-progress") == 0
    got = _lora_deltas(tmp_path / "k_lora.safetensors")
    rows = clip_g["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"][w:2 * w]
    torch.testing.assert_close(got["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"],
                               _ref_delta(rows, adapter.tensors), rtol=1e-5, atol=1e-5)


def _write_kohya_lora(path: Path, shapes: dict, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA file on these generic weights; returns {generic: its float64 delta}."""
    lora = R.random_lora(shapes, rank=rank, alpha=alpha, seed=seed)
    R.write_lora(path, {_kohya(n): v for n, v in lora.items()})
    return {n: R.ref_lora_diff(up, down, alpha, shapes[n]) for n, (up, down, alpha) in lora.items()}


def test_fit_of_a_lora_into_tlora_star_of_enough_rank_is_exact(files, tmp_path):
    folder, base, _ = files
    deltas = _write_kohya_lora(tmp_path / "lora.safetensors", SHAPES, rank=3, alpha=2.0, seed=4)
    out = tmp_path / "fitted.safetensors"
    assert _run("fit", tmp_path / "lora.safetensors", "--base", folder / "base.safetensors", "--transform", "trm:2",
                "--residual", "lora:4", "--iters", 10, "-o", out, "--no-progress") == 0
    from tlora import load
    fitted = load(out)
    assert set(fitted.adapters) == set(SHAPES) and fitted.metadata["tlora.fit.target"]
    for name, adapter in fitted.adapters.items():
        assert adapter.transform.kind == "trm" and adapter.residual.rank == 4
        w0 = base[_key(name)]
        want = w0.double() + deltas[name]
        got = R.ref_target(w0, adapter.tensors)
        assert float((got - want).norm() / deltas[name].norm()) < 1e-5, name


def test_fit_of_a_fine_tune_takes_the_targets_that_changed(files, tmp_path):
    folder, base, _ = files
    tuned = dict(base)
    g = torch.Generator().manual_seed(6)
    q = "diffusion_model.blocks.0.attn1.to_q"
    change = 0.1 * torch.randn(40, 2, generator=g) @ torch.randn(2, 32, generator=g)
    tuned[_key(q)] = base[_key(q)] + change
    tuned[_key("diffusion_model.blocks.0.in_layers.2")] = base[_key("diffusion_model.blocks.0.in_layers.2")] + 1.0
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    tuned[_key(te)] = base[_key(te)] + 0.1 * torch.randn(24, 1, generator=g) @ torch.randn(1, 24, generator=g)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    from tlora import load
    for extra, want in (([], [q]), (["--text-encoder"], [q, te])):
        out = tmp_path / f"ft{len(extra)}.safetensors"
        assert _run("fit", tmp_path / "tuned.safetensors", "--base", folder / "base.safetensors", "--transform", "none",
                    "--residual", "lora:2", "-o", out, "--no-progress", *extra) == 0
        fitted = load(out).adapters
        assert list(fitted) == want  # attn preset: the conv is not a target, to_k did not change; CLIP when asked
        for name in want:
            got = R.ref_target(base[_key(name)], fitted[name].tensors)
            change_of = (tuned[_key(name)] - base[_key(name)]).double()
            assert float((got - tuned[_key(name)].double()).norm() / change_of.norm()) < 1e-5


def test_merge_sums_the_inputs_deltas_at_their_weights(files, tmp_path):
    folder, base, adapters = files
    other = R.random_adapters(SHAPES, seed=9, kinds=KINDS[::-1])
    R.write_tlora(tmp_path / "b.safetensors", other)
    lora = _write_kohya_lora(tmp_path / "l.safetensors", SHAPES, rank=2, alpha=1.0, seed=3)
    out = tmp_path / "merged.safetensors"
    assert _run("merge", f"{folder / 't.safetensors'}:0.7", f"{tmp_path / 'b.safetensors'}:-0.5",
                tmp_path / "l.safetensors", "--base", folder / "base.safetensors", "--rank", 1000, "-o", out,
                "--no-progress") == 0
    got, wants = _lora_deltas(out), {}
    for name in SHAPES:
        w0 = base[_key(name)]
        want = 0.7 * _ref_delta(w0, adapters[name].tensors) - 0.5 * _ref_delta(w0, other[name].tensors) \
            + lora[name].reshape(w0.shape[0], -1)
        wants[name] = want
        torch.testing.assert_close(got[_kohya(name)], want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert json.loads(safe_open(str(out), "pt").metadata()["ss_tlora_source"])["inputs"][1]["weight"] == -0.5
    # Into one TLoRA: a LoRA residual of the weights' full rank holds the sum exactly.
    as_tlora = tmp_path / "merged_tlora.safetensors"
    assert _run("merge", f"{folder / 't.safetensors'}:0.7", f"{tmp_path / 'b.safetensors'}:-0.5",
                tmp_path / "l.safetensors", "--base", folder / "base.safetensors", "--transform", "none",
                "--residual", "lora:72", "-o", as_tlora, "--no-progress") == 0
    from tlora import load
    for name, adapter in load(as_tlora).adapters.items():
        w0 = base[_key(name)]
        got = (R.ref_target(w0, adapter.tensors) - w0.double()).reshape(w0.shape[0], -1)
        assert adapter.residual.rank == min(w0.shape[0], w0[0].numel())  # capped at the weight's rank
        torch.testing.assert_close(got, wants[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _bad_cases(folder: Path, tmp: Path) -> dict[str, list]:
    wrong = dict(SHAPES, **{"diffusion_model.blocks.0.attn1.to_q": (40, 16)})
    R.write_tlora(tmp / "wrong.safetensors", R.random_adapters(wrong, seed=1, kinds=KINDS))
    R.write_tlora(tmp / "extra.safetensors", {"diffusion_model.nowhere.to_q": R.random_adapter((8, 8), seed=2)})
    t, b = folder / "t.safetensors", folder / "base.safetensors"
    return {"shape does not fit": ["export-lora", tmp / "wrong.safetensors", "--base", b, "--rank", 2],
            "module not in base": ["export-lora", tmp / "extra.safetensors", "--base", b, "--rank", 2],
            "rank 0": ["export-lora", t, "--base", b, "--rank", 0],
            "negative error": ["export-lora", t, "--base", b, "--max-error", -0.1],
            "rank and error": ["export-lora", t, "--base", b, "--rank", 2, "--max-error", 0.1],
            "missing adapter": ["export-lora", tmp / "none.safetensors", "--base", b, "--rank", 2],
            "missing base": ["export-lora", t, "--base", tmp / "none.safetensors", "--rank", 2],
            "base is not safetensors": ["export-lora", t, "--base", tmp / "wrong.txt", "--rank", 2],
            "a LoRA as adapter": ["export-lora", tmp / "lora.safetensors", "--base", b, "--rank", 2],
            "merge without a target": ["merge", t, "--base", b],
            "fit of a bad kind": ["fit", t, "--base", b, "--transform", "trm:0"]}


def test_bad_inputs_get_one_line_and_write_nothing(files, tmp_path, capsys):
    folder, _, _ = files
    work = tmp_path / "in"
    work.mkdir()
    (work / "wrong.txt").write_bytes(b"\x80\x04not safetensors")
    _write_kohya_lora(work / "lora.safetensors", SHAPES, rank=2, alpha=1.0, seed=1)
    cases = _bad_cases(folder, work)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = sorted(os.listdir(work)), sorted(os.listdir(folder))
    for label, argv in cases.items():
        code = _run(*argv, "-o", outdir / "x.safetensors", "--no-progress")
        err = capsys.readouterr().err.strip()
        assert code == 2, label
        assert err.count("\n") == 0 and "error" in err and "Traceback" not in err, (label, err)
        assert os.listdir(outdir) == [], label
    assert (sorted(os.listdir(work)), sorted(os.listdir(folder))) == before
    assert _run("export-lora", folder / "t.safetensors", "--base", folder / "base.safetensors", "--rank", 2,
                "-o", tmp_path / "no" / "x.safetensors") == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_core_imports_no_host():
    """tlora/ is host-free: no ComfyUI, diffusers, transformers or pack modules above it (imports point down)."""
    hosts = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "diffusers", "transformers",
             "accelerate", "peft", "trainer", "webui", "harness", "modules", "ldm_patched", "backend"}
    for path in sorted((ROOT / "tlora").rglob("*.py")):
        tree = ast.parse(path.read_text())
        found = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert not found & hosts, f"{path.relative_to(ROOT)} imports {sorted(found & hosts)}"
