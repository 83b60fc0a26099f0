"""The web UI's /tlora routes over HTTP against the real ComfyUI 0.3.75 server (session `comfy_server`)."""
from __future__ import annotations

import json
import math
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.server

CKPT = "tlora-tiny-sd15.safetensors"
# Attention shapes of the harness checkpoint (SD1.5 widths), so the files look like real adapters.
SHAPES = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
}


def write_tlora(path: Path, seed: int = 0, **metadata: str) -> int:
    """A TLoRA file written by the core; returns its parameter count read back from the raw tensors."""
    import torch
    from safetensors import safe_open

    from tlora import ModuleAdapter, save_file

    gen = torch.Generator().manual_seed(seed)
    kinds = [("trm:2", "tr:3"), ("trm:1", "lora:4"), ("trm:2", "tr:3")]
    adapters = {p: ModuleAdapter.create(s, *kinds[i], shapes="auto", generator=gen)
                for i, (p, s) in enumerate(SHAPES.items())}
    save_file(adapters, str(path), config={"transform": "trm:2", "residual": "tr:3", "targets": "attn"},
              metadata={"modelspec.architecture": "stable-diffusion-v1", **metadata})
    # Counted from the file itself (every tensor but the per-module scale), not from our own code.
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".tlora_scale"))


def write_plain_lora(path: Path) -> None:
    """A kohya-style LoRA (not TLoRA): the block-weight loader accepts it, the card says what it is."""
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)},
              str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                   "ss_network_alpha": "4"})


def get(server: Any, path: str) -> tuple[int, Any, str]:
    """(status, parsed JSON or None, raw text) of a GET sent exactly as written (no re-encoding)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + path, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    text = body.decode("utf-8", "replace")
    try:
        return status, json.loads(text), text
    except ValueError:
        return status, None, text


def assert_reveals_nothing(server: Any, text: str) -> None:
    """No filesystem paths, stack traces or exception names in a response body."""
    for secret in (str(server.base_dir), str(server.comfy_dir), os.path.expanduser("~"), "/tmp", "/work"):
        assert secret not in text, f"response leaks {secret!r}: {text[:300]}"
    for marker in ("Traceback", "File \"", "Error:", "Exception"):
        assert marker not in text, f"response leaks a stack trace: {text[:300]}"


@pytest.fixture
def loras(comfy_server: Any) -> Iterator[Path]:
    """The server's loras folder; whatever a test adds there is removed afterwards."""
    comfy_server.assert_pack_imported()
    folder = comfy_server.loras_dir
    before = set(folder.iterdir())
    yield folder
    for p in set(folder.iterdir()) - before:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            for q in p.iterdir():
                q.unlink()
            p.rmdir()


def q(name: str) -> str:
    """/tlora/adapter?name=<name, URL-encoded>."""
    return "/tlora/adapter?name=" + urllib.parse.quote(name, safe="")


# ----- adapter cards ----------------------------------------------------------------------------
def test_adapter_card(comfy_server, loras):
    params = write_tlora(loras / "routes_card.safetensors", **{"tlora.train.steps": "7",
                                                                "tlora.train.partial": "false",
                                                                "tlora.train.instance_prompt": "a photo of sks dog"})
    for prefix in ("", "/api"):  # the frontend calls /api/...; both must answer
        status, info, text = get(comfy_server, prefix + q("routes_card.safetensors"))
        assert status == 200, text
        assert info["name"] == "routes_card.safetensors" and info["tlora"] is True
        assert info["params"] == params and info["modules"] == len(SHAPES)
        assert info["file_bytes"] == (loras / "routes_card.safetensors").stat().st_size
        assert info["architecture"] == "stable-diffusion-v1"
        assert info["config"]["transform"] == "trm:2" and info["config"]["residual"] == "tr:3"
        assert sum(info["kinds"].values()) == len(SHAPES) and "trm:2 + tr:3" in info["kinds"]
        assert info["training"]["tlora.train.steps"] == "7" and info["partial"] is False
        assert_reveals_nothing(comfy_server, text)


def test_adapter_in_a_subfolder(comfy_server, loras):
    (loras / "routes_sub").mkdir()
    params = write_tlora(loras / "routes_sub" / "inner.safetensors", seed=3)
    status, info, text = get(comfy_server, q("routes_sub/inner.safetensors"))
    assert status == 200, text
    assert info["params"] == params and info["name"] == "routes_sub/inner.safetensors"


def test_plain_lora_gets_a_card_too(comfy_server, loras):
    write_plain_lora(loras / "routes_plain.safetensors")
    status, info, text = get(comfy_server, q("routes_plain.safetensors"))
    assert status == 200, text
    assert info["tlora"] is False and info["file_bytes"] == (loras / "routes_plain.safetensors").stat().st_size
    assert info["training"]["ss_network_module"] == "networks.lora"


def test_broken_tlora_file_is_a_clean_4xx(comfy_server, loras):
    good = loras / "routes_broken.safetensors"
    write_tlora(good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated: the header no longer fits the file
    status, info, text = get(comfy_server, q("routes_broken.safetensors"))
    assert 400 <= status < 500, text
    assert set(info) == {"error"}
    assert_reveals_nothing(comfy_server, text)


def test_metadata_of_any_size_makes_a_small_card(comfy_server, loras):
    """1,000 extra keys of 1 kB, a 1 MB architecture and a 1 MB tlora.config entry: the card stays a few kB,
    with the entries our card reads (issue 28: a 100,000-key file made a 40 MB card)."""
    import torch
    from tlora import ModuleAdapter, save_file
    junk = {f"ss_junk_{i:04d}": "j" * 1000 for i in range(1000)}
    adapters = {p: ModuleAdapter.create(s, "trm:2", "tr:3", shapes="auto", generator=torch.Generator().manual_seed(0))
                for p, s in SHAPES.items()}
    save_file(adapters, str(loras / "routes_big.safetensors"),
              config={"transform": "trm:2", "residual": "tr:3", "targets": "attn", "junk": "c" * 2 ** 20},
              metadata={"modelspec.architecture": "a" * 2 ** 20, "tlora.train.partial": "true",
                        "tlora.train.steps": "3", **junk})
    status, info, text = get(comfy_server, q("routes_big.safetensors"))
    assert status == 200, text[:300]
    assert len(text) < 64 * 1024, len(text)
    assert info["partial"] is True and info["training"]["tlora.train.steps"] == "3"
    assert len(info["training"]) <= 65 and "more metadata entries not shown" in info["training"]["…"]
    assert len(info["architecture"]) <= 81 and "junk" not in info["config"]
    assert info["config"]["transform"] == "trm:2" and info["config"]["transform_kinds"] == {"trm:2": len(SHAPES)}


# Everything here must be refused: not in the loras list, escaping it, or malformed.
HOSTILE = [
    "?name=..%2Fcomfy.log",
    "?name=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "?name=%2e%2e%2fcomfy.log",
    "?name=%2e%2e%2f%2e%2e%2fcomfy.db",
    "?name=%2e%2e%5ccomfy.log",
    "?name=..%5C..%5Ccomfy.log",
    "?name=%252e%252e%252fcomfy.log",          # double-encoded
    "?name=%2Fetc%2Fpasswd",
    "?name=C%3A%5CWindows%5Cwin.ini",
    "?name=routes_card.safetensors%00",
    "?name=%00",
    "?name=routes_card.safetensors%00.png",
    "?name=.%2Froutes_card.safetensors",       # a spelling of a real file that is not the listed name
    "?name=routes_sub%2F..%2Froutes_card.safetensors",
    "?name=..%2Floras%2Froutes_card.safetensors",
    "?name=..%2Fsecret.safetensors",           # a real TLoRA file one folder up
    "?name=",
    "",                                         # no name at all
    "?name=routes_card.safetensors&name=routes_card.safetensors",
    "?name=" + "a" * 5000,
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_names_are_refused(comfy_server, loras, query):
    write_tlora(loras / "routes_card.safetensors")
    write_tlora(comfy_server.loras_dir.parent / "secret.safetensors")
    try:
        for prefix in ("", "/api"):
            status, info, text = get(comfy_server, prefix + "/tlora/adapter" + query)
            assert 400 <= status < 500, f"{query} -> {status}: {text[:200]}"
            assert info is None or set(info) == {"error"}, text[:300]
            assert_reveals_nothing(comfy_server, text)
    finally:
        (comfy_server.loras_dir.parent / "secret.safetensors").unlink()


def test_absolute_path_of_a_listed_file_is_refused(comfy_server, loras):
    path = loras / "routes_abs.safetensors"
    write_tlora(path)
    status, info, text = get(comfy_server, q(str(path)))
    assert status == 404 and info == {"error": "unknown adapter"}, text


def test_symlinks_out_of_the_folder_are_refused(comfy_server, loras, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_tlora(outside / "elsewhere.safetensors")
    (loras / "routes_link.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (loras / "routes_linkdir").symlink_to(outside, target_is_directory=True)
    # ComfyUI itself lists both (it follows links), so the allow-list alone would not catch them.
    listed = comfy_server.get_json("/models/loras")
    assert "routes_link.safetensors" in listed and "routes_linkdir/elsewhere.safetensors" in listed
    for name in ("routes_link.safetensors", "routes_linkdir/elsewhere.safetensors"):
        status, info, text = get(comfy_server, q(name))
        assert status == 404 and info == {"error": "unknown adapter"}, text
        assert_reveals_nothing(comfy_server, text)
    # A link that stays inside the folder is an ordinary alias and works.
    params = write_tlora(loras / "routes_target.safetensors", seed=5)
    (loras / "routes_alias.safetensors").symlink_to(loras / "routes_target.safetensors")
    status, info, _ = get(comfy_server, q("routes_alias.safetensors"))
    assert status == 200 and info["params"] == params


# ----- training runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/tlora/runs/..%2F..%2Fcomfy.log", "/tlora/runs/%2e%2e", "/tlora/runs/a%00b",
                                  "/tlora/runs/" + "x" * 200, "/tlora/runs/a.b", "/tlora/runs/..%5Cx",
                                  "/tlora/runs/ok?since=abc"])
def test_hostile_run_ids_are_refused(comfy_server, path):
    status, info, text = get(comfy_server, path)
    assert 400 <= status < 500, f"{path} -> {status}: {text[:200]}"
    assert info is None or set(info) == {"error"}
    assert_reveals_nothing(comfy_server, text)


def test_unknown_run_is_404(comfy_server):
    status, info, _ = get(comfy_server, "/tlora/runs/0000000000-abcdef")
    assert status == 404 and info == {"error": "unknown run"}


_ABS = re.compile(r"(^|[\s\"'])(/[^\s\"']+/|[A-Za-z]:\\)")


def test_run_state_follows_a_real_training_run(comfy_server, loras):
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 8421504}},
        "train": {"class_type": "TLoRATrain", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["img", 0],
            "instance_prompt": "a photo of sks dog", "steps": 3, "output_name": "routes_run", "transform": "trm:2",
            "residual": "tr:6", "targets": "attn", "learning_rate": 1e-3, "batch_size": 1, "resolution": 64,
            "loss": "mse", "seed": 0, "save_every": 0, "sample_every": 0}},
    }
    with comfy_server.events() as ev:
        pid = comfy_server.post_prompt(graph, client_id=ev.client_id)
        end = ev.wait_done(pid, timeout=300)
        events = [m["data"] for m in ev.messages if m.get("type") == "tlora.train"]
    assert end["type"] == "execution_success", end
    steps = [e for e in events if "status" not in e]
    final = [e for e in events if e.get("status")]
    assert [e["step"] for e in steps] == [1, 2, 3] and final and final[-1]["status"] == "done"
    run_id = steps[0]["run_id"]

    status, listing, text = get(comfy_server, "/tlora/runs")
    assert status == 200, text
    short = next(r for r in listing["runs"] if r["run_id"] == run_id)
    assert "history" not in short and short["status"] == "done"

    status, run, text = get(comfy_server, f"/tlora/runs/{run_id}")
    assert status == 200, text
    assert run["status"] == "done" and run["steps"] == 3
    assert [(h["step"], h["loss"]) for h in run["history"]] == [(e["step"], e["loss"]) for e in steps]
    assert run["state"]["step"] == 3
    summary = run["summary"]
    assert summary["file"] == final[-1]["file"]
    assert summary["partial"] is False and summary["params"] > 0
    assert summary["file_bytes"] == (loras / summary["file"]).stat().st_size
    # The registry holds full paths; none may leave the server.
    assert "path" not in json.dumps(run) and not _ABS.search(text), text[:500]
    assert_reveals_nothing(comfy_server, text)

    status, tail, _ = get(comfy_server, f"/tlora/runs/{run_id}?since=2")
    assert status == 200 and [h["step"] for h in tail["history"]] == [3]


def test_routes_logged_no_errors(comfy_server):
    assert "web route failed" not in comfy_server.log_text()
    assert "web routes not registered" not in comfy_server.log_text()


def test_run_records_are_allow_listed(comfy_host):
    """Registry fields the routes do not know (paths, prompts) never reach the browser."""
    import importlib

    from harness import comfy_host as ch
    comfy_host.require_pack()
    routes = importlib.import_module(f"{ch.pack_module_name()}.nodes.routes")
    record = {"run_id": "1-abc", "status": "running", "steps": 5, "path": "/secret/loras/x.safetensors",
              "output_path": "/secret/x", "prompt": {"1": {"inputs": {"ckpt_name": "/secret/ckpt"}}},
              "state": {"step": 2, "loss": float("nan"), "path": "/secret", "sample": {"filename": "../../x.png",
                                                                                      "subfolder": "", "type": "temp"}},
              "history": [{"step": 1, "loss": 1.0, "lr": 1e-4, "path": "/secret"}, {"step": 2, "loss": float("inf")}],
              "summary": {"path": "/secret/loras/x.safetensors", "final_loss": 0.5}}
    out = routes.public_run(record)
    text = json.dumps(out, allow_nan=False)  # NaN/inf became null: browsers' JSON.parse rejects them
    assert "/secret" not in text and "prompt" not in out and "output_path" not in out
    assert out["file"] == "x.safetensors" and out["state"]["loss"] is None and "sample" not in out["state"]
    assert out["history"] == [{"step": 1, "loss": 1.0, "lr": 1e-4}, {"step": 2, "loss": None}]


def test_run_record_sample_summary_and_messages(comfy_host):
    """The latest sample keeps its step and gets a /view URL built from its plain names; a run that saved
    nothing names no file; error messages lose their absolute paths."""
    import importlib
    import urllib.parse as up

    from harness import comfy_host as ch
    comfy_host.require_pack()
    routes = importlib.import_module(f"{ch.pack_module_name()}.nodes.routes")
    record = {"run_id": "2-abc", "status": "failed", "steps": 5, "node": "7", "prompt_id": "p-1",
              "path": "/secret/loras/y.safetensors", "file_name": "y.safetensors",
              "state": {"step": 0, "sample": {"filename": "2-abc_000004.png", "subfolder": "tlora", "type": "temp",
                                              "step": 4, "url": "http://evil.example/x"}},
              "summary": {"steps_done": 0, "partial": True, "file_name": None,
                          "message": "could not read /secret/data/img.png: broken"}}
    out = routes.public_run(record)
    text = json.dumps(out, allow_nan=False)
    assert "/secret" not in text and "evil" not in text
    sample = out["state"]["sample"]
    assert sample["step"] == 4 and sample["filename"] == "2-abc_000004.png"
    query = dict(up.parse_qsl(up.urlsplit(sample["url"]).query))
    assert sample["url"].startswith("/view?") and query == {"filename": "2-abc_000004.png", "subfolder": "tlora",
                                                             "type": "temp"}
    assert (out["node"], out["prompt_id"], out["file"]) == ("7", "p-1", "y.safetensors")
    summary = out["summary"]
    assert summary["file"] is None and summary["partial"] is True and summary["steps_done"] == 0
    assert summary["message"] == "could not read img.png: broken"
    for bad in ({"filename": "x.png", "subfolder": "../up", "type": "temp"},
                {"filename": "x.png", "subfolder": "tlora", "type": "input"},
                {"filename": "a\\b.png", "subfolder": "tlora", "type": "temp"}):
        assert "sample" not in routes.public_run({**record, "run_id": "3-abc", "state": {"sample": bad}})["state"]
