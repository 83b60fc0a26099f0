#!/usr/bin/env python3
"""Quality benchmark on the proving-ground model: novel subjects and the weight-delta simulation.

    .venv/bin/python benchmarks/quality.py --quick        # ~10 min: one subject, five methods, short runs
    .venv/bin/python benchmarks/quality.py                # everything in one process (hours on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --parts sim    # only the simulation (core + model, no sampling)

docs/QUALITY.md section 5 gives the split run (tuning, one process per subject and seed, merge)
that produced the documented results. The smallest end-to-end run (under a minute on the 20-second
`tools/build_default_model.py --tiny --out M` build; its scores mean nothing):

    .venv/bin/python benchmarks/quality.py --quick --model M --steps 2 --sim-steps 2 --sim-iters 2 \
        --methods 'TLoRA(2,6);LoRA r4' --sample-steps 2 --train-prompts 0 --no-references --no-wide-times

Two parts, both on the embedded default model (built first if missing, see
tools/build_default_model.py), all metrics analytic (no downloaded models):

* subjects: each adapter family learns a novel procedural subject from 5 images (same images,
  captions, steps, batches, noise and schedule for every method; learning rates tuned per
  method on validation prompts), then renders held-out prompts. Metrics: subject fidelity
  (crop similarity to the subject's VAE round-trip renders; recognised = nearer this subject
  than any other; silhouette IoU, palette and texture pattern against the analytic template),
  prompt fidelity (requested background and place), diversity (pixel distance across sampling
  seeds), overfitting (distance to the nearest training image, backgrounds copied from training
  images, the subject on a training caption). Two reference rows bracket the subject metrics:
  the base model without adapter and the VAE round trip of the training images (ceiling).
  TLoRA variants run activation-side (tlora.attach); LoRA/LoHa/LoKr/OFT are ComfyUI's own
  weight adapters (comfy.weight_adapter create_train) applied as weight functions.
* sim: the paper's simulation. Full fine-tunes of the attention weights give real deltas; each
  family is fitted to them at several budgets (closed-form optima for LoRA, LoKr and OFT;
  gradient fits for the tensorised ones) and the relative error is plotted against parameters.

Every run trains through the engine (trainer.Trainer, driven step-wise; denoising MSE, AdamW,
constant lr, clip 1.0): TLoRA methods as AdapterGroups the engine attaches, ComfyUI's weight
adapters and the full fine-tune's raw weights as its extra_params. The engine draws batches,
noise and timesteps from TrainSettings.seed, a different random stream from the per-step
generators of the benchmark's former loop of its own: results move within noise against the
figures in docs/QUALITY.md, which that loop produced.

Writes out/quality/results.json, summary.md, simulation.md, every evaluated image
(images/*.npz, so that --rescore can recompute the metrics) and PNG plots (copied to
docs/quality/ with --docs). Attention-only adapters let the wide UNet's ResBlocks run as their
exact narrow twins (proving.narrow.hybridize_resblocks, checked at start-up); step times are
measured on the plain wide model (--parts wide).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.pack import pack_module  # noqa: E402
from proving import default_model as D  # noqa: E402
from proving import measure as M  # noqa: E402
from proving import procedural as P  # noqa: E402

OUT = ROOT / "out" / "quality"
DOCS = ROOT / "docs" / "quality"


def pack(sub: str) -> Any:
    """`tlora` or `trainer` of this repository as a subpackage (trainer/ imports ..tlora), no ComfyUI __init__."""
    return pack_module(sub)


# --------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter configuration: a TLoRA (transform, residual) pair or a ComfyUI algorithm and rank."""

    name: str
    kind: str                  # "tlora" or "comfy"
    transform: str = "none"
    residual: str = "none"
    algo: str = ""
    rank: int = 0
    lr: float = 3e-3           # base learning rate (the grid is base x LR_GRID)


METHODS = [
    Method("TLoRA(2,6)", "tlora", "trm:2", "tr:6"),
    Method("TLoRA*(2,4)", "tlora", "trm:2", "lora:4"),
    Method("Kron+TR(1,6)", "tlora", "trm:1", "tr:6"),
    Method("TR(8)", "tlora", "none", "tr:8"),
    Method("LoRA r1", "comfy", algo="LoRA", rank=1),
    Method("LoRA r2", "comfy", algo="LoRA", rank=2),
    Method("LoRA r4", "comfy", algo="LoRA", rank=4),
    Method("LoRA r8", "comfy", algo="LoRA", rank=8),
    Method("LoHa r2", "comfy", algo="LoHa", rank=2),
    Method("LoKr f8", "comfy", algo="LoKr", rank=8),
    Method("OFT b8", "comfy", algo="OFT", rank=8, lr=1e-2),  # its rotation is norm-capped: larger steps
]
QUICK_METHODS = ("TLoRA(2,6)", "TLoRA*(2,4)", "LoRA r4", "LoKr f8", "OFT b8")
# Subjects whose silhouettes and colours survive the default model's 8x-downsampling VAE; the
# zorb's thin red/yellow stripes blur to orange, so it stays out of the default set.
SUBJECTS_FULL, SUBJECT_QUICK = "quib,vemo,plon", "quib"
LR_GRID = (0.3, 1.0, 3.0)
# Objects under this many pixels count as no object (a small subject, radius 6-8.5 px, covers 80+).
MIN_AREA = 40
SAMPLE_STEPS = 16  # euler steps when evaluating (20 in the default-model test; fewer here to save time)
TRAIN_PROMPTS = 1  # training captions sampled too (overfitting: the subject on a caption it was trained on)


# --------------------------------------------------------------------------- the model under test

class Bench:
    """The default model loaded as ComfyUI loads it, with cached conditionings and latents."""

    def __init__(self, path: Path, hybrid: bool = True, sample_steps: int = SAMPLE_STEPS) -> None:
        """Load the checkpoint; with `hybrid`, let the ResBlocks run as their narrow twins (checked)."""
        import torch
        self.torch = torch
        self.sample_steps = sample_steps
        self.patcher, self.clip, self.vae = D.load(path)
        self.base = self.patcher.model
        self.unet = self.base.diffusion_model
        self.unet.requires_grad_(False)
        self.config = _config_of(path)
        self.alphas = D._schedule()
        self.targets = [n for n, _ in self.unet.named_modules()
                        if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and ".attn" in n]
        self._conds: dict[str, Any] = {}
        self.hybrid = False
        if hybrid:
            self.step_probe = self._probe()
            from proving.narrow import hybridize_resblocks
            hybridize_resblocks(self.unet, self.config.unet_width, self.config.seed)
            self.unet.requires_grad_(False)
            got = self._probe()
            err = float((got - self.step_probe).abs().max())
            if err > 1e-4 * (1 + float(self.step_probe.abs().max())):
                raise RuntimeError(f"hybrid UNet differs from the wide one by {err}")
            self.hybrid = True

    def _probe(self) -> Any:
        """One fixed forward pass (to check that the hybrid computes what the wide model does)."""
        torch = self.torch
        g = torch.Generator().manual_seed(11)
        x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
        with torch.no_grad():
            return self.unet(x, torch.tensor([5.0, 600.0]), context=c)

    def cond(self, text: str) -> Any:
        """(1, 77, 768) conditioning of a prompt (cached)."""
        if text not in self._conds:
            self._conds[text] = D.encode(self.clip, text)[0][0].float()
        return self._conds[text]

    def latents(self, images: np.ndarray) -> Any:
        """UNet-space latents of uint8 (N, 64, 64, 3) images (VAEEncode, then the model's latent scaling)."""
        torch = self.torch
        x = torch.from_numpy(images).float() / 255.0
        with torch.no_grad():
            return self.base.process_latent_in(self.vae.encode(x)).float()

    def generate(self, prompt: str, seeds: list[int], patcher: Any = None, steps: Optional[int] = None,
                 cfg: float = 5.0) -> np.ndarray:
        """uint8 (len(seeds), 64, 64, 3): one image per seed (each seed its own noise, so runs compare)."""
        steps = steps or self.sample_steps
        pos = [[self.cond(prompt), {}]]
        neg = [[self.cond(""), {}]]
        out = [D.generate(patcher or self.patcher, self.clip, self.vae, prompt, seed=s, steps=steps, cfg=cfg,
                          positive_cond=pos, negative_cond=neg)[0] for s in seeds]
        return np.stack(out)


def _config_of(path: Path) -> Any:
    """The BuildConfig stored in a default model's metadata."""
    meta = pack("tlora.format").read_metadata(str(path))
    cfg = json.loads(meta["tlora.proving.config"])
    if "vae_blocks" in cfg:
        cfg["vae_blocks"] = tuple(tuple(b) for b in cfg["vae_blocks"])
    known = {f.name for f in dataclasses.fields(D.BuildConfig)}
    return D.BuildConfig(**{k: v for k, v in cfg.items() if k in known})


# --------------------------------------------------------------------------- attaching adapters

@dataclasses.dataclass
class Attached:
    """A method's fresh adapters: what the engine trains, how to sample with them, how to remove them.

    TLoRA methods come as AdapterGroups: the engine attaches them while it trains and `train`
    leaves the trained adapters in them; `apply` then puts those on the model for sampling.
    ComfyUI's weight adapters sit on the model from the start; their parameters are `params`.
    """

    groups: list
    params: list
    patcher: Any
    apply: Callable[[], None]
    detach: Callable[[], None]
    export: Callable[[], dict]
    num_params: int


def attach(bench: Bench, method: Method, seed: int) -> Attached:
    """Fresh adapters of a method on every attention projection (seeded init)."""
    if method.kind == "tlora":
        return _tlora_adapters(bench, method, seed)
    return _comfy_adapters(bench, method, seed)


def _tlora_adapters(bench: Bench, method: Method, seed: int) -> Attached:
    """An AdapterGroup of TLoRA adapters (the engine's seeded init); sampled activation-side once trained."""
    E, T = pack("trainer"), pack("tlora")
    adapters = E.create_adapters(bench.unet, bench.targets, method.transform, method.residual, "paper",
                                 int(seed) * 101 + 7, prefix="diffusion_model.")
    group = E.AdapterGroup(bench.unet, "diffusion_model.", adapters)

    def apply() -> None:
        """The group's (trained) adapters on the model, activation-side, for sampling."""
        T.attach(bench.unet, group.adapters, trainable=False)

    def detach() -> None:
        """Take them off again (nothing to do where they are not on)."""
        T.detach(bench.unet, list(group.adapters))

    def export() -> dict:
        """The tensors a TLoRA file of these adapters holds."""
        return T.format.state_dict({group.prefix + p: a for p, a in group.adapters.items()})

    return Attached([group], [], bench.patcher, apply, detach, export,
                    sum(a.num_params() for a in adapters.values()))


def _comfy_adapters(bench: Bench, method: Method, seed: int) -> Attached:
    """ComfyUI's own weight adapters (create_train), set as weight functions now and on a patcher clone."""
    import comfy.weight_adapter as wa
    bench.torch.manual_seed(int(seed) * 101 + 7)  # ComfyUI's create_train draws from the global generator
    patcher = bench.patcher.clone()
    diffs = {}
    for p in bench.targets:
        module = bench.unet.get_submodule(p)
        diff = wa.adapter_maps[method.algo].create_train(module.weight, method.rank, 1.0)
        diff.requires_grad_(True)
        diff.alpha.requires_grad_(False)
        module.weight_function = [diff]
        patcher.add_weight_wrapper(f"diffusion_model.{p}.weight", diff)
        diffs[p] = diff

    def detach() -> None:
        """Remove the weight functions."""
        for p in diffs:
            bench.unet.get_submodule(p).weight_function = []

    def export() -> dict:
        """The adapters' tensors as ComfyUI would save them (alpha left out)."""
        return {f"diffusion_model.{p}.{k}": v.detach().float().contiguous()
                for p, d in diffs.items() for k, v in d.state_dict().items() if k != "alpha"}

    params = [q for d in diffs.values() for q in d.parameters() if q.requires_grad]
    return Attached([], params, patcher, lambda: None, detach, export, sum(q.numel() for q in params))


# --------------------------------------------------------------------------- training

@dataclasses.dataclass
class SubjectData:
    """A subject's training latents, conditionings, images and reference object crops."""

    name: str
    latents: Any
    conds: Any
    images: np.ndarray
    captions: list[str]
    references: list  # object crops of the training images after a VAE round trip
    round_trip: Optional[np.ndarray] = None  # those decoded images
    others: Optional[dict] = None  # {subject: round-trip crops} of every subject (for recognition)


def subject_data(bench: Bench, name: str, n_images: int) -> SubjectData:
    """The subject's training set (images from proving.procedural, seed 0) encoded by the model.

    References for subject similarity are the training images decoded back by the model's own
    VAE: the best rendering of the subject this model can produce, blur included.
    """
    images, captions = P.subject_images(name, n_images, seed=0)
    conds = bench.torch.cat([bench.cond(c) for c in captions])
    latents = bench.latents(images)
    with bench.torch.no_grad():
        decoded = bench.vae.decode(bench.base.process_latent_out(latents)).clamp(0, 1)
    round_trip = (decoded * 255).round().byte().cpu().numpy()
    refs = [c for c in (M.object_crop(im) for im in round_trip) if c is not None]
    return SubjectData(name, latents, conds, images, captions, refs, round_trip)


def all_subject_references(bench: Bench) -> dict:
    """{subject: VAE round-trip object crops of its 5 training images} for every subject (recognition)."""
    return {n: subject_data(bench, n, 5).references for n in P.SUBJECTS}


def training_data(data: SubjectData) -> Any:
    """The subject's cached latents and conditionings as the engine's TrainData."""
    E = pack("trainer")
    return E.TrainData([E.Example(data.latents[i], {"c_crossattn": data.conds[i:i + 1]}, caption)
                        for i, caption in enumerate(data.captions)])


def train(bench: Bench, data: SubjectData, steps: int, lr: float, seed: int, groups: Sequence = (),
          params: Sequence = (), batch: int = 2, log_every: int = 0, skip_times: int = 0) -> dict:
    """Denoising-MSE training through the engine, step by step (AdamW, constant lr, clip 1.0, fp32).

    The engine attaches `groups` while it trains and detaches them after; their trained
    adapters replace the fresh ones in `group.adapters`. `params` train beside them.
    """
    E = pack("trainer")
    settings = E.TrainSettings(steps=steps, learning_rate=lr, batch_size=batch, loss="mse", seed=int(seed),
                               save_every=0, precision="fp32", lr_schedule="constant", weight_decay=1e-4,
                               adam_betas=(0.9, 0.999), max_grad_norm=1.0)
    binding = E.Binding(list(groups), lambda x, t, cond: bench.unet(x, t, context=cond["c_crossattn"]),
                        E.Schedule.discrete(bench.alphas, "eps"), training_data(data), progress_bar=False,
                        extra_params=list(params))
    trainer = E.Trainer(binding, settings, output_path=None, registry=E.RunRegistry())
    losses, times = [], []
    try:
        trainer.open()
        for step in range(steps):
            report = trainer.train_step()
            losses.append(report.loss)
            times.append(report.step_time)
            if log_every and (step + 1) % log_every == 0:
                print(f"    step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        trained = trainer.current_adapters()
    finally:
        trainer.close()
    for group in groups:
        group.adapters.update({p: trained[group.prefix + p] for p in group.adapters})
    return {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
            "step_time": float(np.median(times[skip_times:] or times))}


# --------------------------------------------------------------------------- evaluation

def validation_prompts(name: str) -> list[P.SubjectPrompt]:
    """Tuning prompts: training backgrounds in new places (disjoint from the held-out test prompts)."""
    bgs = [b for b in P.SUBJECT_TRAIN_BACKGROUNDS if b not in (P.SUBJECTS[name].colour, P.SUBJECTS[name].colour2)]
    return [P.SubjectPrompt(P.subject_caption(name, bgs[0], "top"), bgs[0], "top"),
            P.SubjectPrompt(P.subject_caption(name, bgs[1], "bottom"), bgs[1], "bottom")]


def evaluate(bench: Bench, patcher: Any, data: SubjectData, prompts: list, seeds: list[int],
             train_prompts: int = TRAIN_PROMPTS) -> tuple[dict, list]:
    """Sample prompts x seeds (plus the first `train_prompts` training captions) and score them (see score_rows)."""
    rows = [bench.generate(p.text, seeds, patcher) for p in prompts]
    rows += [bench.generate(c, seeds, patcher) for c in data.captions[:train_prompts]]
    return score_rows(data, prompts, rows), rows


def score_rows(data: SubjectData, prompts: list, rows: list) -> dict:
    """Metrics of image rows (one row of seeds per held-out prompt, then rows of training captions).

    subject: crop similarity of the main object to the subject's VAE round-trip crops (0 when no
    object of MIN_AREA pixels); recognised: share of images whose object is nearer this subject's
    crops than any other subject's (needs data.others); subject_template/shape/palette/pattern:
    against the analytic template; background/position: what the prompt asked; diversity: pixel
    distance across seeds; overfitting: copied training backgrounds, distance to the nearest
    training image, and the subject score on a training caption.
    """
    name = data.name
    train_bgs = {M.background_colour(im) for im in data.images}
    fid, bg_ok, pos_ok, leak, near, div, rec = [], [], [], [], [], [], []
    for prompt, images in zip(prompts, rows):
        div.append(M.mean_pairwise_distance(images))
        for im in images:
            f = M.subject_fidelity(im, name)
            f["similarity"] = M.subject_similarity(im, data.references, min_area=MIN_AREA)
            fid.append(f)
            if data.others:
                rec.append(M.recognise_subject(im, data.others, min_area=MIN_AREA) == name)
            where = M.placement(im)
            bg_ok.append(where["background"] == prompt.background)
            leak.append(where["background"] in train_bgs)
            if prompt.position != "centre":
                pos_ok.append(where["position"] == prompt.position)
            near.append(M.nearest_distance(im, data.images))
    seen = [M.subject_similarity(im, data.references, min_area=MIN_AREA) for r in rows[len(prompts):] for im in r]
    return {
        "subject": float(np.mean([f["similarity"] for f in fid])),
        "recognised": float(np.mean(rec)) if rec else float("nan"),
        "subject_template": float(np.mean([f["score"] for f in fid])),
        "subject_shape": float(np.mean([f["shape"] for f in fid])),
        "subject_palette": float(np.mean([f["palette"] for f in fid])),
        "subject_pattern": float(np.mean([f["pattern"] for f in fid])),
        "background": float(np.mean(bg_ok)),
        "position": float(np.mean(pos_ok)) if pos_ok else float("nan"),
        "prompt": float(np.mean(bg_ok + pos_ok)),
        "diversity": float(np.mean(div)),
        "copied_background": float(np.mean(leak)),
        "nearest_train": float(np.mean(near)),
        "subject_train_prompt": float(np.mean(seen)) if seen else float("nan"),
    }


def reference_records(bench: Bench, data: SubjectData, prompts: list, eval_seeds: list[int],
                      train_prompts: int = TRAIN_PROMPTS) -> tuple[list, list]:
    """Two reference rows per subject: the floor and the ceiling of the subject metrics.

    * "base model": the default model without any adapter on the held-out prompts (it has never
      seen the subject's word, so this is what the metrics give an unrelated object);
    * "VAE round trip": the training images encoded and decoded by the model's own VAE, each
      compared with the *other* training images' crops (leave one out). No adapter can beat the
      VAE it renders through, so this is the best reachable subject score; the 8x-downsampling
      VAE erases most of the texture pattern (see docs/QUALITY.md).
    Returns (records, image rows of the base model).
    """
    with bench.torch.no_grad():
        base, rows = evaluate(bench, bench.patcher, data, prompts, eval_seeds, train_prompts)
    ceiling = ceiling_metrics(data)
    common = {"subject_name": data.name, "seed": 0, "lr": float("nan"), "steps": 0, "params": 0, "file_bytes": 0,
              "loss_first": float("nan"), "loss_last": float("nan"), "step_time": float("nan")}
    return ([{**common, **base, "method": "base model (no adapter)", "reference": True},
             {**common, **ceiling, "method": "VAE round trip (ceiling)", "reference": True}],
            rows)


def ceiling_metrics(data: SubjectData) -> dict:
    """Subject metrics of the training images' VAE round trips, each against the *other* crops (leave one out)."""
    round_trip = data.round_trip
    fid = [M.subject_fidelity(im, data.name) for im in round_trip]
    crops = [M.object_crop(im) for im in round_trip]
    loo = [M.subject_similarity(im, [c for j, c in enumerate(crops) if j != i and c is not None], min_area=MIN_AREA)
           for i, im in enumerate(round_trip)]
    rec = []
    if data.others:
        for i, im in enumerate(round_trip):
            refs = dict(data.others)
            refs[data.name] = [c for j, c in enumerate(crops) if j != i and c is not None]
            rec.append(M.recognise_subject(im, refs, min_area=MIN_AREA) == data.name)
    nan = float("nan")
    ceiling = {k: nan for k in KEYS}
    ceiling.update({"subject": float(np.mean(loo)), "recognised": float(np.mean(rec)) if rec else nan,
                    "subject_template": float(np.mean([f["score"] for f in fid])),
                    "subject_shape": float(np.mean([f["shape"] for f in fid])),
                    "subject_palette": float(np.mean([f["palette"] for f in fid])),
                    "subject_pattern": float(np.mean([f["pattern"] for f in fid]))})
    return ceiling


def run_one(bench: Bench, method: Method, data: SubjectData, lr: float, seed: int, steps: int,
            prompts: list, eval_seeds: list[int], train_prompts: int = TRAIN_PROMPTS) -> tuple[dict, list]:
    """Attach, train, evaluate, detach; returns the record and the image rows."""
    torch = bench.torch
    import comfy.model_management as mm
    from safetensors.torch import save as st_save
    att = attach(bench, method, seed)
    try:
        stats = train(bench, data, steps, lr, seed, att.groups, att.params)
        att.apply()
        with torch.no_grad():
            metrics, rows = evaluate(bench, att.patcher, data, prompts, eval_seeds, train_prompts)
        size = len(st_save(att.export()))
    finally:
        mm.unload_all_models()
        att.detach()
    return {"method": method.name, "subject_name": data.name, "seed": seed, "lr": lr, "steps": steps,
            "params": att.num_params, "file_bytes": size, **stats, **metrics}, rows


def wide_step_times(path: Path, methods: list[Method], data_name: str, steps: int = 8) -> dict[str, float]:
    """Median training step time of each method on the plain (non-hybrid) wide model, batch 2.

    The first three steps are dropped: TLoRA layers time their activation-side forms on first use.
    """
    bench = Bench(path, hybrid=False)
    data = subject_data(bench, data_name, 5)
    out = {}
    for method in methods:
        att = attach(bench, method, 0)
        try:
            out[method.name] = train(bench, data, steps, method.lr, 0, att.groups, att.params,
                                     skip_times=3)["step_time"]
        finally:
            att.detach()
    return out


# --------------------------------------------------------------------------- the simulation

def full_finetune_deltas(bench: Bench, data: SubjectData, steps: int, lr: float, seed: int = 0) -> dict:
    """{module: (W0, W*)} after fine-tuning every attention weight in full (other weights frozen)."""
    torch = bench.torch
    weights = {p: bench.unet.get_submodule(p).weight for p in bench.targets}
    w0 = {p: w.detach().clone() for p, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    try:
        train(bench, data, steps, lr, seed, params=list(weights.values()))
        return {p: (w0[p], w.detach().clone()) for p, w in weights.items()}
    finally:
        with torch.no_grad():
            for p, w in weights.items():
                w.copy_(w0[p])
                w.requires_grad_(False)


def _lowrank(delta: Any, r: int) -> Any:
    """Best rank-r approximation (truncated SVD)."""
    torch = __import__("torch")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def fit_lora(w0: Any, w1: Any, r: int) -> tuple[Any, int]:
    """LoRA's optimum: truncated SVD of the delta."""
    return w0 + _lowrank(w1 - w0, r), r * (w0.shape[0] + w0.shape[1])


def fit_lokr(w0: Any, w1: Any, factor: int) -> tuple[Any, int]:
    """LoKr's optimum (one Kronecker product, ComfyUI's factorisation): Van Loan-Pitsianis rank-1 SVD."""
    import torch
    from comfy.weight_adapter.base import factorization
    o1, o2 = factorization(w0.shape[0], factor)
    i1, i2 = factorization(w0.shape[1], factor)
    d = (w1 - w0).reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    a = (u[:, 0] * s[0].sqrt()).reshape(o1, i1)
    b = (vh[0] * s[0].sqrt()).reshape(o2, i2)
    return w0 + torch.kron(a, b), o1 * i1 + o2 * i2


def fit_oft(w0: Any, w1: Any, factor: int) -> tuple[Any, int]:
    """OFT's optimum (block-diagonal orthogonal R on the outputs, ComfyUI's blocks): per-block Procrustes."""
    import torch
    from comfy.weight_adapter.base import factorization
    size, num = factorization(w0.shape[0], factor)
    a, b = w0.reshape(num, size, -1), w1.reshape(num, size, -1)
    u, _, vh = torch.linalg.svd(b @ a.transpose(1, 2))
    r = u @ vh
    return (r @ a).reshape(w0.shape), num * size * size  # ComfyUI stores full blocks


def trm_dense_batch(cores: list) -> Any:
    """Dense TRM transforms of same-shaped modules, (b, n, n, R, R) cores -> (b, I, I): vmap of the core's trm.dense."""
    import torch
    return torch.vmap(pack("tlora.functional.trm").dense)(list(cores))


def tr_dense_batch(out_cores: list, in_cores: list) -> Any:
    """Dense TR residuals of same-shaped modules, (b, n, R, R) cores -> (b, O, I): vmap of the core's tr.dense."""
    import torch
    return torch.vmap(pack("tlora.functional.tr").dense)(list(out_cores), list(in_cores))


def fit_tlora_group(w0: Any, w1: Any, transform: str, residual: str, iters: int, seed: int = 0,
                    random_start: bool = False) -> tuple[Any, int]:
    """Gradient fit (Adam, cosine lr) of W0 T + s Delta to W* for a batch of same-shaped modules.

    Starts where TLoRA starts (T = I, Delta = 0, TLoRA's own seeded cores). LoRA residuals are
    solved exactly (variable projection: Delta = SVD_r(W* - W0 T), refreshed every 10 steps), so
    TRM+LoRA is never worse than LoRA. `random_start` draws every TR core at random (the earlier
    tensor-ring PEFT practice the paper argues against). Returns (fits (b, O, I), params per module).
    """
    import torch
    b = w0.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ads = [pack("tlora").ModuleAdapter.create(tuple(w0.shape[1:]), transform, residual, "paper", generator=gen)
           for _ in range(b)]
    ad = ads[0]
    stacked = {k: torch.stack([a.tensors[k] for a in ads]) for k in ad.tensors if k != "tlora_scale"}
    if random_start and ad.residual.kind == "tr":
        n0 = stacked["tlora_r.out.0"]
        stacked["tlora_r.out.0"] = torch.randn(n0.shape, generator=gen) / math.sqrt(n0.shape[-1])
    if ad.residual.kind == "lora":
        stacked.pop("tlora_r.up")
        stacked.pop("tlora_r.down")
    params = {k: torch.nn.Parameter(v.clone()) for k, v in stacked.items()}
    scale = ad.scale
    t_keys = sorted((k for k in params if k.startswith("tlora_t.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    out_keys = sorted((k for k in params if k.startswith("tlora_r.out.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    in_keys = sorted((k for k in params if k.startswith("tlora_r.in.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    # W0 T only needs the rows of T that meet non-zero columns of W0 (the default model's
    # zero-padded inputs make that a fifth of them for most projections).
    nz = (w0 != 0).any(1).any(0).nonzero().flatten()
    w0_nz = w0[:, :, nz]
    norm = torch.clamp((w1 - w0).pow(2).sum((1, 2)), min=1e-20)
    lora_delta: dict[str, Any] = {}

    def weight(refresh: bool) -> Any:
        """Every module's W0 T + s Delta (plus the LoRA residual's optimum, re-solved when `refresh`)."""
        w = torch.bmm(w0_nz, trm_dense_batch([params[k] for k in t_keys])[:, nz]) if t_keys else w0
        if out_keys:
            w = w + scale * tr_dense_batch([params[k] for k in out_keys], [params[k] for k in in_keys])
        if ad.residual.kind == "lora":
            # The residual's optimum for the current T, held fixed in the gradient (at the optimum the
            # partial gradient in T is the full one); refreshed every few steps since SVDs cost.
            if refresh or "d" not in lora_delta:
                u, sv, vh = torch.linalg.svd((w1 - w).detach(), full_matrices=False)
                r = ad.residual.rank
                lora_delta["d"] = (u[..., :r] * sv[..., None, :r]) @ vh[..., :r, :]
            w = w + lora_delta["d"]
        return w

    if not params:
        return weight(True), ad.num_params()
    # lr 1e-2 with 300 cosine steps lands within ~1.5% of the 1500-step error (checked on TR(8),
    # TRM2+TR(6) and TRM1+TR(6) fits of real deltas).
    opt = torch.optim.Adam(list(params.values()), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    # Each module keeps its best iterate (a fit is never reported worse than where it started).
    best_loss = torch.full((b,), float("inf"))
    best_fit = w0.clone()
    for i in range(iters + 1):
        with torch.enable_grad():
            fit = weight(i % 10 == 0 or i == iters)
            per_module = (fit - w1).pow(2).sum((1, 2)) / norm
            better = per_module.detach() < best_loss
            best_loss = torch.where(better, per_module.detach(), best_loss)
            best_fit = torch.where(better[:, None, None], fit.detach(), best_fit)
            if i == iters:
                break
            opt.zero_grad()
            per_module.sum().backward()
        opt.step()
        sched.step()
    return best_fit, ad.num_params()


QUICK_SIM_FAMILIES = ["LoRA", "TR (zero start)", "TRM2+TR", "TRM2+LoRA", "LoKr", "OFT (block-orthogonal)"]
SIM_FAMILIES: dict[str, list[tuple[str, Any]]] = {
    "LoRA": [("r%d" % r, ("lora", r)) for r in (1, 2, 4, 8, 16, 32)],
    "TR (zero start)": [("R%d" % r, ("tlora", "none", f"tr:{r}")) for r in (2, 4, 6, 8, 12, 16)],
    "TR (random start)": [("R%d" % r, ("tlora-random", "none", f"tr:{r}")) for r in (2, 4, 6, 8, 12, 16)],
    "TRM2+TR": [("(2,%d)" % r, ("tlora", "trm:2", f"tr:{r}")) for r in (2, 4, 6, 8, 12)],
    "TRM1+TR (Kronecker)": [("(1,%d)" % r, ("tlora", "trm:1", f"tr:{r}")) for r in (2, 4, 6, 8, 12)],
    "TRM2+LoRA": [("(2,%d)" % r, ("tlora", "trm:2", f"lora:{r}")) for r in (1, 2, 4, 8, 16)],
    "LoKr": [("f%d" % f, ("lokr", f)) for f in (4, 8, 16, -1)],
    "OFT (block-orthogonal)": [("b%d" % f, ("oft", f)) for f in (2, 4, 8, 16)],
}


def simulate(deltas: dict, iters: int, families: Optional[list[str]] = None, log: Callable = print) -> list[dict]:
    """Fit every family/budget to every module's delta; aggregated relative error per configuration.

    Relative error = sqrt(sum over modules ||fit - W*||^2 / sum ||W* - W0||^2).
    """
    import torch
    groups: dict[tuple, list[str]] = {}
    for p, (w0, _) in deltas.items():
        nz = int((w0 != 0).any(0).sum())
        groups.setdefault((tuple(w0.shape), nz), []).append(p)
    out = []
    for family, configs in SIM_FAMILIES.items():
        if families and family not in families:
            continue
        for label, spec in configs:
            t0 = time.perf_counter()
            err2, norm2, params = 0.0, 0.0, 0
            for paths in groups.values():
                w0 = torch.stack([deltas[p][0].float() for p in paths])
                w1 = torch.stack([deltas[p][1].float() for p in paths])
                if spec[0] in ("lora", "lokr", "oft"):
                    fn = {"lora": fit_lora, "lokr": fit_lokr, "oft": fit_oft}[spec[0]]
                    fits = [fn(a, b, spec[1]) for a, b in zip(w0, w1)]
                    fit, n = torch.stack([f for f, _ in fits]), fits[0][1]
                else:
                    fit, n = fit_tlora_group(w0, w1, spec[1], spec[2], iters, random_start=spec[0] == "tlora-random")
                err2 += float((fit - w1).pow(2).sum())
                norm2 += float((w1 - w0).pow(2).sum())
                params += n * len(paths)
            rec = {"family": family, "config": label, "params": params, "rel_error": math.sqrt(err2 / norm2),
                   "seconds": time.perf_counter() - t0}
            log(f"  sim {family:24s} {label:7s} params {params:8d}  rel.error {rec['rel_error']:.4f}"
                f"  ({rec['seconds']:.0f} s)")
            out.append(rec)
    return out


# --------------------------------------------------------------------------- plots

def _plt() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (with a note) where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots", file=sys.stderr)
        return None


def plot_simulation(records: list[dict], path: Path, title: str) -> None:
    """Relative error vs parameters, one line per family (log x)."""
    plt = _plt()
    if plt is None or not records:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for family in dict.fromkeys(r["family"] for r in records):
        pts = sorted((r["params"], r["rel_error"]) for r in records if r["family"] == family)
        ax.plot([p for p, _ in pts], [e for _, e in pts], marker="o", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (all 32 attention projections)")
    ax.set_ylabel("relative error ||fit - W*|| / ||W* - W0||")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_subjects(records: list[dict], path: Path) -> None:
    """Per method: subject vs prompt fidelity, and subject fidelity vs parameters (mean +- sd over subjects x seeds).

    The reference rows (base model, VAE round trip) are drawn as horizontal lines on the right.
    """
    plt = _plt()
    if plt is None or not records:
        return
    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>phX*P"
    for i, m in enumerate(methods):
        rs = [r for r in records if r["method"] == m]
        sx = np.array([r["subject"] for r in rs], dtype=np.float64)
        if rs[0].get("reference"):
            axes[1].axhline(np.nanmean(sx), ls="--", lw=1, color="gray" if "base" in m else "black", label=m)
            if "base" in m:
                sy = np.array([r["prompt"] for r in rs], dtype=np.float64)
                axes[0].errorbar(sx.mean(), sy.mean(), xerr=sx.std(), yerr=sy.std(), fmt="x", color="gray",
                                 capsize=3, label=m)
            continue
        sy = np.array([r["prompt"] for r in rs], dtype=np.float64)
        mk, colour = markers[i % len(markers)], plt.cm.tab20(i % 20)
        axes[0].errorbar(sx.mean(), sy.mean(), xerr=sx.std(), yerr=sy.std(), fmt=mk, color=colour, capsize=3, label=m)
        axes[1].errorbar(rs[0]["params"], sx.mean(), yerr=sx.std(), fmt=mk, color=colour, capsize=3, label=m)
    axes[0].set_xlabel("subject fidelity (crop similarity to the subject, 0..1)")
    axes[0].set_ylabel("prompt fidelity (background + place right)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trainable parameters")
    axes[1].set_ylabel("subject fidelity")
    axes[0].set_title("mean ± sd over subjects x seeds", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(rows: list[np.ndarray], path: Path, labels: Optional[list[str]] = None) -> None:
    """Rows of uint8 images as one PNG (2x nearest), with an optional text label per row."""
    from PIL import Image, ImageDraw
    strips = [np.concatenate(list(r), 1) for r in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0))) for s in strips]
    img = Image.fromarray(np.concatenate(strips, 0)).resize((width * 2, sum(s.shape[0] for s in strips) * 2),
                                                            Image.NEAREST)
    if labels:
        pad = 130
        canvas = Image.new("RGB", (img.width + pad, img.height), "white")
        canvas.paste(img, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        y = 0
        for s, label in zip(strips, labels):
            draw.text((4, y + 4), label, fill="black")
            y += s.shape[0] * 2
        img = canvas
    img.save(path)


# --------------------------------------------------------------------------- driver

KEYS = ["subject", "recognised", "subject_template", "subject_shape", "subject_palette", "subject_pattern", "background", "position",
        "prompt", "diversity", "copied_background", "nearest_train", "subject_train_prompt", "loss_last", "step_time"]


def summarize(records: list[dict]) -> list[dict]:
    """Mean of every metric per method (over subjects x seeds; NaNs left out) and its spread over seeds."""
    out = []
    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m]
        lrs = sorted({r["lr"] for r in rs if np.isfinite(r["lr"])})
        row = {"method": m, "runs": len(rs), "params": rs[0]["params"], "file_bytes": rs[0]["file_bytes"],
               "lr": lrs[0] if len(lrs) == 1 else float("nan"), "reference": bool(rs[0].get("reference"))}
        for k in KEYS:
            v = np.array([r.get(k, float("nan")) for r in rs], dtype=np.float64)
            seed = np.array([r["seed"] for r in rs])[np.isfinite(v)]
            v = v[np.isfinite(v)]
            # Spread over training seeds: the standard deviation of the per-seed means (over subjects).
            per_seed = np.array([v[seed == s].mean() for s in sorted(set(seed.tolist()))])
            row[k] = float(v.mean()) if len(v) else float("nan")
            row[k + "_sd"] = float(per_seed.std()) if len(v) else float("nan")
        out.append(row)
    return out


# (header, summary key, decimals) of the metric columns; every table starts with method, params, file, lr.
ALL_COLUMNS = [("subject", "subject", 2), ("recognised", "recognised", 2), ("shape", "subject_shape", 2),
               ("palette", "subject_palette", 2), ("pattern", "subject_pattern", 2),
               ("background", "background", 2), ("place", "position", 2), ("diversity", "diversity", 3),
               ("copied bg", "copied_background", 2), ("nearest train", "nearest_train", 3),
               ("train-prompt subject", "subject_train_prompt", 2)]
KEY_COLUMNS = [("subject sim.", "subject", 3), ("recognised", "recognised", 2), ("prompt", "prompt", 2),
               ("diversity", "diversity", 3), ("nearest train", "nearest_train", 3)]


def _summary_table(summary: list[dict], wide_times: dict[str, float], columns: list[tuple[str, str, int]],
                   time_header: str) -> str:
    """Summary rows as Markdown: mean ± sd over seeds per metric column, '-' where a metric does not apply."""
    headers = ["method", "params", "file KiB", "lr", *(c[0] for c in columns), time_header]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in summary:
        ref = r.get("reference")
        t = wide_times.get(r["method"], float("nan"))
        cells = [r["method"], "-" if ref else format(r["params"], ","),
                 "-" if ref else format(r["file_bytes"] / 1024, ".0f"),
                 format(r["lr"], ".0e") if np.isfinite(r["lr"]) else "-"]
        cells += [f"{r[k]:.{d}f} ± {r[k + '_sd']:.{d}f}" if np.isfinite(r[k]) else "-" for _, k, d in columns]
        cells.append(format(t, ".2f") if np.isfinite(t) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(summary: list[dict], wide_times: dict[str, float]) -> str:
    """The summary as a Markdown table with every metric (mean over subjects x seeds ± sd over seeds)."""
    return _summary_table(summary, wide_times, ALL_COLUMNS, "step s (wide)")


def key_table(summary: list[dict], wide_times: dict[str, float]) -> str:
    """The headline columns: size, speed, subject and prompt fidelity, diversity, overfitting (mean ± sd)."""
    return _summary_table(summary, wide_times, KEY_COLUMNS, "step s")


def per_subject_table(records: list[dict], key: str = "subject") -> str:
    """One metric per method and subject (mean +- sd over seeds) as a Markdown table."""
    names = list(dict.fromkeys(r["subject_name"] for r in records))
    lines = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for m in dict.fromkeys(r["method"] for r in records):
        cells = []
        for n in names:
            v = np.array([r.get(key, np.nan) for r in records if r["method"] == m and r["subject_name"] == n],
                         dtype=np.float64)
            v = v[np.isfinite(v)]
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(results: dict, out: Path) -> None:
    """summary.md, subjects.png and simulation plots from a results dict (also used by --merge)."""
    records = results.get("subjects", [])
    if records:
        summary = summarize(records)
        results["summary"] = summary
        times = results.get("wide_step_time", {})
        text = (key_table(summary, times) + "\n\nAll metrics:\n\n" + markdown_table(summary, times)
                + "\n\nSubject similarity per subject (mean ± sd over seeds):\n\n" + per_subject_table(records)
                + "\n\nRecognised per subject:\n\n" + per_subject_table(records, "recognised")
                + "\n\nPrompt fidelity per subject:\n\n" + per_subject_table(records, "prompt") + "\n")
        (out / "summary.md").write_text(text)
        print(text)
        plot_subjects(records, out / "subjects.png")
    sim = results.get("simulation", [])
    for name in dict.fromkeys(r["subject"] for r in sim):
        recs = [r for r in sim if r["subject"] == name]
        plot_simulation(recs, out / f"simulation_{name}.png",
                        f"fitting real full fine-tune deltas ({name}, {results.get('sim_steps', '?')} steps)")
    if sim:
        lines = ["| family | config | params | relative error |", "|---|---|---|---|"]
        lines += [f"| {r['family']} | {r['config']} | {r['params']:,} | {r['rel_error']:.4f} |" for r in sim]
        (out / "simulation.md").write_text("\n".join(lines) + "\n")


def image_file(folder: Path, name: str, method: str, seed: int) -> Path:
    """Where a run's evaluated images are kept: images/<subject>__<method>__<seed>.npz."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in method)
    return folder / f"{name}__{tag}__{seed}.npz"


def rescore(bench: Bench, results: dict, folder: Path) -> None:
    """Recompute the image metrics of every subject record from its saved images (current metric code)."""
    others = all_subject_references(bench)
    datas: dict[str, SubjectData] = {}
    for rec in results.get("subjects", []):
        name = rec["subject_name"]
        if name not in datas:
            datas[name] = subject_data(bench, name, 5)
            datas[name].others = others
        data = datas[name]
        if rec["method"].startswith("VAE round trip"):
            rec.update(ceiling_metrics(data))
            continue
        f = image_file(folder, name, rec["method"], rec["seed"])
        if not f.is_file():
            print(f"  no images for {name} {rec['method']} seed {rec['seed']}: kept its metrics", flush=True)
            continue
        z = np.load(f)
        texts = [str(t) for t in z["prompts"]]
        known = {p.text: p for p in P.held_out_prompts(name)}
        prompts = [known[t] for t in texts if t in known]
        rec.update(score_rows(data, prompts, list(z["images"])))
    results["rescored"] = True


def merge(paths: list[str], out: Path) -> dict:
    """Combine results.json files of runs split across processes (records, simulation, tuning, times, images)."""
    merged: dict[str, Any] = {"merged_from": paths, "subjects": [], "simulation": [], "tuning": [],
                              "wide_step_time": {}, "seconds_each": []}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for p in paths:
        r = json.loads(Path(p).read_text())
        for f in (Path(p).parent / "images").glob("*.npz"):
            if f.parent.resolve() != (out / "images").resolve():
                (out / "images" / f.name).write_bytes(f.read_bytes())
        for k in ("subjects", "simulation", "tuning"):
            merged[k] += r.get(k, [])
        merged["wide_step_time"].update(r.get("wide_step_time", {}))
        merged["seconds_each"].append(r.get("seconds"))
        keys = ["model", "threads", "hybrid", "quick", "lr_grid"]
        keys += ["sim_steps", "sim_iters"] if r.get("simulation") else []
        keys += ["steps", "seeds", "eval_seeds"] if r.get("subjects") else []
        for k in keys:
            if k in r:
                merged.setdefault(k, r[k])
        merged.setdefault("lrs", {}).update(r.get("lrs", {}))
    return merged


def build_parser() -> argparse.ArgumentParser:
    """The command line (quick and default values are filled in by make_config)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: one subject, five methods, short runs")
    ap.add_argument("--parts", default="sim,subjects",
                    help="comma list of sim, subjects, wide (default sim,subjects; subjects measures wide step "
                         "times too unless --no-wide-times; wide alone: only those)")
    ap.add_argument("--tune-only", action="store_true", help="stop after tuning the learning rates (split runs)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the built default model; built if missing)")
    ap.add_argument("--subjects", default=None, help=f"comma list (default {SUBJECTS_FULL}; quick: {SUBJECT_QUICK})")
    ap.add_argument("--seeds", default=None, help="comma list of training seeds (default 0,1; quick: 0)")
    ap.add_argument("--eval-seeds", default="100,101", help="sampling seeds per prompt (at least 2: diversity)")
    ap.add_argument("--methods", default=None,
                    help="semicolon list of method names, e.g. 'TLoRA(2,6);LoRA r4' (default all; quick: five)")
    ap.add_argument("--prompts", type=int, default=5,
                    help="held-out test prompts per subject, 3-5: new backgrounds, a new place, a new size (default 5)")
    ap.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS,
                    help="euler steps per evaluation image (default %(default)s)")
    ap.add_argument("--train-prompts", type=int, default=TRAIN_PROMPTS,
                    help="training captions also sampled per run (overfitting check; default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 150; quick 50)")
    ap.add_argument("--no-tune", action="store_true", help="use base learning rates (quick always does)")
    ap.add_argument("--lr-grid", default=",".join(str(f) for f in LR_GRID),
                    help="tuning factors of each method's base learning rate (default %(default)s)")
    ap.add_argument("--lrs", default=None, help="JSON {method: lr} or a results.json whose tuned 'lrs' to use "
                                                "(skips tuning for those methods)")
    ap.add_argument("--lr-factor", type=float, default=1.0, help="multiply every base learning rate")
    ap.add_argument("--sim-steps", type=int, default=None, help="full fine-tune steps (default 150; quick 40)")
    ap.add_argument("--sim-iters", type=int, default=None, help="gradient-fit iterations (default 300; quick 100)")
    ap.add_argument("--no-references", action="store_true",
                    help="skip the base-model and VAE round-trip rows (when another process of a split run has them)")
    ap.add_argument("--no-wide-times", action="store_true", help="skip the step-time measurement on the wide model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default TLORA_TORCH_THREADS or 1)")
    ap.add_argument("--no-hybrid", action="store_true", help="run the plain wide UNet (about 2x slower)")
    ap.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--merge", default=None, help="comma list of results.json files: merge them into --out and "
                                                  "write the reports (no model runs)")
    ap.add_argument("--rescore", action="store_true",
                    help="recompute every image metric from the images saved under --out/images (after --merge or "
                         "on --out's results.json), then write the reports")
    ap.add_argument("--docs", action="store_true", help="also copy the plots to docs/quality/")
    return ap


@dataclasses.dataclass(frozen=True)
class Config:
    """What one invocation does, resolved from the command line (quick and default values filled in)."""

    out: Path
    model: Optional[str]
    threads: Optional[int]
    docs: bool
    merge: list[str]
    rescore: bool
    quick: bool
    parts: frozenset
    subjects: list[str]
    seeds: list[int]
    eval_seeds: list[int]
    methods: list[Method]  # base learning rates already multiplied by --lr-factor
    steps: int
    sim_steps: int
    sim_iters: int
    lr_grid: list[float]
    prompts: int
    sample_steps: int
    train_prompts: int
    tune: bool
    tune_only: bool
    given_lrs: dict  # {method: lr} from --lrs (those methods are not tuned)
    references: bool
    wide_times: bool
    hybrid: bool
    argv: list[str]


def make_config(ap: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> Config:
    """Parse the command line into a Config; bad values end in ap.error."""
    a = ap.parse_args(argv)
    quick = a.quick
    eval_seeds = [int(s) for s in a.eval_seeds.split(",")]
    if len(eval_seeds) < 2:
        ap.error("--eval-seeds needs at least two seeds (diversity is measured across them)")
    names = ([n.strip() for n in a.methods.split(";")] if a.methods
             else list(QUICK_METHODS) if quick else [m.name for m in METHODS])
    methods = [dataclasses.replace(m, lr=m.lr * a.lr_factor) for m in METHODS if m.name in names]
    unknown = set(names) - {m.name for m in methods}
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {[m.name for m in METHODS]}")
    given: dict[str, float] = {}
    if a.lrs and a.lrs.lstrip().startswith("{"):
        given = json.loads(a.lrs)
    elif a.lrs:
        given = json.loads(Path(a.lrs).read_text()).get("lrs", {})
    return Config(
        out=Path(a.out), model=a.model, threads=a.threads, docs=a.docs,
        merge=a.merge.split(",") if a.merge else [], rescore=a.rescore, quick=quick,
        parts=frozenset(a.parts.split(",")),
        subjects=(a.subjects or (SUBJECT_QUICK if quick else SUBJECTS_FULL)).split(","),
        seeds=[int(s) for s in (a.seeds or ("0" if quick else "0,1")).split(",")], eval_seeds=eval_seeds,
        methods=methods, steps=a.steps or (50 if quick else 150), sim_steps=a.sim_steps or (40 if quick else 150),
        sim_iters=a.sim_iters or (100 if quick else 300), lr_grid=[float(f) for f in a.lr_grid.split(",")],
        prompts=a.prompts, sample_steps=a.sample_steps, train_prompts=a.train_prompts,
        tune=not (quick or a.no_tune), tune_only=a.tune_only, given_lrs=given, references=not a.no_references,
        wide_times=not a.no_wide_times, hybrid=not a.no_hybrid, argv=sys.argv[1:] if argv is None else list(argv))


@dataclasses.dataclass
class Recorder:
    """A run's results, written to results.json after every finished piece of work."""

    path: Path
    started: float
    results: dict

    def dump(self) -> None:
        """Write the results so far (with the seconds since the start)."""
        self.results["seconds"] = time.perf_counter() - self.started
        self.path.write_text(json.dumps(self.results, indent=1))


def _torch_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads (default TLORA_TORCH_THREADS or 1); returns the count."""
    import torch
    torch.set_num_threads(int(threads or os.environ.get("TLORA_TORCH_THREADS", "1")))
    return torch.get_num_threads()


def reports_only(cfg: Config) -> None:
    """--merge / --rescore: combine (or rescore) saved results and write the reports, no training."""
    results_path = cfg.out / "results.json"
    results = merge(cfg.merge, cfg.out) if cfg.merge else json.loads(results_path.read_text())
    if cfg.rescore:
        path = Path(cfg.model or results.get("model") or D.default_path())
        D.ensure_host()
        _torch_threads(cfg.threads)
        rescore(Bench(path, hybrid=False), results, cfg.out / "images")
    write_reports(results, cfg.out)
    results_path.write_text(json.dumps(results, indent=1))


def run_simulation(bench: Bench, cfg: Config, recorder: Recorder) -> None:
    """The sim part: full fine-tune deltas on the first subject, every family fitted to them."""
    print(f"simulation: full fine-tunes ({cfg.sim_steps} steps) and fits ({cfg.sim_iters} iterations)", flush=True)
    sim_records = []
    for name in cfg.subjects[:1]:
        data = subject_data(bench, name, 5)
        deltas = full_finetune_deltas(bench, data, cfg.sim_steps, 2e-4)
        if cfg.quick:  # a third of the modules: same families, a rougher average
            deltas = dict(list(deltas.items())[::3])
        rel = math.sqrt(sum(float((w1 - w0).pow(2).sum()) for w0, w1 in deltas.values())
                        / sum(float(w0.pow(2).sum()) for w0, _ in deltas.values()))
        print(f"  {name}: |W*-W0|/|W0| = {rel:.4f} over {len(deltas)} modules", flush=True)
        recs = simulate(deltas, cfg.sim_iters, QUICK_SIM_FAMILIES if cfg.quick else None)
        for r in recs:
            r["subject"] = name
            r["delta_rel_norm"] = rel
        sim_records += recs
        recorder.results["simulation"] = sim_records
        recorder.dump()
    write_reports({"simulation": sim_records, "sim_steps": cfg.sim_steps}, cfg.out)


def tune_learning_rates(bench: Bench, cfg: Config, methods: list[Method], recorder: Recorder) -> dict[str, float]:
    """Best factor (of --lr-grid) of each method's base rate: subject + prompt score on validation prompts."""
    name, seed = cfg.subjects[0], cfg.seeds[0]
    print(f"tuning learning rates on {name} (seed {seed}, validation prompts, factors {cfg.lr_grid})", flush=True)
    data = subject_data(bench, name, 5)
    tuning, best_lrs = [], {}
    for m in methods:
        best = None
        for factor in cfg.lr_grid:
            t0 = time.perf_counter()
            rec, _ = run_one(bench, m, data, m.lr * factor, seed, cfg.steps, validation_prompts(name),
                             cfg.eval_seeds[:2], cfg.train_prompts)
            score = rec["subject"] + rec["prompt"]
            tuning.append({**rec, "score": score})
            print(f"  {m.name:14s} lr {m.lr * factor:.0e}: subject {rec['subject']:.3f} "
                  f"prompt {rec['prompt']:.2f} -> {score:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if best is None or score > best[0]:
                best = (score, m.lr * factor)
        best_lrs[m.name] = best[1]
        recorder.results["tuning"] = tuning
        recorder.dump()
    return best_lrs


def learning_rates(bench: Bench, cfg: Config, recorder: Recorder) -> dict[str, float]:
    """Each method's learning rate: given by --lrs, else tuned (unless quick or --no-tune), else its base rate."""
    lrs = {m.name: m.lr for m in cfg.methods}
    lrs.update({k: float(v) for k, v in cfg.given_lrs.items() if k in lrs})
    to_tune = [m for m in cfg.methods if m.name not in cfg.given_lrs]
    if to_tune and cfg.tune:
        lrs.update(tune_learning_rates(bench, cfg, to_tune, recorder))
    return lrs


def run_subject(bench: Bench, cfg: Config, name: str, lrs: dict[str, float], others: dict, records: list,
                recorder: Recorder) -> None:
    """One subject: its reference rows, then every seed x method (records appended, images and grid saved)."""
    data = subject_data(bench, name, 5)
    data.others = others
    prompts = subject_prompts(name, cfg.quick, cfg.prompts)
    texts = [p.text for p in prompts] + list(data.captions[:cfg.train_prompts])
    image_dir = cfg.out / "images"  # every evaluated image, so that metrics can be recomputed (--rescore)
    image_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if cfg.references:
        refs, base_rows = reference_records(bench, data, prompts, cfg.eval_seeds, cfg.train_prompts)
    else:
        refs, base_rows = [], [bench.generate(p.text, cfg.eval_seeds) for p in prompts]
    records += refs
    if refs:
        keep_images(image_dir, name, "base model (no adapter)", 0, base_rows, texts)
    for r in refs:
        print(f"  {name} {r['method']:24s} subject {r['subject']:.3f} shape {r['subject_shape']:.2f} "
              f"palette {r['subject_palette']:.2f} pattern {r['subject_pattern']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    grid = []
    for seed in cfg.seeds:
        for m in cfg.methods:
            t0 = time.perf_counter()
            rec, rows = run_one(bench, m, data, lrs[m.name], seed, cfg.steps, prompts, cfg.eval_seeds,
                                cfg.train_prompts)
            records.append(rec)
            keep_images(image_dir, name, m.name, seed, rows, texts)
            print(f"  {name} seed {seed} {m.name:14s} subject {rec['subject']:.3f} bg {rec['background']:.2f} "
                  f"place {rec['position']:.2f} div {rec['diversity']:.3f} copied {rec['copied_background']:.2f}"
                  f" loss {rec['loss_last']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if seed == cfg.seeds[0]:
                grid.append((m.name, np.concatenate(rows, 0)))
            recorder.results["subjects"] = records
            recorder.dump()
    save_grid([data.images, np.concatenate(base_rows, 0)] + [g[1] for g in grid], cfg.out / f"samples_{name}.png",
              ["training images", "base model"] + [g[0] for g in grid])


def run_subjects(bench: Bench, cfg: Config, path: Path, recorder: Recorder) -> None:
    """The subjects part: learning rates, then each subject (and the wide step times unless --no-wide-times)."""
    lrs = learning_rates(bench, cfg, recorder)
    recorder.results["lrs"] = lrs
    recorder.dump()
    if cfg.tune_only:
        print(f"tuned learning rates: {json.dumps(lrs)}", flush=True)
        return
    records: list[dict] = []
    others = all_subject_references(bench)
    for name in cfg.subjects:
        run_subject(bench, cfg, name, lrs, others, records, recorder)
    recorder.results["subjects"] = records
    if cfg.wide_times:
        recorder.results["wide_step_time"] = wide_step_times(path, cfg.methods, cfg.subjects[0])
    write_reports(recorder.results, cfg.out)
    recorder.dump()


def keep_images(folder: Path, name: str, method: str, seed: int, rows: list, texts: list) -> None:
    """Save a run's evaluated image rows and their prompts (for --rescore)."""
    np.savez_compressed(image_file(folder, name, method, seed), images=np.stack(rows), prompts=np.array(texts))


def run_parts(cfg: Config, started: float) -> bool:
    """Load the model and run the selected parts; False when only tuning was asked for (--tune-only)."""
    path = Path(cfg.model) if cfg.model else D.make_default_model(log=lambda m: print(m, file=sys.stderr))
    D.ensure_host()
    threads = _torch_threads(cfg.threads)
    bench = Bench(path, hybrid=cfg.hybrid, sample_steps=cfg.sample_steps)
    recorder = Recorder(cfg.out / "results.json", started, {
        "model": str(path), "quick": cfg.quick, "steps": cfg.steps, "subjects_run": cfg.subjects, "seeds": cfg.seeds,
        "eval_seeds": cfg.eval_seeds, "hybrid": bench.hybrid, "threads": threads, "sim_steps": cfg.sim_steps,
        "sim_iters": cfg.sim_iters, "lr_grid": cfg.lr_grid, "sample_steps": cfg.sample_steps,
        "train_prompts": cfg.train_prompts, "argv": cfg.argv})
    if "sim" in cfg.parts:
        run_simulation(bench, cfg, recorder)
    if "subjects" in cfg.parts:
        run_subjects(bench, cfg, path, recorder)
        if cfg.tune_only:
            return False
    if cfg.parts == {"wide"}:
        recorder.results["wide_step_time"] = wide_step_times(path, cfg.methods, cfg.subjects[0])
        recorder.dump()
    return True


def main(argv: Optional[list[str]] = None) -> int:
    """Parse arguments and run the selected parts (or only merge/rescore saved results)."""
    started = time.perf_counter()
    cfg = make_config(build_parser(), argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.merge or cfg.rescore:
        reports_only(cfg)
    elif not run_parts(cfg, started):
        return 0
    _copy_docs(cfg.docs, cfg.out)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min; results in {cfg.out / 'results.json'}")
    return 0


def subject_prompts(name: str, quick: bool = False, count: int = 5) -> list[P.SubjectPrompt]:
    """Held-out test prompts: `count` - 2 new backgrounds (at most 3), a new place, a new size (quick: one of each)."""
    held = [p for p in P.held_out_prompts(name) if p.position != "bottom"]
    backgrounds = [p for p in held if p.position == "centre" and p.size == "default"]
    others = [p for p in held if p not in backgrounds][:2]
    if quick:
        count = 3
    return backgrounds[:max(1, min(3, count - len(others)))] + others


def _copy_docs(enabled: bool, out: Path) -> None:
    """With --docs: copy the PNG plots of `out` to docs/quality/."""
    if enabled:
        DOCS.mkdir(parents=True, exist_ok=True)
        for png in out.glob("*.png"):
            (DOCS / png.name).write_bytes(png.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
