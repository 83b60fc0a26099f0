"""Does the transform earn its place? TLoRA against LoRA and its peers on real pretrained weights (issue 17).

Two parts, both on weights nobody here trained and data nobody here wrote
(models and data: benchmarks/real_weights_models.py):

* ``approx``: fully fine-tune all-MiniLM-L6-v2 on Debian description -> section, take every attention and
  MLP linear's true delta W* - W0 and fit it at matched budgets with LoRA (truncated SVD, the optimum),
  TR alone, TLoRA = TRM2 + TR, Kron + TR (TRM1), TLoRA* = TRM2 + LoRA and diag + LoRA (DoRA-like), the
  tensorised ones by Adam from TLoRA's own start; relative error ||W0 T + s Delta - W*|| / ||W* - W0|| vs
  parameters, per layer kind. Every fit is a real `tlora.ModuleAdapter` and is scored by the core's
  own `patched_weight`.
* ``finetune``: adapters at comparable budgets on MiniLM's linears (description -> section) and on
  EfficientNet-Lite0's pointwise convs (handwritten digits): ours through `tlora.attach` (TLoRA(2,6),
  TLoRA*(2,4), TR(6) (TLoRA(2,6) without its transform), Kron+TR(1,6), LoRA r1/2/4/8), LyCORIS's LoHa, LoKr, DoRA and diag-OFT and PEFT's
  LoRA as real peers, plus a head-only row. Learning rate per method chosen on a validation split over a
  five-point grid, 1e-4 ... 1e-2 (diag-OFT x3), choices on an edge of it flagged (`--prior` runs extend a
  grid: docs/QUALITY.md section 6.4); then seeds; held-out accuracy and loss with 95% confidence intervals over seeds and paired tests
  against LoRA r4.

    .venv/bin/python benchmarks/real_weights.py                 # the documented run (docs/QUALITY.md section 6)
    .venv/bin/python benchmarks/real_weights.py --quick         # a small slice (the unit test runs this)

Writes out/real_weights/results.json, summary.md and PNG plots (copied to docs/real_weights/ with --docs).
One torch thread unless --threads says otherwise (the machine is shared).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import real_weights_models as RM  # noqa: E402
from tlora import ModuleAdapter  # noqa: E402
from tlora.fit import fit_adapter  # noqa: E402,F401  (the fit lives in the core; tests call it here)
from tlora.module import attach  # noqa: E402

CACHE = ROOT / ".cache" / "real_weights"
OUT = ROOT / "out" / "real_weights"
DOCS = ROOT / "docs" / "real_weights"


# --------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Method:
    """One adapter configuration: `kind` tlora | lycoris | peft | head; `spec` its settings."""

    name: str
    kind: str
    spec: tuple = ()
    lr_scale: float = 1.0  # centre of its learning-rate grid relative to the base rate

    def grid(self, base: float, points: tuple[float, ...]) -> list[float]:
        """The learning rates tried for this method."""
        return [float(f"{base * self.lr_scale * p:.3g}") for p in points]


METHODS = [
    Method("TLoRA(2,6)", "tlora", ("trm:2", "tr:6")),
    Method("TLoRA*(2,4)", "tlora", ("trm:2", "lora:4")),
    Method("TR(6)", "tlora", ("none", "tr:6")),
    Method("Kron+TR(1,6)", "tlora", ("trm:1", "tr:6")),
    Method("LoRA r1", "tlora", ("none", "lora:1")),
    Method("LoRA r2", "tlora", ("none", "lora:2")),
    Method("LoRA r4", "tlora", ("none", "lora:4")),
    Method("LoRA r8", "tlora", ("none", "lora:8")),
    # LyCORIS: alpha = dim (scale 1, as PEFT's below); LoKr factor 8 with full-matrix halves; diag-OFT blocks of 8.
    Method("LyCORIS LoHa r2", "lycoris", ("loha", 2, 2, {})),
    Method("LyCORIS LoKr f8", "lycoris", ("lokr", 10000, 10000, {"factor": 8})),
    Method("LyCORIS DoRA r4", "lycoris", ("lora", 4, 4, {"weight_decompose": True})),
    Method("LyCORIS OFT b8", "lycoris", ("diag-oft", 8, 8, {}), lr_scale=3.0),
    Method("PEFT LoRA r4", "peft", (4, 4)),
    Method("head only", "head"),
]
QUICK_METHODS = ["TLoRA(2,6)", "LoRA r4", "LyCORIS LoHa r2", "PEFT LoRA r4", "head only"]


def _freeze(model: nn.Module) -> set[int]:
    for p in model.parameters():
        p.requires_grad_(False)
    return {id(p) for p in model.parameters()}


def attach_method(model: nn.Module, method: Method, targets: list[str], seed: int) -> list[nn.Parameter]:
    """Put `method`'s adapters on `targets` of `model` (in place); returns the adapter's trainable parameters."""
    base_ids = _freeze(model)
    torch.manual_seed(seed)  # the peers draw their initial factors from the global generator
    if method.kind == "head":
        return []
    if method.kind == "tlora":
        transform, residual = method.spec
        gen = torch.Generator().manual_seed(seed)
        adapters = {p: ModuleAdapter.create(tuple(model.get_submodule(p).weight.shape), transform, residual,
                                            generator=gen, name=p) for p in targets}
        wrapped = attach(model, adapters)
        return [p for m in wrapped.values() for p in m.adapter_params.values()]
    if method.kind == "lycoris":
        import logging
        from lycoris import LycorisNetwork
        logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every module it wraps at INFO
        algo, dim, alpha, extra = method.spec
        # Exact names only (LyCORIS matches target names with re.match, i.e. as prefixes).
        LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "module_algo_map": {},
                                     "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
                                     "target_name": [re.escape(t) + "$" for t in targets]})
        net = LycorisNetwork(model, multiplier=1.0, lora_dim=dim, conv_lora_dim=dim, alpha=alpha, conv_alpha=alpha,
                             network_module=algo, **extra)
        if len(net.loras) != len(targets):
            raise RuntimeError(f"{method.name}: LyCORIS wrapped {len(net.loras)} of {len(targets)} modules")
        net.apply_to()
        model._lycoris = net  # keeps the network (its modules hold the parameters) alive with the model
    elif method.kind == "peft":
        from peft import LoraConfig, inject_adapter_in_model
        r, alpha = method.spec
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), model)
    params = [p for p in model.parameters() if id(p) not in base_ids]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise RuntimeError(f"{method.name}: no adapter parameters were created")
    return params


# --------------------------------------------------------------------------- tasks

@dataclasses.dataclass
class Task:
    """A frozen classifier with its cached lower activations per split and the modules to adapt."""

    name: str
    steps: int
    model: nn.Module  # classifier in eval mode, head zero; `forward(h, mask)` from cached h
    targets: list[str]
    data: dict[str, tuple[Tensor, Tensor | None, Tensor]]  # split -> (h, mask, labels)
    snapshot: dict


def _cached_lower(model: nn.Module, x: Tensor, mask: Tensor | None, chunk: int = 64) -> Tensor:
    return torch.cat([model.lower(x[i:i + chunk], None if mask is None else mask[i:i + chunk])
                      for i in range(0, len(x), chunk)])


def text_task(cfg: "Config") -> Task:
    """MiniLM on Debian description -> section, layers from cfg.text_first_layer adapted."""
    snap = RM.debian_snapshot(CACHE, cfg.text_per_class, seed=0)
    bert, tok = RM.load_minilm(CACHE)
    model = RM.TextClassifier(bert, len(snap["sections"]), cfg.text_first_layer).eval()
    data = {}
    for split, rows in snap["splits"].items():
        enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=cfg.text_tokens,
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = torch.tensor([r["label"] for r in rows])
        data[split] = (_cached_lower(model, ids, mask), mask, labels)
    targets = ["bert." + p for p in RM.minilm_linears(bert, cfg.text_first_layer)]
    return Task("MiniLM / Debian sections", cfg.text_steps, model, targets, data,
                {"sha256": snap["sha256"], "sections": snap["sections"], "per_class": list(cfg.text_per_class),
                 "packages_listed": snap["packages_listed"], "tokens": cfg.text_tokens,
                 "first_layer": cfg.text_first_layer})


def image_task(cfg: "Config") -> Task:
    """EfficientNet-Lite0 on digits, blocks from cfg.image_first_block adapted."""
    snap = RM.digits_snapshot(CACHE, cfg.image_per_class, seed=0)
    net = RM.load_efficientnet()
    model = RM.ImageClassifier(net, 10, cfg.image_size, cfg.image_first_block).eval()
    data = {split: (_cached_lower(model, x, None), None, y) for split, (x, y) in snap["splits"].items()}
    targets = ["net." + p for p in RM.efficientnet_convs(net, cfg.image_first_block)]
    return Task("EfficientNet-Lite0 / digits", cfg.image_steps, model, targets, data,
                {"sha256": snap["sha256"], "per_class": list(cfg.image_per_class),
                 "size": cfg.image_size, "first_block": cfg.image_first_block,
                 "sizes": {k: int(len(v[2])) for k, v in data.items()}})


def _batches(h: Tensor, mask: Tensor | None, y: Tensor, size: int = 128):
    for i in range(0, len(y), size):
        yield h[i:i + size], None if mask is None else mask[i:i + size], y[i:i + size]


def evaluate(model: nn.Module, split: tuple) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a cached split."""
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for h, m, y in _batches(*split):
            logits = model(h, m)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return {"acc": correct / n, "loss": loss / n}


def train_one(task: Task, method: Method, lr: float, seed: int, cfg: "Config", test: bool = True) -> dict:
    """Train method's adapter + the new head for task.steps; validation (and test) metrics, params, seconds."""
    t0 = time.perf_counter()
    model = copy.deepcopy(task.model)
    params = attach_method(model, method, task.targets, seed)
    n_params = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.normal_(0, 1e-3, generator=gen)  # seeded head start, same for every method
    for p in model.head.parameters():
        p.requires_grad_(True)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    if params:
        groups.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4)
    h, mask, y = task.data["train"]
    order = torch.randperm(len(y), generator=gen)
    pos, losses = 0, []
    trainable = [p for g in groups for p in g["params"]]
    for _ in range(task.steps):
        if pos + cfg.batch > len(order):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + cfg.batch]
        pos += cfg.batch
        loss = F.cross_entropy(model(h[idx], None if mask is None else mask[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
    rec = {"task": task.name, "method": method.name, "lr": lr, "seed": seed, "params": n_params,
           "train_loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
           "val": evaluate(model, task.data["val"])}
    if test:
        rec["test"] = evaluate(model, task.data["test"])
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _select(records: list[dict]) -> dict:
    """The tuning run with the best validation accuracy (ties: lower validation loss; NaN losses last)."""
    def key(r: dict) -> tuple:
        loss = r["val"]["loss"]
        return (-r["val"]["acc"], loss if math.isfinite(loss) else float("inf"))
    return min(records, key=key)


def run_finetunes(task: Task, methods: list[Method], cfg: "Config", log: Callable[[str], None],
                  prior: list[dict] | None = None) -> list[dict]:
    """Per method: tune lr on seed 0 (validation), then the other seeds at the chosen rate.

    With `prior` (an earlier run's records, --prior): the rate is picked over the earlier tuning runs of the
    same task and method and this run's points together (as `reselect` does when the two are merged); the
    seeds run only when one of this run's points wins, otherwise the earlier run's seeds stay the chosen
    ones and this run marks nothing chosen for that method."""
    out = []
    for method in methods:
        grid = [0.0] if method.kind == "head" else method.grid(cfg.base_lr, cfg.lr_points)
        tuning = []
        for lr in grid:
            rec = train_one(task, method, lr, cfg.seeds[0], cfg)
            rec["phase"] = "tune"
            tuning.append(rec)
            log(f"  {task.name:28s} {method.name:17s} lr {lr:<8.3g} seed {cfg.seeds[0]}  val acc "
                f"{rec['val']['acc']:.3f} loss {rec['val']['loss']:.3f}  ({rec['seconds']:.1f} s)")
        earlier = [r for r in prior or [] if r["task"] == task.name and r["method"] == method.name
                   and r.get("phase") == "tune" and r["seed"] == cfg.seeds[0]]
        best = _select(earlier + tuning)  # earlier first: the order `merge` puts them in, so ties agree
        out += tuning
        if not any(best is r for r in tuning):
            log(f"  {task.name:28s} {method.name:17s} earlier lr {best['lr']:<8.3g} still best: seeds not run")
            continue
        best["chosen"] = True
        for seed in cfg.seeds[1:]:
            rec = train_one(task, method, best["lr"], seed, cfg)
            rec["phase"], rec["chosen"] = "seed", True
            out.append(rec)
            log(f"  {task.name:28s} {method.name:17s} lr {best['lr']:<8.3g} seed {seed}  test acc "
                f"{rec['test']['acc']:.3f}  ({rec['seconds']:.1f} s)")
    return out


# --------------------------------------------------------------------------- statistics

def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, half-width of the 95% t confidence interval, sd) over seeds; half-width NaN for one value."""
    from scipy import stats
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan"), float("nan")
    sd = float(a.std(ddof=1))
    return float(a.mean()), float(stats.t.ppf(0.975, len(a) - 1) * sd / math.sqrt(len(a))), sd


def paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test p-value over seeds (same seeds: same batches and head start); NaN if undefined."""
    from scipy import stats
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2 or not np.isfinite(d).all():
        return float("nan")
    if np.all(d == d[0]):
        return 0.0 if d[0] != 0 else 1.0
    return float(stats.ttest_rel(a, b).pvalue)


def lr_edge(records: list[dict], task: str, method: str) -> str | None:
    """'low' / 'high' when the chosen rate is the lowest / highest of the method's tuning grid (the
    grid did not bracket the optimum there), None inside it or without a grid (head only)."""
    tune = sorted({r["lr"] for r in records if r["task"] == task and r["method"] == method
                   and r.get("phase") == "tune"})
    chosen = [r["lr"] for r in records if r["task"] == task and r["method"] == method
              and r.get("phase") == "tune" and r.get("chosen")]
    if len(tune) < 2 or not chosen:
        return None
    return "low" if chosen[0] == tune[0] else "high" if chosen[0] == tune[-1] else None


def summarize(records: list[dict], reference: str = "LoRA r4") -> list[dict]:
    """Per task and method: chosen lr, params, test acc/loss mean +- 95% CI, paired p-value vs the reference."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in records):
        chosen = [r for r in records if r["task"] == task and r.get("chosen")]
        ref = {r["seed"]: r for r in chosen if r["method"] == reference}
        order = {m.name: i for i, m in enumerate(METHODS)}  # METHODS' order, also when merged runs chose
        names = sorted(dict.fromkeys(r["method"] for r in chosen), key=lambda m: order.get(m, len(order)))
        for method in names:
            runs = sorted((r for r in chosen if r["method"] == method), key=lambda r: r["seed"])
            acc = [r["test"]["acc"] for r in runs]
            loss = [r["test"]["loss"] for r in runs]
            row = {"task": task, "method": method, "lr": runs[0]["lr"], "params": runs[0]["params"],
                   "seeds": [r["seed"] for r in runs], "n": len(runs),
                   "acc": mean_ci(acc), "loss": mean_ci(loss),
                   "val_acc": float(np.mean([r["val"]["acc"] for r in runs])),
                   "seconds": float(np.mean([r["seconds"] for r in runs])),
                   "lr_edge": lr_edge(records, task, method)}
            common = [r["seed"] for r in runs if r["seed"] in ref]
            if method != reference and ref and len(common) == len(runs):
                row["p_acc_vs_ref"] = paired_p(acc, [ref[s]["test"]["acc"] for s in common])
                row["d_acc_vs_ref"] = float(np.mean(acc) - np.mean([ref[s]["test"]["acc"] for s in common]))
                row["p_loss_vs_ref"] = paired_p(loss, [ref[s]["test"]["loss"] for s in common])
            rows.append(row)
    return rows


# The questions of issue 17 as paired comparisons: (method, against).
KEY_PAIRS = [("TLoRA(2,6)", "LoRA r4"), ("TLoRA(2,6)", "LoRA r2"), ("TLoRA(2,6)", "TR(6)"),
             ("TLoRA*(2,4)", "LoRA r4"), ("Kron+TR(1,6)", "TR(6)"), ("LoRA r4", "head only"),
             ("TLoRA(2,6)", "head only")]


def comparisons(records: list[dict], pairs: list[tuple[str, str]] = KEY_PAIRS) -> list[dict]:
    """Per task and pair: params ratio, mean differences of test accuracy and loss over the shared seeds, paired p."""
    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        chosen = [r for r in records if r["task"] == task and r.get("chosen")]
        for a, b in pairs:
            ra = {r["seed"]: r for r in chosen if r["method"] == a}
            rb = {r["seed"]: r for r in chosen if r["method"] == b}
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            row = {"task": task, "method": a, "against": b, "seeds": seeds,
                   "params_ratio": ra[seeds[0]]["params"] / rb[seeds[0]]["params"] if rb[seeds[0]]["params"] else None}
            for metric in ("acc", "loss"):
                x = [ra[s]["test"][metric] for s in seeds]
                y = [rb[s]["test"][metric] for s in seeds]
                row[f"d_{metric}"] = mean_ci([u - v for u, v in zip(x, y)])
                row[f"p_{metric}"] = paired_p(x, y)
            out.append(row)
    return out


# --------------------------------------------------------------------------- approximation of real deltas

def full_finetune_deltas(cfg: "Config", log: Callable[[str], None]) -> tuple[dict, dict]:
    """Fully fine-tune MiniLM's encoder on the description task; {linear path: (W0, W*)} and run info."""
    ft_cfg = dataclasses.replace(cfg, text_first_layer=0)
    task = text_task(ft_cfg)
    model = copy.deepcopy(task.model)
    for p in model.parameters():
        p.requires_grad_(False)
    paths = RM.minilm_linears(model.bert)
    if cfg.approx_layers is not None:
        paths = [p for p in paths if int(p.split(".")[2]) in cfg.approx_layers]
    w0 = {p: model.bert.get_submodule(p).weight.detach().clone() for p in paths}
    enc = [p for n, p in model.bert.encoder.named_parameters()]
    for p in enc + list(model.head.parameters()):
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": enc, "lr": cfg.ft_lr}, {"params": list(model.head.parameters()),
                                                                "lr": cfg.head_lr}], weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    h, mask, y = task.data["train"]
    t0 = time.perf_counter()
    for step in range(cfg.ft_steps):
        idx = torch.randint(len(y), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(model(h[idx], mask[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc + list(model.head.parameters()), 1.0)
        opt.step()
    info = {"steps": cfg.ft_steps, "lr": cfg.ft_lr, "seconds": time.perf_counter() - t0,
            "val": evaluate(model, task.data["val"]), "test": evaluate(model, task.data["test"])}
    deltas = {p: (w0[p], model.bert.get_submodule(p).weight.detach().clone()) for p in paths}
    num = sum(float((b - a).pow(2).sum()) for a, b in deltas.values())
    den = sum(float(a.pow(2).sum()) for a, _ in deltas.values())
    info["relative_change"] = math.sqrt(num / den)
    log(f"  full fine-tune: {cfg.ft_steps} steps in {info['seconds']:.0f} s, test acc {info['test']['acc']:.3f}, "
        f"|W*-W0|/|W0| = {info['relative_change']:.4f}")
    return deltas, info


# family -> [(config label, transform, residual)]
APPROX_FAMILIES: dict[str, list[tuple[str, str, str]]] = {
    "LoRA": [(f"r{r}", "none", f"lora:{r}") for r in (1, 2, 4, 8, 16)],
    "TR alone": [(f"R{r}", "none", f"tr:{r}") for r in (2, 4, 6, 8, 12)],
    "TLoRA = TRM2+TR": [(f"(2,{r})", "trm:2", f"tr:{r}") for r in (2, 4, 6, 8)],
    "Kron+TR = TRM1+TR": [(f"(1,{r})", "trm:1", f"tr:{r}") for r in (2, 6)],
    "TLoRA* = TRM2+LoRA": [(f"(2,{r})", "trm:2", f"lora:{r}") for r in (1, 2, 4, 8)],
    "diag+LoRA (DoRA-like)": [(f"r{r}", "diag", f"lora:{r}") for r in (1, 4, 8)],
}
QUICK_APPROX = {"LoRA": ["r1", "r4"], "TR alone": ["R2"], "TLoRA = TRM2+TR": ["(2,2)"],
                "TLoRA* = TRM2+LoRA": ["(2,1)"], "diag+LoRA (DoRA-like)": ["r1"], "Kron+TR = TRM1+TR": ["(1,2)"]}


def run_approx(deltas: dict, cfg: "Config", log: Callable[[str], None]) -> list[dict]:
    """Relative error of every family/budget per layer kind (and over all), scored by ModuleAdapter.patched_weight."""
    out = []
    for family, configs in APPROX_FAMILIES.items():
        for label, transform, residual in configs:
            if cfg.quick and label not in QUICK_APPROX.get(family, []):
                continue
            t0 = time.perf_counter()
            err: dict[str, float] = {}
            den: dict[str, float] = {}
            params: dict[str, int] = {}
            for path, (w0, w1) in deltas.items():
                ad = fit_adapter(w0, w1, transform, residual, cfg.approx_iters)
                fit = ad.patched_weight(w0)
                for kind in (RM.layer_kind(path), "all"):
                    err[kind] = err.get(kind, 0.0) + float((fit - w1).pow(2).sum())
                    den[kind] = den.get(kind, 0.0) + float((w1 - w0).pow(2).sum())
                    params[kind] = params.get(kind, 0) + ad.num_params()
            for kind in err:
                out.append({"family": family, "config": label, "kind": kind, "params": params[kind],
                            "rel_error": math.sqrt(err[kind] / den[kind])})
            log(f"  approx {family:22s} {label:7s} params {params['all']:8d}  rel.error "
                f"attention {math.sqrt(err.get('attention', 0) / den.get('attention', 1)):.4f} "
                f"mlp {math.sqrt(err.get('mlp', 0) / den.get('mlp', 1)):.4f}  ({time.perf_counter() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------- reports and plots

def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_approx(records: list[dict], path: Path) -> None:
    """Relative error vs parameters per family, one panel per layer kind (log x)."""
    plt = _plt()
    kinds = [k for k in ("attention", "mlp") if any(r["kind"] == k for r in records)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.2 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for family in dict.fromkeys(r["family"] for r in records):
            pts = sorted((r["params"], r["rel_error"]) for r in records if r["family"] == family and r["kind"] == kind)
            ax.plot([p for p, _ in pts], [e for _, e in pts], marker="o", ms=4, label=family)
        ax.set_xscale("log")
        ax.set_xlabel(f"parameters ({kind} linears of MiniLM)")
        ax.set_ylabel("relative error ||W0 T + s D - W*|| / ||W* - W0||")
        ax.set_title(f"fitting real fine-tune deltas: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_finetunes(summary: list[dict], path: Path) -> None:
    """Held-out accuracy (mean, 95% CI over seeds) vs adapter parameters, one panel per task."""
    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary if r["task"] == task]
        for r in rows:
            if r["method"] == "head only":
                ax.axhline(r["acc"][0], color="gray", ls="--", lw=1, label="head only")
                continue
            mean, half, _ = r["acc"]
            colour = "C0" if r["method"].startswith(("TLoRA", "Kron")) else "C2" if r["method"].startswith("TR(") \
                else "C1" if r["method"].startswith("LoRA") else "C3"
            ax.errorbar([max(r["params"], 1)], [mean], yerr=[0 if not math.isfinite(half) else half], fmt="o",
                        color=colour, capsize=3)
            ax.annotate(r["method"].replace("LyCORIS ", "").replace("PEFT ", "PEFT "), (max(r["params"], 1), mean),
                        fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel("held-out accuracy (mean, 95% CI over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_ci(v: tuple) -> str:
    mean, half, _ = v
    return f"{mean:+.3f}".lstrip("+") + (f" ± {half:.3f}" if math.isfinite(half) else "")


def markdown(results: dict) -> str:
    """summary.md: the approximation table and the fine-tune tables."""
    lines = ["# Real-weight benchmark (benchmarks/real_weights.py)", ""]
    if results.get("approx"):
        lines += ["## Approximation of real fine-tune deltas (MiniLM)", "",
                  "| family | config | params (attention) | rel. error attention | params (MLP) | rel. error MLP "
                  "| rel. error all |", "|---|---|---|---|---|---|---|"]
        recs = results["approx"]
        for family in dict.fromkeys(r["family"] for r in recs):
            for config in dict.fromkeys(r["config"] for r in recs if r["family"] == family):
                by = {r["kind"]: r for r in recs if r["family"] == family and r["config"] == config}
                a, m, al = by.get("attention"), by.get("mlp"), by["all"]
                lines.append(f"| {family} | {config} | {a['params'] if a else '-'} | "
                             f"{a['rel_error']:.4f} | {m['params'] if m else '-'} | {m['rel_error']:.4f} | "
                             f"{al['rel_error']:.4f} |" if a and m else
                             f"| {family} | {config} | - | - | - | - | {al['rel_error']:.4f} |")
        lines.append("")
    if results.get("summary"):
        for task in dict.fromkeys(r["task"] for r in results["summary"]):
            lines += [f"## Fine-tunes: {task}", "",
                      "| method | params | lr | test acc (95% CI) | test loss (95% CI) | Δacc vs LoRA r4 | p (acc) "
                      "| p (loss) | s/run |", "|---|---|---|---|---|---|---|---|---|"]
            for r in results["summary"]:
                if r["task"] != task:
                    continue
                d = f"{r['d_acc_vs_ref']:+.3f}" if "d_acc_vs_ref" in r else "-"
                p = f"{r['p_acc_vs_ref']:.3f}" if "p_acc_vs_ref" in r else "-"
                pl = f"{r['p_loss_vs_ref']:.3f}" if "p_loss_vs_ref" in r else "-"
                edge = f" ({r['lr_edge']} edge)" if r.get("lr_edge") else ""
                lines.append(f"| {r['method']} | {r['params']:,} | {r['lr']:.3g}{edge} | {_fmt_ci(r['acc'])} | "
                             f"{_fmt_ci(r['loss'])} | {d} | {p} | {pl} | {r['seconds']:.1f} |")
            lines.append("")
        lines += ["Key comparisons (differences of test metrics over shared seeds, mean ± 95% CI; paired t-test):", "",
                  "| task | method | against | params ratio | Δ acc | p (acc) | Δ loss | p (loss) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comparisons(results["finetunes"]):
            ratio = f"{c['params_ratio']:.2f}" if c["params_ratio"] else "-"
            lines.append(f"| {c['task']} | {c['method']} | {c['against']} | {ratio} | {_fmt_ci(c['d_acc'])} | "
                         f"{c['p_acc']:.3f} | {_fmt_ci(c['d_loss'])} | {c['p_loss']:.3f} |")
        lines.append("")
        scale = {m.name: m.lr_scale for m in METHODS}
        base = results["config"]["base_lr"]

        def mult(r: dict) -> float:  # the rate as a multiple of base_lr x the method's lr_scale
            return float(f"{r['lr'] / (base * scale.get(r['method'], 1.0)):.3g}")

        tuned = [r for r in results["finetunes"] if r["phase"] == "tune" and r["lr"] > 0]
        points = sorted({mult(r) for r in tuned})  # the config's grid, and any points a merged run added
        lines += ["Learning-rate tuning (seed %s, validation accuracy / loss):" % results["config"]["seeds"][0], "",
                  "| task | method | " + " | ".join(f"lr x{p:g}" for p in points) + " |",
                  "|---|---|" + "---|" * len(points)]
        for task in dict.fromkeys(r["task"] for r in results["finetunes"]):
            for method in dict.fromkeys(r["method"] for r in results["finetunes"] if r["task"] == task):
                tune = {mult(r): r for r in tuned if r["task"] == task and r["method"] == method}
                if len(tune) < 2:
                    continue
                cells = [("-" if p not in tune else ("**" if tune[p].get("chosen") else "") +
                          f"{tune[p]['lr']:.3g}: {tune[p]['val']['acc']:.3f} / {tune[p]['val']['loss']:.3f}" +
                          ("**" if tune[p].get("chosen") else "")) for p in points]
                lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_reports(results: dict, out: Path, docs: bool, plots_too: bool = True) -> list[Path]:
    """results.json, summary.md and the plots in `out` (PNGs also to docs/real_weights/ with docs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    plots: list[Path] = []
    if not plots_too:
        return plots
    if results.get("approx"):
        plot_approx(results["approx"], out / "approx_minilm.png")
        plots.append(out / "approx_minilm.png")
    if results.get("summary"):
        plot_finetunes(results["summary"], out / "finetunes.png")
        plots.append(out / "finetunes.png")
    if docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        for p in plots:
            (DOCS / p.name).write_bytes(p.read_bytes())
    return plots


# --------------------------------------------------------------------------- configuration and main

@dataclasses.dataclass
class Config:
    """Every size of a run (the defaults are the documented run; --quick shrinks them)."""

    parts: tuple[str, ...] = ("approx", "text", "image")
    quick: bool = False
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    # x base_lr (x lr_scale): 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 (diag-OFT 3e-4 ... 3e-2); the three-point
    # 1e-3 ... 1e-2 grid left most methods on its lowest rate, so it did not bracket the optimum.
    lr_points: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    base_lr: float = 1e-3
    head_lr: float = 3e-3
    batch: int = 16
    text_steps: int = 60
    text_per_class: tuple[int, int, int] = (96, 16, 40)
    text_tokens: int = 32
    text_first_layer: int = 4
    image_steps: int = 40
    image_per_class: tuple[int, int, int] = (16, 16, 60)
    image_size: int = 48
    image_first_block: int = 11
    ft_steps: int = 150
    ft_lr: float = 1e-4
    approx_iters: int = 100
    approx_layers: tuple[int, ...] | None = (1, 4)
    threads: int = 1
    prior: tuple[str, ...] = ()  # earlier results.json whose tuning runs join the rate selection (--prior)


QUICK = dict(methods=tuple(QUICK_METHODS), seeds=(0, 1), lr_points=(1.0, 10.0), text_steps=2, image_steps=2,
             batch=4, text_per_class=(4, 2, 2), text_tokens=16, text_first_layer=5, image_per_class=(2, 2, 2),
             image_size=48, image_first_block=15, ft_steps=2, approx_iters=3, approx_layers=(5,))


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (each overrides one Config field)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small slice of everything (tens of seconds)")
    ap.add_argument("--parts", help="comma list of approx,text,image")
    ap.add_argument("--methods", help="semicolon list of method names")
    ap.add_argument("--seeds", help="comma list of training seeds (the first tunes the learning rate)")
    ap.add_argument("--lr-points", help="comma list of multipliers of the base learning rate")
    ap.add_argument("--text-steps", type=int)
    ap.add_argument("--image-steps", type=int)
    ap.add_argument("--approx-iters", type=int)
    ap.add_argument("--ft-steps", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--text-first-layer", type=int, help="first MiniLM layer adapted (lower ones cached)")
    ap.add_argument("--image-first-block", type=int, help="first EfficientNet block adapted (lower ones cached)")
    ap.add_argument("--image-per-class", help="train,val,test digits per class")
    ap.add_argument("--prior", help="comma list of earlier results.json: extend their grids (the rate is picked "
                    "over their tuning runs and this run's; seeds run only where a new point wins; then --merge)")
    ap.add_argument("--merge", help="comma list of results.json files to merge into --out (no training)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--docs", action="store_true", help="copy the plots to docs/real_weights/")
    return ap


def make_config(args: argparse.Namespace) -> Config:
    """Config from the defaults, --quick and the flags."""
    cfg = Config(**(QUICK if args.quick else {}), quick=args.quick)
    if args.parts:
        cfg.parts = tuple(p.strip() for p in args.parts.split(","))
    if args.methods:
        cfg.methods = tuple(m.strip() for m in args.methods.split(";"))
    if args.seeds:
        cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.lr_points:
        cfg.lr_points = tuple(float(s) for s in args.lr_points.split(","))
    if args.prior:
        cfg.prior = tuple(p.strip() for p in args.prior.split(","))
    if args.image_per_class:
        cfg.image_per_class = tuple(int(v) for v in args.image_per_class.split(","))
    for name in ("text_steps", "image_steps", "approx_iters", "ft_steps", "threads", "text_first_layer",
                 "image_first_block"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    unknown = set(cfg.methods) - {m.name for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown methods: {sorted(unknown)}")
    return cfg


def _commit() -> str:
    """The checkout's HEAD (and '+dirty' with uncommitted changes), for the record."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "tlora"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(cfg: Config, out: Path, docs: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the configured parts and write the reports; returns the results dict."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, docs, log)
    finally:
        torch.set_num_threads(previous_threads)  # a caller (the test suite) keeps its own setting


def _run(cfg: Config, out: Path, docs: bool, log: Callable[[str], None]) -> dict:
    started = time.time()
    prior = [rec for p in cfg.prior for rec in json.loads(Path(p).read_text())["finetunes"]]
    results: dict = {"config": dataclasses.asdict(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                 time.gmtime(started)),
                     "torch": torch.__version__, "finetunes": [], "tasks": {}, "commit": _commit()}
    if "approx" in cfg.parts:
        log("approximation of real fine-tune deltas (MiniLM)")
        deltas, info = full_finetune_deltas(cfg, log)
        results["full_finetune"] = info
        results["approx"] = run_approx(deltas, cfg, log)
    methods = [m for m in METHODS if m.name in cfg.methods]
    for part, make in (("text", text_task), ("image", image_task)):
        if part not in cfg.parts:
            continue
        task = make(cfg)
        results["tasks"][task.name] = {**task.snapshot, "targets": len(task.targets)}
        log(f"fine-tunes: {task.name} ({len(task.targets)} modules adapted)")
        results["finetunes"] += run_finetunes(task, methods, cfg, log, prior)
        results["summary"] = summarize(results["finetunes"])
        write_reports(results, out, False, plots_too=False)  # partial tables while the run goes on
    if results["finetunes"]:
        results["summary"] = summarize(results["finetunes"])
    results["wall_minutes"] = (time.time() - started) / 60
    write_reports(results, out, docs)
    log(f"done in {results['wall_minutes']:.1f} min: {out / 'summary.md'}")
    return results


def reselect(records: list[dict]) -> None:
    """Where a task/method was tuned in several merged runs (a later run extending its grid), re-pick the
    rate over all its tuning runs (validation, as `_select`) and mark as chosen that run and the seeds run at
    that rate in the same source; the other runs' choices are unmarked. In place; one source: no change."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    for runs in groups.values():
        tune = [r for r in runs if r.get("phase") == "tune"]
        if len({r.get("source") for r in tune}) < 2:
            continue
        best = _select(tune)
        for r in runs:
            r.pop("chosen", None)
            if r is best or (r.get("phase") == "seed" and r.get("source") == best.get("source")
                             and r["lr"] == best["lr"]):
                r["chosen"] = True


def merge(paths: list[str], out: Path, docs: bool = False) -> dict:
    """One report from several runs' results.json (e.g. parts run one after another with other sizes)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results: dict = {"merged_from": [{"path": p, "config": r["config"], "started": r["started"],
                                      "commit": r.get("commit"), "wall_minutes": r.get("wall_minutes")}
                                     for p, r in zip(paths, parts)],
                     "config": parts[0]["config"], "finetunes": [], "tasks": {}}
    for i, r in enumerate(parts):
        for key in ("approx", "full_finetune"):
            if r.get(key):
                results[key] = r[key]
        results["finetunes"] += [{**rec, "source": i} for rec in r["finetunes"]]
        results["tasks"].update(r.get("tasks", {}))
    reselect(results["finetunes"])
    if results["finetunes"]:
        results["summary"] = summarize(results["finetunes"])
    results["wall_minutes"] = sum(r.get("wall_minutes") or 0 for r in parts)
    write_reports(results, out, docs)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.merge:
        merge(args.merge.split(","), Path(args.out), args.docs)
        return 0
    run(make_config(args), Path(args.out), args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
