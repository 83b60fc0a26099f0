"""The pack in a real ComfyUI server over HTTP: node list, TLoRA graphs, bad files, the UI example workflow."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from harness import graphs
from tests.support.fixtures import HARNESS_CKPT_NAME
from harness.server import PromptRejected, history_error, history_ok

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
PACK_MODULE = "custom_nodes.ComfyUI-TLoRA"
LOADER_NODES = {"TLoRALoader", "TLoRALoaderModelOnly", "TLoRABlockWeights", "TLoRAInfo"}


def demo_module():
    """tools/demo.py as a module (its workflow conversion and adapter maker are under test too)."""
    name = "tlora_demo_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "demo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    """GET /object_info once for the module."""
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def srv_adapter(comfy_server, harness_checkpoint) -> str:
    """A TLoRA file for the harness checkpoint's attention modules, in the server's loras folder."""
    demo_module().make_adapter(harness_checkpoint, comfy_server.loras_dir / "srv_tlora.safetensors", seed=1)
    return "srv_tlora.safetensors"


def with_loader(graph: dict, adapter: str, strength: float, prefix: str) -> dict:
    """The harness txt2img graph with TLoRALoader on both model and CLIP, saving under `prefix`."""
    g = json.loads(json.dumps(graph))
    g["tlora"] = {"class_type": "TLoRALoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "adapter_name": adapter,
        "strength_model": strength, "strength_clip": strength}}
    g["sampler"]["inputs"]["model"] = ["tlora", 0]
    for node in g.values():
        if node["class_type"] == "CLIPTextEncode":
            node["inputs"]["clip"] = ["tlora", 1]
    g["out"]["inputs"]["filename_prefix"] = prefix
    return g


def saved_pixels(server, entry: dict, node: str = "out"):
    """Pixels (numpy array) of the first image a SaveImage node wrote."""
    import numpy as np
    from PIL import Image
    img = entry["outputs"][node]["images"][0]
    return np.asarray(Image.open(server.output_dir / img["subfolder"] / img["filename"]).convert("RGB"))


# --------------------------------------------------------------------------- node list, import

def test_object_info_lists_every_pack_node(comfy_server, comfy_host, object_info):
    comfy_server.assert_pack_imported()
    assert not [ln for ln in comfy_server.import_failures() if "TLoRA" in ln], comfy_server.import_failures()
    ours = {k for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    assert LOADER_NODES <= ours, f"missing: {LOADER_NODES - ours}"
    # Everything the pack registers in-process (the trainer's nodes too) is served.
    assert set(comfy_host.pack_nodes) <= ours, set(comfy_host.pack_nodes) - ours
    for name in LOADER_NODES:
        assert object_info[name]["category"] == "loaders/TLoRA"
        assert object_info[name]["display_name"] and object_info[name]["description"]


def test_adapter_dropdown_lists_the_loras_folder(comfy_server, srv_adapter):
    for name in LOADER_NODES:
        spec = comfy_server.object_info(name)["input"]["required"]["adapter_name"]
        assert srv_adapter in spec[1]["options"], f"{name} does not offer {srv_adapter}"


# --------------------------------------------------------------------------- graphs over HTTP

def test_tlora_loader_graph_runs_over_http(comfy_server, srv_adapter):
    import numpy as np
    plain = graphs.txt2img(HARNESS_CKPT_NAME, "a photo of sks dog", negative=None, steps=1, cfg=1.0,
                           output="SaveImage", filename_prefix="srv_plain")
    runs = {"plain": plain,
            "s0": with_loader(plain, srv_adapter, 0.0, "srv_s0"),
            "s1": with_loader(plain, srv_adapter, 1.0, "srv_s1")}
    pixels = {}
    for label, graph in runs.items():
        entry = comfy_server.run(graph, timeout=180)
        assert history_ok(entry), f"{label}: {history_error(entry)}"
        pixels[label] = saved_pixels(comfy_server, entry)
    assert np.array_equal(pixels["s0"], pixels["plain"]), "strength 0 must reproduce the base image exactly"
    assert np.abs(pixels["s1"].astype(int) - pixels["plain"]).mean() > 1.0, "strength 1 must change the image"


@pytest.mark.parametrize("case", ["truncated", "partly_matching", "not_in_list", "path_escape"])
def test_bad_file_over_http_then_next_prompt_succeeds(comfy_server, srv_adapter, case):
    loras = comfy_server.loras_dir
    name = f"srv_bad_{case}.safetensors"
    if case == "truncated":
        data = (loras / srv_adapter).read_bytes()
        (loras / name).write_bytes(data[: len(data) // 2])
        expected = "truncated or corrupted"
    elif case == "partly_matching":
        from tlora import ModuleAdapter, load_file, save_file
        adapters = load_file(loras / srv_adapter)
        adapters["diffusion_model.output_blocks.8.1.transformer_blocks.0.attn1.to_q"] = \
            ModuleAdapter.create((320, 320), "trm:2", "tr:4")
        save_file(adapters, loras / name)
        expected = f"1 of {len(adapters)} modules did not match"
    elif case == "not_in_list":  # 0.3.75 does not check V3 combo values: our node must
        name, expected = "no_such_file.safetensors", "is not in the loras folder"
    else:  # a name that walks out of the loras folder to a real file
        name, expected = f"../checkpoints/{HARNESS_CKPT_NAME}", "is not in the loras folder"
    base = graphs.txt2img(HARNESS_CKPT_NAME, negative=None, steps=1, cfg=1.0, output="SaveImage",
                          filename_prefix="srv_after_bad")
    try:
        entry = comfy_server.run(with_loader(base, name, 1.0, "srv_bad"), timeout=180)
    except PromptRejected as rejected:
        # 0.12 checks V3 combo values itself (value_not_in_list) before our node runs: the
        # prompt still fails, naming our node and its adapter_name input, and leaks no path.
        assert case in ("not_in_list", "path_escape"), rejected.response
        errors = rejected.response["node_errors"]["tlora"]["errors"]
        assert errors and errors[0]["type"] == "value_not_in_list", errors
        assert "adapter_name" in json.dumps(errors) and str(loras) not in json.dumps(errors), errors
    else:
        assert not history_ok(entry)
        err = history_error(entry)
        assert err and err["node_type"] == "TLoRALoader" and err["node_id"] == "tlora", err
        assert expected in err["exception_message"] and str(loras) not in err["exception_message"], err
    entry = comfy_server.run(base, timeout=180)
    assert history_ok(entry), history_error(entry)
    assert comfy_server.alive()


# --------------------------------------------------------------------------- the UI example workflow

def _check_value(node: dict, name: str, kind, opts: dict, value) -> None:
    """A widget value is valid for its input spec (file lists only need a file-like name)."""
    where = f"node {node['id']} ({node['type']}).{name} = {value!r}"
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        if name in ("ckpt_name", "adapter_name", "lora_name", "unet_name", "clip_name", "clip_name1", "clip_name2",
                    "vae_name"):  # the user's files
            assert isinstance(value, str) and value.endswith(".safetensors"), where
        elif name in ("folder", "image"):  # the user's input folder: the demo fills it at run time
            assert isinstance(value, str) and value and "/" not in value and ".." not in value, where
        else:
            assert value in options, f"{where} not in {options[:8]}..."
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_ui_workflow_lines_up_with_object_info(object_info, path):
    demo = demo_module()
    wf = json.loads(path.read_text())
    if path.name == "tlora_load_and_sample.json":
        types = [n["type"] for n in wf["nodes"]]
        assert {"CheckpointLoaderSimple", "TLoRALoader", "KSampler", "VAEDecode", "SaveImage", "TLoRAInfo"} <= set(types)
        assert types.count("CLIPTextEncode") == 2
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        info = object_info.get(node["type"])
        assert info is not None, f"node type {node['type']} is not installed"
        slots = demo.widget_slots(info)
        values = node.get("widgets_values", [])
        assert len(values) == len(slots), f"{node['type']}: widgets_values {values} vs widget inputs {slots}"
        specs = {name: (kind, opts) for name, kind, opts in demo.node_inputs(info)}
        for slot, value in zip(slots, values):
            if slot is None:
                assert value in ("fixed", "increment", "decrement", "randomize"), value
            else:
                _check_value(node, slot, *specs[slot], value)
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        required = [n for n, kind, _ in demo.node_inputs(info)
                    if not demo.is_widget(kind) and n in (info["input"].get("required") or {})]
        assert set(required) <= linked, f"{node['type']}: unconnected {set(required) - linked}"
        for i, out in enumerate(node.get("outputs", [])):
            assert out["type"] == info["output"][i], f"{node['type']} output {i}"
    for lid, src, sslot, dst, dslot, ltype in wf["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][sslot]
        dst_input = nodes[dst]["inputs"][dslot]
        assert dst_input["link"] == lid and lid in nodes[src]["outputs"][sslot]["links"], f"link {lid}"
        in_kind = dict((n, k) for n, k, _ in demo.node_inputs(object_info[nodes[dst]["type"]]))[dst_input["name"]]
        assert out_type == ltype == in_kind, f"link {lid}: {out_type} -> {dst_input['name']} ({in_kind}) as {ltype}"
    assert wf["last_link_id"] >= max(lk[0] for lk in wf["links"]) and wf["last_node_id"] >= max(nodes)


def test_ui_workflow_runs_over_http_via_the_demo(comfy_server, harness_checkpoint, tmp_path):
    demo = demo_module()
    adapter = demo.make_adapter(harness_checkpoint, tmp_path / "adapter.safetensors", seed=2)
    images = demo.run_workflows(comfy_server, demo.load_workflow(), adapter, tmp_path / "out", HARNESS_CKPT_NAME,
                                strengths=(0.0, 1.0), steps=1, size=64, timeout=240)
    import numpy as np
    from PIL import Image
    a, b = (np.asarray(Image.open(images[s]).convert("RGB")).astype(int) for s in (0.0, 1.0))
    assert a.shape == (64, 64, 3) and np.abs(a - b).mean() > 1.0
    info = (tmp_path / "out" / "adapter_info.txt").read_text()
    n = len(demo.checkpoint_targets(harness_checkpoint))
    assert f"parameters in {n} modules" in info and "kinds: trm:2 + tr:4" in info, info
    api = json.loads((tmp_path / "out" / "workflow_api.json").read_text())
    assert {v["class_type"] for v in api.values()} >= {"TLoRALoader", "TLoRAInfo", "KSampler", "SaveImage"}
    assert demo.side_by_side(images, tmp_path / "sheet.png").is_file()


# --------------------------------------------------------------------------- nothing stale

@pytest.mark.parametrize("how", ["atomic_replace", "in_place_same_mtime"])
def test_a_replaced_adapter_is_used_by_the_next_prompt(comfy_server, harness_checkpoint, how, tmp_path):
    """Prompt N uses file A; A is replaced on disk; prompt N+1 (same graph, new seed) must use the new file.

    The host never re-runs a node whose inputs did not change: the loaders report the file's
    stamp. The in-place rewrite keeps inode, size and mtime: only ctime tells.
    """
    import os
    import shutil
    import numpy as np
    demo = demo_module()
    loras = comfy_server.loras_dir
    name, ref = f"srv_replaced_{how}.safetensors", f"srv_replaced_ref_{how}.safetensors"
    demo.make_adapter(harness_checkpoint, loras / name, seed=11)
    other = demo.make_adapter(harness_checkpoint, tmp_path / "other.safetensors", seed=12)
    shutil.copyfile(other, loras / ref)

    def pixels(adapter: str, seed: int, prefix: str):
        base = graphs.txt2img(HARNESS_CKPT_NAME, negative=None, steps=1, cfg=1.0, output="SaveImage",
                              filename_prefix=prefix, seed=seed)
        entry = comfy_server.run(with_loader(base, adapter, 1.0, prefix), timeout=180)
        assert history_ok(entry), history_error(entry)
        return saved_pixels(comfy_server, entry)
    first = pixels(name, 1, f"rep_a_{how}")
    stat = os.stat(loras / name)
    if how == "atomic_replace":
        shutil.copyfile(other, loras / f".{name}.new")
        os.replace(loras / f".{name}.new", loras / name)
    else:
        data = other.read_bytes()
        assert len(data) == stat.st_size, "same shapes and metadata length: the same size"
        with open(loras / name, "r+b") as f:
            f.write(data)
        os.utime(loras / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        now = os.stat(loras / name)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    after = pixels(name, 2, f"rep_b_{how}")
    expected = pixels(ref, 2, f"rep_ref_{how}")
    assert np.array_equal(after, expected), "the next prompt must use the file now on disk"
    assert not np.array_equal(first, pixels(name, 1, f"rep_c_{how}")), "and the old one is gone from the cache"


def test_queuing_a_training_graph_again_trains_again(comfy_server):
    """Two identical prompts used to give one run and one file; a deleted file was never written again."""
    from tests.host.test_train import _server_train_graph
    comfy_server.assert_pack_imported()
    graph = _server_train_graph(steps=2, output_name="srv_again", save_every=0, transform="none", residual="lora:1")
    loras = comfy_server.loras_dir
    for expected in ("srv_again.safetensors", "srv_again_2.safetensors"):
        entry = comfy_server.run(graph, timeout=300)
        assert history_ok(entry), history_error(entry)
        assert (loras / expected).is_file(), sorted(p.name for p in loras.iterdir())
    for f in loras.glob("srv_again*"):
        f.unlink()
    entry = comfy_server.run(graph, timeout=300)
    assert history_ok(entry), history_error(entry)
    assert (loras / "srv_again.safetensors").is_file(), "a deleted file is trained and written again"
    # A resume graph queued again: the file is complete, so the prompt fails saying why (never a silent success).
    resume = _server_train_graph(steps=2, output_name="srv_again", save_every=0, transform="none",
                                 residual="lora:1", resume="srv_again.safetensors")
    entry = comfy_server.run(resume, timeout=300)
    assert not history_ok(entry)
    assert "already been trained for 2 of 2 steps" in history_error(entry)["exception_message"]
    assert comfy_server.alive()
