#!/usr/bin/env python3
"""`make demo`: a TLoRA adapter applied in a real, headless ComfyUI, images before/after.

    .venv/bin/python scripts/demo.py [--ckpt PATH] [--out DIR] [--steps N] [--size PX]

Steps (each a function, so later demos can add training in between):
  1. prepare_checkpoint  the embedded tiny SD1.5 checkpoint (scripts/make_checkpoint.py,
                         cached in .cache/), or --ckpt PATH (an SD1.5/SDXL .safetensors).
  2. make_adapter        a TLoRA file for that checkpoint's attention modules, written with
                         the core (`tlora`): untrained adapters are an exact identity, so the
                         cores are moved off their start to make the effect visible.
  3. run_workflows       start ComfyUI (--cpu, headless, this pack linked in), convert the UI
                         workflow example_workflows/tlora_load_and_sample.json to the API
                         format using the server's own /object_info, and run it over HTTP at
                         strengths 0 and 1.
Outputs in out/demo/: strength_0.png, strength_1.png, before_after.png, adapter_info.txt,
workflow_api.json (the graph as sent), server/comfy.log. The UI workflow is run as is
except: checkpoint and adapter names, the strength, and (to stay quick on a CPU) the image
size and step count (--size/--steps; 0 keeps the workflow's own values).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKFLOW = ROOT / "example_workflows" / "tlora_load_and_sample.json"
DEFAULT_OUT = ROOT / "out" / "demo"
ADAPTER_NAME = "tlora_demo.safetensors"
ATTENTION = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
# Widget types of ComfyUI inputs (everything else is a link between nodes).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. checkpoint

def prepare_checkpoint(ckpt: Optional[str] = None) -> Path:
    """The checkpoint to use: --ckpt as given, else the embedded one (built once into .cache/)."""
    if ckpt:
        path = Path(ckpt).expanduser().resolve()
        if not path.is_file() or path.suffix != ".safetensors":
            raise SystemExit(f"--ckpt {ckpt}: not a .safetensors file")
        return path
    from tests.support.server import ensure_checkpoint
    log("preparing the embedded tiny SD1.5 checkpoint (scripts/make_checkpoint.py, cached)")
    return ensure_checkpoint(0)


def checkpoint_targets(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """{`diffusion_model.<path>`: weight shape} of every attention linear in a checkpoint (header only)."""
    from safetensors import safe_open
    out: dict[str, tuple[int, ...]] = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(ATTENTION):
                out[key[len("model."):-len(".weight")]] = tuple(f.get_slice(key).get_shape())
    if not out:
        raise SystemExit(f"{ckpt}: no UNet attention weights (model.diffusion_model.*.to_q.weight ...) found; "
                         "is it an SD1.5/SDXL checkpoint in the single-file format?")
    return out


# --------------------------------------------------------------------------- 2. adapter

def make_adapter(ckpt: Path, out_path: Path, seed: int = 0, transform: str = "trm:2", residual: str = "tr:4",
                 transform_noise: float = 0.25, residual_noise: float = 0.5) -> Path:
    """A TLoRA file for the checkpoint's attention modules with cores moved off their start."""
    import torch
    from tlora import ModuleAdapter, save_file
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for prefix, shape in checkpoint_targets(ckpt).items():
        start = ModuleAdapter.create(shape, transform, residual, shapes="paper", generator=g, name=prefix)
        tensors = {}
        for name, t in start.tensors.items():
            if name.startswith("tlora_t."):  # T = I + a random tensor-ring perturbation
                tensors[name] = t + transform_noise * torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1])
            elif name.startswith("tlora_r."):  # Delta != 0: every residual core drawn afresh
                tensors[name] = residual_noise * torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1])
            else:
                tensors[name] = t
        adapters[prefix] = ModuleAdapter(tensors, name=prefix, weight_shape=shape)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapters, out_path, config={"transform": transform, "residual": residual, "targets": "attn",
                                          "shapes": "paper", "title": "TLoRA demo (random, untrained)"},
              metadata={"tlora.demo.checkpoint": ckpt.name, "tlora.demo.seed": seed})
    return out_path


# --------------------------------------------------------------------------- 3. workflows

def load_workflow(path: Path = WORKFLOW) -> dict:
    """A ComfyUI UI (litegraph) workflow file."""
    return json.loads(Path(path).read_text())


def node_inputs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's required then optional inputs, in /object_info order."""
    out = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        spec = (info.get("input") or {}).get(section) or {}
        for name in order.get(section) or list(spec):
            entry = spec[name]
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            out.append((name, kind, opts))
    return out


def is_widget(kind: Any) -> bool:
    """True for inputs the UI shows as widgets (values), False for links (MODEL, CLIP, ...)."""
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(info: dict) -> list[Optional[str]]:
    """The input name behind each widgets_values entry (None for the UI's seed-control value)."""
    slots: list[Optional[str]] = []
    for name, kind, opts in node_inputs(info):
        if is_widget(kind):
            slots.append(name)
            if opts.get("control_after_generate"):
                slots.append(None)  # "fixed" / "randomize" ... stored right after the value
    return slots


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI workflow (nodes, widgets_values, links) to the API graph POST /prompt takes.

    Widgets map to inputs by /object_info's input order (plus the seed-control value the UI
    stores after seeds); links become [source node id, output slot]. Muted nodes are dropped;
    bypassed nodes, reroutes and primitives are not supported (ValueError).
    """
    links = {lk[0]: lk for lk in workflow.get("links", [])}
    graph: dict = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}): bypassed nodes are not supported")
        info = object_info.get(node["type"])
        if info is None:
            raise ValueError(f"node {node['id']}: type {node['type']!r} is not installed on this server")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        slots = widget_slots(info)
        if len(values) != len(slots):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                             f"{len(slots)} widget slots {slots}")
        for slot, value in zip(slots, values):
            if slot is not None:
                inputs[slot] = value
        for entry in node.get("inputs") or []:
            if entry.get("link") is not None:
                lk = links[entry["link"]]
                inputs[entry["name"]] = [str(lk[1]), int(lk[2])]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                  "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return graph


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    """Every node of one class in an API graph."""
    return [n for n in graph.values() if n["class_type"] == class_type]


def set_inputs(graph: dict, class_type: str, **values: Any) -> None:
    """Set widget inputs on every node of `class_type` (KeyError if there is none)."""
    targets = nodes_of(graph, class_type)
    if not targets:
        raise KeyError(f"the workflow has no {class_type} node")
    for n in targets:
        n["inputs"].update(values)


def start_server(base_dir: Path, ckpt: Path, ckpt_name: str) -> Any:
    """A headless ComfyUI (tests/support/server.py's ComfyServer) with the checkpoint linked in."""
    from tests.support.server import ComfyServer
    threads = str(max(1, min(4, os.cpu_count() or 1)))
    srv = ComfyServer(base_dir, checkpoints={ckpt_name: ckpt}, env={"OMP_NUM_THREADS": threads})
    log(f"starting ComfyUI (log: {srv.log_path})")
    srv.start(timeout=180)
    srv.assert_pack_imported()
    return srv


def run_workflows(server: Any, workflow: dict, adapter_path: Path, out_dir: Path, ckpt_name: str,
                  strengths: tuple[float, ...] = (0.0, 1.0), steps: int = 0, size: int = 0,
                  timeout: float = 900.0) -> dict[float, Path]:
    """Run the UI workflow over HTTP once per strength; images and the adapter info land in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    server.loras_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(adapter_path, server.loras_dir / ADAPTER_NAME)
    base = ui_to_api(workflow, server.object_info())
    set_inputs(base, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    set_inputs(base, "TLoRALoader", adapter_name=ADAPTER_NAME)
    set_inputs(base, "TLoRAInfo", adapter_name=ADAPTER_NAME)
    if steps:
        set_inputs(base, "KSampler", steps=steps)
    if size:
        set_inputs(base, "EmptyLatentImage", width=size, height=size)
    images: dict[float, Path] = {}
    for strength in strengths:
        graph = copy.deepcopy(base)
        set_inputs(graph, "TLoRALoader", strength_model=strength, strength_clip=strength)
        set_inputs(graph, "SaveImage", filename_prefix=f"tlora_demo/strength_{strength:g}")
        (out_dir / "workflow_api.json").write_text(json.dumps(graph, indent=2))
        t0 = time.perf_counter()
        entry = server.run(graph, timeout=timeout)
        status = entry.get("status") or {}
        if status.get("status_str") != "success":
            raise RuntimeError(f"workflow failed at strength {strength}: {json.dumps(status)[:2000]}")
        outputs = entry.get("outputs") or {}
        saved = [img for n in graph if n in outputs for img in outputs[n].get("images", [])
                 if graph[n]["class_type"] == "SaveImage"]
        src = server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
        images[strength] = out_dir / f"strength_{strength:g}.png"
        shutil.copy2(src, images[strength])
        info = [t for n in graph if n in outputs and graph[n]["class_type"] == "TLoRAInfo"
                for t in outputs[n].get("text", [])]
        if info:
            (out_dir / "adapter_info.txt").write_text(info[0] + "\n")
        log(f"strength {strength:g}: {images[strength].name} in {time.perf_counter() - t0:.1f} s")
    return images


def side_by_side(images: dict[float, Path], out_path: Path) -> Optional[Path]:
    """One PNG: the images by strength, then |first - last| x4; None if Pillow is missing."""
    try:
        from PIL import Image, ImageChops, ImageDraw
    except ImportError:
        return None
    tiles = [(f"strength {s:g}", Image.open(p).convert("RGB")) for s, p in sorted(images.items())]
    diff = ImageChops.difference(tiles[0][1], tiles[-1][1]).point(lambda v: min(255, 4 * v))
    tiles.append(("|difference| x4", diff))
    w, h = tiles[0][1].size
    sheet = Image.new("RGB", (w * len(tiles), h + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(tiles):
        sheet.paste(img, (i * w, 16))
        draw.text((i * w + 4, 2), label, fill="black")
    sheet.save(out_path)
    return out_path


def main(argv: Optional[list[str]] = None) -> int:
    """Prepare checkpoint and adapter, run the example workflow at strengths 0 and 1, print the folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="an SD1.5/SDXL .safetensors checkpoint (default: the embedded tiny one)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default out/demo)")
    ap.add_argument("--steps", type=int, default=6, help="sampler steps (0: the workflow's own; default 6)")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (0: the workflow's own; default 128)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo adapter's random cores")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out_dir = Path(a.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)  # earlier results are overwritten, nothing else is removed
    ckpt = prepare_checkpoint(a.ckpt)
    adapter = make_adapter(ckpt, out_dir / ADAPTER_NAME, seed=a.seed)
    log(f"adapter {adapter.name} for {len(checkpoint_targets(ckpt))} attention modules of {ckpt.name}")
    workflow = load_workflow()
    ckpt_name = ckpt.name
    server = start_server(out_dir / "server", ckpt, ckpt_name)
    try:
        images = run_workflows(server, workflow, adapter, out_dir, ckpt_name, steps=a.steps, size=a.size)
    finally:
        server.stop()
    side_by_side(images, out_dir / "before_after.png")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
