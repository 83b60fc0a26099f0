#!/usr/bin/env python3
"""`make demo`: train a TLoRA on a novel subject inside a real, headless ComfyUI, then show before/after.

    .venv/bin/python tools/demo.py [--subject quib] [--train-steps N] [--lr LR] [--out DIR]
    .venv/bin/python tools/demo.py --tiny            # the old fast path: no build, no training
    .venv/bin/python tools/demo.py --ckpt PATH       # the old path on your own SD1.5/SDXL checkpoint

Default path (the pack's main job, on the embedded default model):
  1. prepare_default_model  .cache/default_model/tlora-proving-sd15.safetensors, built once by
                            tools/build_default_model.py (~20 min on 2 CPU cores; reused after).
  2. write_subject_images   5 procedural images of a novel subject (proving.procedural; default
                            "quib", a purple heart with white dots, a word the model never saw)
                            plus one caption .txt each, into ComfyUI's input/<subject>/ folder.
  3. start_server           ComfyUI (--cpu, headless, this pack linked in, the checkpoint linked
                            into models/checkpoints).
  4. run_training           example_workflows/tlora_train_subject.json (UI format, converted with
                            the server's own /object_info) over HTTP: Load Image and Text Dataset
                            from Folder -> Train TLoRA (with Load Checkpoint) -> models/loras, the
                            loss curve saved, one sample of the trained model.
  5. sample_before_after    example_workflows/tlora_load_and_sample.json with the trained file in
                            Load TLoRA at strength 0 and 1, same seeds, on held-out prompts (the
                            subject on backgrounds and in places the training images never show).
  6. measure + write        subject similarity (proving.measure: the generated object against the
                            training images after a round trip through the model's own VAE, also
                            run in ComfyUI), template score and background accuracy, before vs after.
Outputs in out/demo/: loss_curve.png, before_after.png (labelled grid), <name>.safetensors,
summary.txt (+ summary.json), training_images.png, trained_sample.png, workflow_train_api.json,
server/comfy.log.

--tiny / --ckpt: the original demo (a random, untrained TLoRA on the tiny harness checkpoint or
your checkpoint, applied through tlora_load_and_sample.json at strengths 0 and 1): strength_0.png,
strength_1.png, before_after.png, adapter_info.txt, workflow_api.json.
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
# Training demo defaults: sized for a few minutes on 2 CPU cores (see README).
DEFAULT_TRAIN_STEPS = 200
DEFAULT_LR = 3e-3
DEFAULT_LOSS = "mse"
DEFAULT_BATCH = 2
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
    from harness.server import ensure_checkpoint
    log("preparing the embedded tiny SD1.5 checkpoint (tools/make_checkpoint.py, cached)")
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


def start_server(base_dir: Path, ckpt: Path, ckpt_name: str, threads: int = 0) -> Any:
    """A headless ComfyUI (harness/server.py's ComfyServer) with the checkpoint linked in."""
    from harness.server import ComfyServer
    cpus = os.cpu_count() or 1
    # On 2-core machines a second torch thread spin-waits against everything else (much slower).
    n = threads or int(os.environ.get("TLORA_TORCH_THREADS", "0")) or (1 if cpus <= 2 else min(4, cpus))
    # Fixed forms (TLORA_AUTOTUNE=0): timed form trials pick by the clock, and forms round differently,
    # so with autotune two runs of the demo on one machine would train different adapters.
    srv = ComfyServer(base_dir, checkpoints={ckpt_name: ckpt},
                      env={"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "TLORA_AUTOTUNE": "0"})
    srv.torch_threads = n
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


# =========================================================================== the training demo

TRAIN_WORKFLOW = ROOT / "example_workflows" / "tlora_train_subject.json"
DEFAULT_SUBJECT = "quib"
SAMPLE = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}  # the default model's test settings


def prepare_default_model(timeout: float = 3 * 3600) -> Path:
    """The embedded default model, built once by tools/build_default_model.py (a finished build returns at once)."""
    from proving.default_model import BuildConfig, default_path, is_built
    path = default_path()
    if is_built(path, BuildConfig.make()):  # the file and a manifest naming the current build config
        log(f"default model: {path.relative_to(ROOT)} (cached)")
        return path
    log("building the embedded default model (tools/build_default_model.py): about 20 minutes on 2 CPU "
        "cores the first time, cached in .cache/default_model/ and reused after")
    import subprocess
    from harness.server import venv_python
    res = subprocess.run([venv_python(), str(ROOT / "tools" / "build_default_model.py")],
                         stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = (res.stdout or "").strip().splitlines()
    if res.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise SystemExit(f"tools/build_default_model.py failed (exit {res.returncode})")
    return Path(lines[-1])


def write_subject_images(subject: str, folder: Path, n: int = 5, seed: int = 0) -> list[tuple[Path, str]]:
    """n procedural images of a subject and their captions as <folder>/<subject>_<i>.png + .txt."""
    from PIL import Image
    from proving.procedural import subject_images
    images, captions = subject_images(subject, n, seed=seed)
    if folder.exists():
        shutil.rmtree(folder)  # only the demo's own images live here
    folder.mkdir(parents=True)
    out = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        p = folder / f"{subject}_{i}.png"
        Image.fromarray(img).save(p)
        p.with_suffix(".txt").write_text(cap + "\n")
        out.append((p, cap))
    return out


def set_node(graph: dict, node_id: str, **values: Any) -> None:
    """Set widget inputs of one node of an API graph."""
    graph[node_id]["inputs"].update(values)


def positive_encoder(graph: dict) -> str:
    """Id of the CLIPTextEncode feeding a KSampler's positive input."""
    ks = nodes_of(graph, "KSampler")[0]
    return str(ks["inputs"]["positive"][0])


def negative_encoder(graph: dict) -> str:
    """Id of the CLIPTextEncode feeding a KSampler's negative input."""
    ks = nodes_of(graph, "KSampler")[0]
    return str(ks["inputs"]["negative"][0])


def saved_images(server: Any, graph: dict, entry: dict, class_type: str = "SaveImage") -> dict[str, list[Path]]:
    """{node id: [files]} written by the SaveImage nodes of a finished prompt."""
    outputs = entry.get("outputs") or {}
    return {n: [server.output_dir / im["subfolder"] / im["filename"] for im in outputs[n].get("images", [])]
            for n in graph if n in outputs and graph[n]["class_type"] == class_type}


def run_graph(server: Any, graph: dict, what: str, timeout: float, events: Optional[list] = None) -> dict:
    """POST a graph, wait for it, fail loudly unless it succeeded; with `events`, log and keep tlora.train events."""
    import uuid
    client_id = f"tlora-demo-{uuid.uuid4().hex[:8]}"
    reader = server.events(client_id) if events is not None else None
    try:
        pid = server.post_prompt(graph, client_id=client_id)
        deadline, last_log, last_step = time.monotonic() + timeout, 0.0, None
        while True:
            entry = server.history(pid)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                break
            if not server.alive():
                raise RuntimeError(f"ComfyUI died during {what}\n{server.log_tail()}")
            if time.monotonic() > deadline:
                server.interrupt()
                raise RuntimeError(f"{what} did not finish in {timeout:.0f} s")
            if reader is not None and time.monotonic() - last_log > 15:
                seen = reader.of_type("tlora.train")
                if seen and seen[-1].get("step") != last_step:
                    e = seen[-1]
                    last_step = e.get("step")
                    log(f"  step {e.get('step')}/{e.get('steps')}  loss {e.get('loss', float('nan')):.4f}  "
                        f"{e.get('step_time', 0):.2f} s/step  eta {e.get('eta', 0):.0f} s")
                    last_log = time.monotonic()
            time.sleep(0.5)
    finally:
        if reader is not None:
            events.extend(e for e in reader.of_type("tlora.train") if e.get("loss") is not None)
            reader.close()
    status = entry.get("status") or {}
    if status.get("status_str") != "success":
        raise RuntimeError(f"{what} failed: {json.dumps(status)[:3000]}\n{server.log_tail(40)}")
    return entry


def run_training(server: Any, object_info: dict, ckpt_name: str, subject: str, captions: list[str], out_dir: Path,
                 steps: int, lr: float, loss: str, batch: int, output_name: str, seed: int = 0,
                 timeout: float = 3600) -> dict:
    """The training workflow over HTTP; returns the trained file, loss curve and timing."""
    from proving.procedural import SUBJECTS, held_out_prompts
    for old in server.loras_dir.glob(f"{output_name}*"):  # the name is never overwritten: start clean
        old.unlink()
    graph = ui_to_api(load_workflow(TRAIN_WORKFLOW), object_info)
    set_inputs(graph, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    set_inputs(graph, "LoadImageTextDataSetFromFolder", folder=subject)
    set_inputs(graph, "TLoRATrain", instance_prompt=f"a {SUBJECTS[subject].word}", steps=steps, learning_rate=lr,
               loss=loss, batch_size=batch, output_name=output_name, seed=seed, save_every=0, sample_every=0)
    set_node(graph, positive_encoder(graph), text=held_out_prompts(subject)[0].text)
    (out_dir / "workflow_train_api.json").write_text(json.dumps(graph, indent=2))
    log(f"training: {steps} steps, lr {lr:g}, {loss} loss, batch {batch}, on {len(captions)} images "
        f"(captions like {captions[0]!r})")
    t0 = time.perf_counter()
    events: list[dict] = []
    entry = run_graph(server, graph, "the training workflow", timeout, events=events)
    seconds = time.perf_counter() - t0
    files = sorted(server.loras_dir.glob(f"{output_name}*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"the training workflow wrote no {output_name}*.safetensors in {server.loras_dir}")
    saved = saved_images(server, graph, entry)
    by_prefix = {graph[n]["inputs"]["filename_prefix"]: paths for n, paths in saved.items()}
    shutil.copy2(by_prefix["tlora_train/loss_curve"][0], out_dir / "loss_curve.png")
    sample_sheet(by_prefix["tlora_train/trained_sample"], out_dir / "trained_sample.png")
    shutil.copy2(files[-1], out_dir / files[-1].name)
    log(f"trained {files[-1].name} in {seconds:.0f} s")
    by_step = {int(e["step"]): float(e["loss"]) for e in events if e.get("step") is not None}  # the last event repeats
    losses = [by_step[k] for k in sorted(by_step)]
    if losses:
        (out_dir / "loss_history.txt").write_text("".join(f"{i + 1} {v:.6f}\n" for i, v in enumerate(losses)))
    return {"file": files[-1], "seconds": seconds, "graph": graph, "losses": losses}


def vae_round_trip(server: Any, ckpt_name: str, subject: str, timeout: float = 300) -> list[Path]:
    """The training images encoded and decoded by the model's own VAE (in ComfyUI): the best it can render."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": subject}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["data", 0], "vae": ["ckpt", 2]}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "tlora_demo/vae"}},
    }
    entry = run_graph(server, graph, "the VAE round trip", timeout)
    return saved_images(server, graph, entry)["out"]


def sample_before_after(server: Any, object_info: dict, ckpt_name: str, adapter_name: str, prompts: list[str],
                        seed: int, batch: int, timeout: float = 600) -> dict[tuple[str, float], list[Path]]:
    """tlora_load_and_sample.json with the trained file at strengths 0 and 1, same seed, per prompt."""
    base = ui_to_api(load_workflow(), object_info)
    set_inputs(base, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    set_inputs(base, "TLoRALoader", adapter_name=adapter_name)
    set_inputs(base, "TLoRAInfo", adapter_name=adapter_name)
    set_inputs(base, "KSampler", seed=seed, **SAMPLE)
    set_inputs(base, "EmptyLatentImage", width=64, height=64, batch_size=batch)
    set_node(base, negative_encoder(base), text="")
    out: dict[tuple[str, float], list[Path]] = {}
    for strength in (0.0, 1.0):  # strength outer: ComfyUI patches the weights once per strength
        for i, prompt in enumerate(prompts):
            graph = copy.deepcopy(base)
            set_node(graph, positive_encoder(graph), text=prompt)
            set_inputs(graph, "TLoRALoader", strength_model=strength, strength_clip=strength)
            set_inputs(graph, "SaveImage", filename_prefix=f"tlora_demo/p{i}_s{strength:g}")
            entry = run_graph(server, graph, f"sampling {prompt!r} at strength {strength:g}", timeout)
            out[(prompt, strength)] = [p for ps in saved_images(server, graph, entry).values() for p in ps]
    return out


def measure(images: dict[tuple[str, float], list[Path]], refs: list[Path], subject: str, prompts: list) -> dict:
    """Subject similarity / template score / background accuracy per strength (proving.measure)."""
    import numpy as np
    from PIL import Image
    from proving import measure as M
    ref_crops = [c for c in (M.object_crop(np.asarray(Image.open(p).convert("RGB"))) for p in refs) if c is not None]
    result: dict[str, Any] = {"per_prompt": []}
    sums: dict[float, dict[str, list[float]]] = {0.0: {}, 1.0: {}}
    for sp in prompts:
        row = {"prompt": sp.text}
        for strength in (0.0, 1.0):
            vals: dict[str, list[float]] = {"similarity": [], "template": [], "background": []}
            for p in images[(sp.text, strength)]:
                img = np.asarray(Image.open(p).convert("RGB"))
                vals["similarity"].append(M.subject_similarity(img, ref_crops))
                vals["template"].append(M.subject_fidelity(img, subject)["score"])
                vals["background"].append(float(M.placement(img)["background"] == sp.background))
            row[f"{strength:g}"] = {k: float(np.mean(v)) for k, v in vals.items()}
            for k, v in vals.items():
                sums[strength].setdefault(k, []).extend(v)
        result["per_prompt"].append(row)
    result["overall"] = {f"{s:g}": {k: float(np.mean(v)) for k, v in d.items()} for s, d in sums.items()}
    # The ceiling: the training images themselves after the VAE round trip, scored the same way.
    result["reference_similarity"] = float(np.mean([
        M.subject_fidelity(np.asarray(Image.open(p).convert("RGB")), subject)["score"] for p in refs]))
    return result


def _font(size: int) -> Any:
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def sample_sheet(paths: list[Path], out_path: Path, scale: int = 2) -> Path:
    """The images of one SaveImage side by side (scaled up, pixels kept sharp)."""
    from PIL import Image
    tiles = [Image.open(p).convert("RGB") for p in paths]
    w, h = tiles[0].size
    sheet = Image.new("RGB", (len(tiles) * (w * scale + 4) - 4, h * scale), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t.resize((w * scale, h * scale), Image.NEAREST), (i * (w * scale + 4), 0))
    sheet.save(out_path)
    return out_path


def before_after_grid(training: list[Path], images: dict[tuple[str, float], list[Path]], prompts: list,
                      scores: dict, out_path: Path, title: str, scale: int = 2) -> Path:
    """Labelled grid: the training images, then per held-out prompt the seeds before | after."""
    from PIL import Image, ImageDraw
    t = scale * 64
    batch = len(images[(prompts[0].text, 0.0)])
    gap, pad, label_h = 16, 8, 20
    width = 2 * pad + 2 * batch * (t + 2) + gap
    height = pad + 2 * label_h + (t + label_h + 4) * (len(prompts) + 1) + 4 * label_h
    sheet = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(sheet)
    f, fb = _font(13), _font(15)
    y = pad
    d.text((pad, y), title, fill="black", font=fb)
    y += label_h + 4
    d.text((pad, y), f"training images ({len(training)}, with their captions)", fill="black", font=f)
    y += label_h
    for i, p in enumerate(training):
        sheet.paste(Image.open(p).convert("RGB").resize((t, t), Image.NEAREST), (pad + i * (t + 2), y))
    y += t + 8
    half = batch * (t + 2)
    d.text((pad, y), "before: strength 0 (base model)", fill="black", font=fb)
    d.text((pad + half + gap, y), "after: strength 1 (trained TLoRA)", fill="black", font=fb)
    y += label_h + 2
    for sp, row in zip(prompts, scores["per_prompt"]):
        b, a = row["0"]["similarity"], row["1"]["similarity"]
        d.text((pad, y), f'"{sp.text}"   subject similarity {b:.2f} -> {a:.2f}', fill="black", font=f)
        y += label_h
        for k, strength in enumerate((0.0, 1.0)):
            x0 = pad + k * (half + gap)
            for j, p in enumerate(images[(sp.text, strength)]):
                sheet.paste(Image.open(p).convert("RGB").resize((t, t), Image.NEAREST), (x0 + j * (t + 2), y))
        y += t + 4
    o = scores["overall"]
    d.text((pad, y + 4), f"mean subject similarity {o['0']['similarity']:.3f} -> {o['1']['similarity']:.3f};  "
                         f"background as prompted {o['0']['background']:.0%} -> {o['1']['background']:.0%}",
           fill="black", font=fb)
    sheet = sheet.crop((0, 0, width, y + label_h + 12))
    sheet.save(out_path)
    return out_path


def model_build(ckpt: Path) -> dict:
    """The build's manifest facts that decide the model's exact weights (empty for a foreign checkpoint)."""
    from proving.default_model import manifest_path
    try:
        m = json.loads(manifest_path(ckpt).read_text())
    except (OSError, ValueError):
        return {}
    return {k: m[k] for k in ("key", "numerics", "tensor_sha256") if k in m}


def write_summary(out_dir: Path, info: dict) -> str:
    """summary.txt (human) and summary.json (everything)."""
    o, tr = info["scores"]["overall"], info["training"]
    lines = [
        f"TLoRA demo: a novel subject trained inside a headless ComfyUI {info['comfyui']} on the embedded default model",
        f"model:        {info['ckpt']} (tensors sha256 {info['model_build'].get('tensor_sha256', '?')[:16]}, built "
        f"with {info['model_build'].get('numerics', '?')})",
        f"server:       {info['server_threads']} torch thread(s), fixed transform forms (TLORA_AUTOTUNE=0)",
        f"subject:      {info['subject']!r} ({info['subject_description']}), {info['n_images']} procedural "
        f"images (64 px) with captions, e.g. {info['captions'][0]!r}",
        f"adapter:      {tr['transform']} + {tr['residual']} on {tr['targets']} ({tr['modules']} modules), "
        f"{tr['params']:,} parameters, file {tr['file_bytes'] / 1024:.0f} KiB -> {tr['file']}",
        f"training:     {tr['steps']} steps, batch {tr['batch']}, lr {tr['lr']:g} ({tr['schedule']}), {tr['loss']} "
        f"loss, resolution {tr['resolution']}; {tr['seconds']:.0f} s in ComfyUI "
        f"({tr['seconds'] / max(1, tr['steps']):.2f} s/step incl. setup)",
        f"loss:         first 10 steps {tr['loss_first']:.4f}, last 10 steps {tr['loss_last']:.4f}, final "
        f"(file metadata) {tr['final_loss']}",
        f"sampling:     euler/normal, {SAMPLE['steps']} steps, CFG {SAMPLE['cfg']:g}, 64 px, seed {info['seed']} x "
        f"batch {info['batch']} per prompt, TLoRALoader strength 0 vs 1 (same seeds)",
        f"held-out prompts ({len(info['prompts'])}): " + "; ".join(info["prompts"]),
        "",
        "measured (proving.measure; no learned model)          before   after",
        f"  subject similarity to the training images (0..1)     {o['0']['similarity']:.3f}   {o['1']['similarity']:.3f}",
        f"  subject template score (shape/palette/pattern, 0..1)  {o['0']['template']:.3f}   {o['1']['template']:.3f}",
        f"  background as prompted (held-out colours)           {o['0']['background']:6.0%}   {o['1']['background']:6.0%}",
        f"  (template score of the training images after the VAE round trip, the ceiling: "
        f"{info['scores']['reference_similarity']:.3f})",
        "",
        "per prompt: subject similarity before -> after",
        *[f"  {r['prompt']:50s} {r['0']['similarity']:.3f} -> {r['1']['similarity']:.3f}"
          for r in info["scores"]["per_prompt"]],
        "",
        f"total demo time: {info['total_seconds']:.0f} s (training {tr['seconds']:.0f} s)",
    ]
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.txt").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str))
    return text


def loss_stats(path: Path) -> dict:
    """Steps, losses and settings from a trained file's metadata and its loss history, if recorded."""
    from tlora.cli import inspect_file
    info = inspect_file(str(path))
    meta = info["metadata"]
    return {"params": info["params"], "file_bytes": info["file_bytes"], "modules": info["modules"],
            "transform": info["config"].get("transform"), "residual": info["config"].get("residual"),
            "targets": info["config"].get("targets"), "final_loss": meta.get("tlora.train.final_loss"),
            "schedule": meta.get("tlora.train.lr_schedule", "constant"),
            "resolution": meta.get("tlora.train.resolution")}


def train_demo(a: argparse.Namespace) -> int:
    """The default demo: default model, subject images, training workflow, before/after, measurements."""
    from proving.procedural import SUBJECTS, held_out_prompts
    t_start = time.perf_counter()
    if a.subject not in SUBJECTS:
        raise SystemExit(f"--subject {a.subject}: one of {sorted(SUBJECTS)}")
    out_dir = Path(a.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)  # earlier results are overwritten, nothing else is removed
    for stale in ("strength_0.png", "strength_1.png", "adapter_info.txt", "workflow_api.json", ADAPTER_NAME):
        (out_dir / stale).unlink(missing_ok=True)  # the --tiny path's files, so out/demo shows one run
    ckpt = prepare_default_model()
    ckpt_name = ckpt.name
    server_dir = out_dir / "server"
    pictures = write_subject_images(a.subject, server_dir / "input" / a.subject, n=a.images)
    captions = [c for _, c in pictures]
    sample_sheet([p for p, _ in pictures], out_dir / "training_images.png")
    server = start_server(server_dir, ckpt, ckpt_name, threads=a.threads)
    try:
        object_info = server.object_info()
        output_name = f"tlora_demo_{a.subject}"
        trained = run_training(server, object_info, ckpt_name, a.subject, captions, out_dir, a.train_steps, a.lr,
                               a.loss, a.batch, output_name, seed=a.seed)
        refs = vae_round_trip(server, ckpt_name, a.subject)
        prompts = held_out_prompts(a.subject)
        t0 = time.perf_counter()
        images = sample_before_after(server, object_info, ckpt_name, trained["file"].name,
                                     [p.text for p in prompts], seed=a.sample_seed, batch=a.sample_batch)
        sample_seconds = time.perf_counter() - t0
        comfy_version = server.system_stats().get("system", {}).get("comfyui_version", "?")
    finally:
        server.stop()
    scores = measure(images, refs, a.subject, prompts)
    stats = loss_stats(trained["file"])
    losses = trained["losses"] or [float("nan")]
    history = (sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
    training = {**stats, "file": trained["file"].name, "steps": a.train_steps, "batch": a.batch, "lr": a.lr,
                "loss": a.loss, "seconds": trained["seconds"],
                "loss_first": history[0], "loss_last": history[1]}
    title = (f"TLoRA {stats['transform']} + {stats['residual']}, {a.train_steps} steps on 5 images of a "
             f"'{a.subject}' ({SUBJECTS[a.subject].description})")
    before_after_grid([p for p, _ in pictures], images, prompts, scores, out_dir / "before_after.png", title)
    info = {"subject": a.subject, "subject_description": SUBJECTS[a.subject].description, "n_images": len(pictures),
            "captions": captions, "ckpt": str(ckpt), "model_build": model_build(ckpt), "comfyui": comfy_version,
            "server_threads": server.torch_threads, "training": training,
            "seed": a.sample_seed, "batch": a.sample_batch, "prompts": [p.text for p in prompts],
            "scores": scores, "sample_seconds": sample_seconds, "total_seconds": time.perf_counter() - t_start}
    text = write_summary(out_dir, info)
    sys.stderr.write(text)
    log(f"done in {info['total_seconds']:.0f} s")
    print(out_dir)
    return 0


# =========================================================================== entry point

def tiny_demo(a: argparse.Namespace) -> int:
    """The original demo: a random adapter on the tiny (or --ckpt) checkpoint, strengths 0 and 1."""
    t0 = time.perf_counter()
    out_dir = Path(a.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)  # earlier results are overwritten, nothing else is removed
    ckpt = prepare_checkpoint(a.ckpt)
    adapter = make_adapter(ckpt, out_dir / ADAPTER_NAME, seed=a.seed)
    log(f"adapter {adapter.name} for {len(checkpoint_targets(ckpt))} attention modules of {ckpt.name}")
    workflow = load_workflow()
    ckpt_name = ckpt.name
    server = start_server(out_dir / "server", ckpt, ckpt_name, threads=a.threads)
    try:
        images = run_workflows(server, workflow, adapter, out_dir, ckpt_name, steps=a.steps, size=a.size)
    finally:
        server.stop()
    side_by_side(images, out_dir / "before_after.png")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    print(out_dir)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Train-and-compare on the default model (default), or the old fast path (--tiny / --ckpt)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="the fast path: a random untrained adapter on the tiny harness checkpoint (no build)")
    ap.add_argument("--ckpt", default=None,
                    help="the fast path on an SD1.5/SDXL .safetensors checkpoint of yours (implies --tiny's demo)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default out/demo)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the server (default TLORA_TORCH_THREADS, else 1 on <= 2 CPUs, else min(4, CPUs))")
    g = ap.add_argument_group("training demo")
    g.add_argument("--subject", default=DEFAULT_SUBJECT, help="procedural subject: quib, plon, vemo, zorb")
    g.add_argument("--images", type=int, default=5, help="training images (default 5)")
    g.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS, help=f"default {DEFAULT_TRAIN_STEPS}")
    g.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    g.add_argument("--loss", default=DEFAULT_LOSS, choices=["mse", "dco"], help=f"default {DEFAULT_LOSS}")
    g.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"training batch (default {DEFAULT_BATCH})")
    g.add_argument("--sample-seed", type=int, default=1, help="seed of the before/after samples (default 1)")
    g.add_argument("--sample-batch", type=int, default=4, help="images per prompt and strength (default 4)")
    t = ap.add_argument_group("fast path (--tiny / --ckpt)")
    t.add_argument("--steps", type=int, default=6, help="sampler steps (0: the workflow's own; default 6)")
    t.add_argument("--size", type=int, default=128, help="image size in pixels (0: the workflow's own; default 128)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (fast path: the random adapter's seed)")
    a = ap.parse_args(argv)
    if a.tiny or a.ckpt:
        return tiny_demo(a)
    return train_demo(a)


if __name__ == "__main__":
    sys.exit(main())
