"""Smoke tests for the real-host harness: tiny models, in-process execution, the server."""
import json
import os
import subprocess
import sys

import pytest

from harness import comfy_host as ch
from harness import graphs
from harness.server import ComfyServer, PromptRejected, history_error, history_ok


@pytest.fixture(scope="module")
def tm(comfy_host):
    """tiny_models, imported once the in-process host is set up."""
    from harness import tiny_models
    return tiny_models


def _weights_equal(a, b):
    """True when two modules have bit-identical state dicts."""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _assert_initialised(module):
    """Every parameter finite, and every non-norm >=2-D weight non-constant (i.e. really initialised)."""
    import torch
    for name, p in module.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.ndim >= 2 and p.numel() > 1:
            assert p.std() > 0, name


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_unet_deterministic_and_samples(tm, kind):
    import torch
    build = tm.tiny_sd15 if kind == "sd15" else tm.tiny_sdxl
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    assert _weights_equal(a.model, b.model)
    assert not _weights_equal(a.model, c.model)
    _assert_initialised(a.model)
    assert type(a.patcher).__name__ == "ModelPatcher" and a.patcher.model is a.model
    names = a.attention_modules()
    for suffix in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(n.endswith(suffix) for n in names), suffix
    pos, neg = a.cond(seed=1), a.cond(seed=2)
    # cfg 1.0 lets ComfyUI skip the negative pass: half the cost, same code path otherwise.
    x1 = tm.sample(a.patcher, seed=3, positive=pos, negative=neg, steps=2, cfg=1.0)
    x2 = tm.sample(b.patcher, seed=3, positive=pos, negative=neg, steps=2, cfg=1.0)
    x3 = tm.sample(a.patcher, seed=4, positive=pos, negative=neg, steps=2, cfg=1.0)
    assert x1.shape == (1, 4, 8, 8)
    assert torch.isfinite(x1).all()
    assert torch.equal(x1, x2), "same weights + seed must give a bit-identical latent"
    assert not torch.equal(x1, x3)


def test_tiny_clip_and_vae(tm):
    import torch
    clip, clip2 = tm.tiny_clip(seed=0), tm.tiny_clip(seed=0)
    _assert_initialised(clip.cond_stage_model)
    cond = tm.encode_text(clip, "a photo of a cat")
    assert cond[0][0].shape == (1, 77, 64)
    assert torch.equal(cond[0][0], tm.encode_text(clip2, "a photo of a cat")[0][0])
    assert not torch.equal(cond[0][0], tm.encode_text(clip, "a dog")[0][0])
    m = tm.tiny_sd15(seed=0)
    latent = tm.sample(m.patcher, seed=1, positive=cond, negative=tm.encode_text(clip, ""), steps=1, cfg=1.0)
    with torch.no_grad():
        img = tm.tiny_vae(seed=0).decode(latent)
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()
    assert 0.01 < float(img.std()) and float(((img > 0) & (img < 1)).float().mean()) > 0.5

    xl = tm.tiny_clip(seed=0, kind="sdxl")
    xcond = tm.encode_text(xl, "a cat")
    assert xcond[0][0].shape == (1, 77, 64) and xcond[0][1]["pooled_output"].shape == (1, 32)
    sx = tm.tiny_sdxl(seed=0)
    assert torch.isfinite(tm.sample(sx.patcher, seed=1, positive=xcond, steps=1, cfg=1.0)).all()


def test_in_process_host(comfy_host):
    import folder_paths
    import nodes
    assert comfy_host.comfy_dir == ch.comfy_dir()
    assert "CheckpointLoaderSimple" in nodes.NODE_CLASS_MAPPINGS
    loras = ch.models_dir("loras")
    assert loras.is_dir() and loras.is_relative_to(comfy_host.base_dir)
    assert folder_paths.get_folder_paths("custom_nodes") == [str(comfy_host.comfy_dir / "custom_nodes")]
    from comfy.cli_args import args
    assert args.cpu is True
    assert comfy_host.pack_status != "failed", comfy_host.pack_error
    if comfy_host.pack_status == "loaded":
        assert ch.pack_module() is not None


def test_loras_dir_is_seen_by_comfy(comfy_host, loras_dir):
    import folder_paths
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(1)}, str(loras_dir / "harness_probe.safetensors"))
    assert "harness_probe.safetensors" in folder_paths.get_filename_list("loras")


def test_validation_errors_come_back(comfy_host):
    res = ch.run_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    # 0.3.75 says invalid_prompt, 0.12 missing_node_type: what matters is that it fails, naming the node.
    assert not res.ok and res.validation_error["type"] in ("invalid_prompt", "missing_node_type")
    assert "NoSuchNode" in json.dumps(res.validation_error)
    res = ch.run_prompt(graphs.blank_image())
    assert res.ok, res.describe()
    assert res.outputs["img"][0].shape == (1, 64, 64, 3)
    assert "images" in res.ui["out"]


def test_checkpoint_txt2img_in_process(comfy_host, host_checkpoint):
    import torch
    from harness import tiny_models
    # One text-encoder pass (the full-size CLIP-L dominates the run time on a CPU).
    res = ch.run_prompt(graphs.txt2img(host_checkpoint, "a photo of a cat", negative=None, steps=2, cfg=1.0))
    assert res.ok, res.describe()
    model = res.outputs["ckpt"][0]
    assert type(model.model.model_config).__name__ == "SD15"
    assert "taesd_decoder" in dict(res.outputs["ckpt"][2].first_stage_model.named_children())
    img = res.outputs["decode"][0]
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all()
    assert float(img.std()) > 0.01 and float(((img > 0) & (img < 1)).float().mean()) > 0.5
    assert any(e == "progress" for e, _, _ in res.events)  # ProgressBar hook reached the stub server
    # The script is idempotent: with the cached file present it returns at once.
    out = subprocess.run([sys.executable, os.path.join(ch.ROOT, "tools", "make_checkpoint.py")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(tiny_models.default_checkpoint_path(0))


def test_server_log_import_failure_detection(tmp_path):
    srv = ComfyServer(tmp_path)  # never started: only the log parser is exercised
    srv.log_path.write_text(
        "Traceback (most recent call last):\n"
        "  File \"/x/custom_nodes/ComfyUI-TLoRA/__init__.py\", line 4, in <module>\n"
        "ModuleNotFoundError: No module named 'boom'\n\n"
        "Cannot import /x/custom_nodes/ComfyUI-TLoRA module for custom nodes: No module named 'boom'\n"
        "Import times for custom nodes:\n"
        "   0.0 seconds (IMPORT FAILED): /x/custom_nodes/ComfyUI-TLoRA\n"
        "IMPORT FAILED: nodes_canny.py\n")
    err = srv.pack_import_error()
    assert err is not None and "No module named 'boom'" in err
    with pytest.raises(AssertionError, match="boom"):
        srv.assert_pack_imported()
    srv.log_path.write_text("   0.1 seconds: /x/custom_nodes/ComfyUI-TLoRA\nIMPORT FAILED: nodes_canny.py\n")
    assert srv.pack_import_error() is None
    srv.assert_pack_imported()
    assert srv.import_failures() == ["IMPORT FAILED: nodes_canny.py"]


@pytest.mark.server
def test_server_object_info_and_pack(comfy_server):
    info = comfy_server.object_info()
    assert "CheckpointLoaderSimple" in info and "KSampler" in info
    ck = comfy_server.object_info("CheckpointLoaderSimple")
    assert "tlora-tiny-sd15.safetensors" in ck["input"]["required"]["ckpt_name"][0]
    if os.path.isfile(os.path.join(ch.ROOT, "__init__.py")):
        comfy_server.assert_pack_imported()


@pytest.mark.server
def test_server_prompt_reaches_history(comfy_server):
    with pytest.raises(PromptRejected):
        comfy_server.post_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    graph = graphs.txt2img("tlora-tiny-sd15.safetensors", negative=None, steps=1, cfg=1.0, output="SaveImage")
    with comfy_server.events() as ev:
        pid = comfy_server.post_prompt(graph, client_id=ev.client_id)
        entry = comfy_server.wait_history(pid, timeout=120)
        assert history_ok(entry), history_error(entry)
        assert ev.wait_done(pid, timeout=10)["type"] == "execution_success"
        assert ev.of_type("executed", pid)
    images = entry["outputs"]["out"]["images"]
    assert (comfy_server.output_dir / images[0]["subfolder"] / images[0]["filename"]).is_file()
    comfy_server.interrupt()  # idle server: accepted, nothing to cancel
    assert comfy_server.alive()
