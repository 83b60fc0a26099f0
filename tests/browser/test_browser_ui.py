"""The web UI in a real browser: live training panels, reload recovery and adapter cards.

Screenshots land in tests/artifacts/ (ignored): browser_training.png, browser_reload.png,
browser_adapter_card.png.
"""
from __future__ import annotations

import math
import uuid
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.browser.comfy_page import ComfyPage, wait_until

CKPT = "tlora-tiny-sd15.safetensors"
FINAL = ("done", "cancelled", "diverged", "failed")


def train_inputs(steps: int, output_name: str, seed: int = 0, sample_every: int = 0) -> dict:
    """TLoRATrain inputs for a tiny CPU run on the harness checkpoint (64 px, two flat images)."""
    return {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0],
            "instance_prompt": "a photo of sks dog", "steps": steps, "output_name": output_name,
            "transform": "trm:2", "residual": "tr:6", "targets": "attn", "learning_rate": 1e-3, "batch_size": 1,
            "resolution": 64, "loss": "mse", "seed": seed, "save_every": 0, "sample_every": sample_every}


def base_graph() -> dict:
    """Checkpoint + two 64 px images: what every training graph here starts from."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2,
                                                          "color": 8421504}}}


def file_params(path: Path) -> int:
    """Parameter count of an adapter file, read from its tensors (every one but the per-module scale)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".tlora_scale"))


def registry_history(server: Any, run_id: str) -> list[tuple[int, float]]:
    """(step, loss) pairs the server's run registry holds for a run."""
    run = server.get_json(f"/tlora/runs/{run_id}")
    return [(h["step"], h["loss"]) for h in run["history"]]


def unique(prefix: str) -> str:
    """An output name no earlier test in this server session used."""
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


# ----------------------------------------------------------------------------------------------
@pytest.mark.every_host  # the panel and the card on every tested host's own frontend
def test_training_panels_chart_every_step_and_summarise(ui: ComfyPage, comfy_server: Any) -> None:
    """Two training nodes in one graph: every step's loss reaches its own node's chart; summaries appear.

    Node 4 holds one of its two images out (validation_split 0.5, every step): its held-out losses are
    drawn beside the training loss, as the events and the server's registry give them; node 3 draws none."""
    steps = {3: 5, 4: 3}
    names = {3: unique("browser_a"), 4: unique("browser_b")}
    graph = base_graph()
    graph["3"] = {"class_type": "TLoRATrain", "inputs": train_inputs(steps[3], names[3], seed=0)}
    graph["4"] = {"class_type": "TLoRATrain", "inputs": {**train_inputs(steps[4], names[4], seed=1),
                                                        "validation_split": 0.5, "validate_every": 1}}
    graph["5"] = {"class_type": "TLoRALoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 1.0}}
    ui.load_api_graph(graph, "tlora_browser_training.json",
                      positions={"1": (20, 80), "2": (20, 300), "3": (420, 80), "4": (840, 80), "5": (1260, 80)})
    for nid in steps:
        panel = ui.panel(nid)
        assert panel is not None and panel["run"] is None, "a new training node must start with an empty panel"
    ui.record_events()
    ui.queue()
    ui.wait_runs_final(list(steps), timeout=600)
    events = ui.events()

    for nid, n in steps.items():
        panel = ui.panel(nid)
        run = panel["run"]
        mine = [e for e in events if str(e.get("node")) == str(nid) and "status" not in e]
        # Every step arrived as an event and went to this node's chart, in order, with its loss.
        assert [e["step"] for e in mine] == list(range(1, n + 1)), mine
        assert [(p["step"], p["loss"]) for p in panel["points"]] == [(e["step"], e["loss"]) for e in mine]
        assert run["sources"] == {"event": n, "route": 0}, "all points must have come live, none backfilled"
        held_out = [e.get("val_loss") for e in mine]
        assert panel["drawn"] == {"raw": n, "smooth": n, "val": n if nid == 4 else 0, "log": False}
        assert [p["val_loss"] for p in panel["points"]] == held_out
        assert panel["heldOutLegend"] == (nid == 4)
        assert all(isinstance(v, float) for v in held_out) if nid == 4 else held_out == [None] * n, held_out
        assert registry_history(comfy_server, run["id"]) == [(p["step"], p["loss"]) for p in panel["points"]]
        record = comfy_server.get_json(f"/tlora/runs/{run['id']}")["history"]
        assert [h.get("val_loss") for h in record] == held_out
        # The summary: saved file, its parameter count and size, complete.
        assert run["status"] == "done" and panel["badge"] == "complete"
        assert panel["stepText"] == f"Step {n} / {n}"
        summary = run["summary"]
        assert summary["file"] == f"{names[nid]}.safetensors"
        path = comfy_server.loras_dir / summary["file"]
        assert summary["params"] == file_params(path) and summary["file_bytes"] == path.stat().st_size
        text = panel["summaryText"]
        assert text is not None and summary["file"] in text
        assert f"{file_params(path):,} parameters" in text and "complete" in text, text

    # The log-scale toggle is a real button on the node.
    box = ui.node_box(3)
    ui.view(box["x"] - 90, box["y"] + box["h"] - 900, 1.0)
    toggle = ui.page.locator(f'[data-tlora=train][data-run-id="{ui.panel(3)["run"]["id"]}"] [data-role=log-toggle]')
    toggle.click()
    ui.wait_js("() => app.graph.getNodeById(3).tloraPanel.chart.drawn.log === true", timeout=10, what="log axis")
    assert toggle.get_attribute("aria-pressed") == "true"

    # The new files are offered in the loader right away, and its card agrees with the summary.
    ui.view(box["x"] - 90, box["y"] + box["h"] - 900, 1.0)
    a_file = ui.panel(3)["run"]["summary"]["file"]
    if ui.node_design == "vue":
        five = ui.node_box(5)  # reloading the layout would open another tab: look at the node where it is
        ui.view(five["x"] - 40, five["y"] - 40, 1.0)
    else:
        ui.move_nodes({5: (1260, box["y"] + box["h"] - 420)})
    ui.pick_combo(5, "adapter_name", a_file)
    card = ui.wait_card(5, a_file)
    assert card["params"] == str(ui.panel(3)["run"]["summary"]["params"])
    ui.view(box["x"] - 90, box["y"] + box["h"] - 900, 1.0)
    ui.screenshot("browser_training")

    # A reload after the end shows the finished runs again (from /tlora/runs, no events).
    ui.reload()
    ui.wait_runs_final(list(steps), timeout=60)
    for nid, n in steps.items():
        panel = ui.panel(nid)
        assert [p["step"] for p in panel["points"]] == list(range(1, n + 1))
        assert panel["run"]["sources"] == {"event": 0, "route": n}
        assert panel["run"]["status"] == "done" and panel["summaryText"]
    ui.console.assert_clean()


def test_reload_during_training_keeps_every_step(ui: ComfyPage, comfy_server: Any) -> None:
    """Reload the page mid-run: the chart re-reads the missed steps and follows the rest live."""
    n = 24
    graph = base_graph()
    graph["3"] = {"class_type": "TLoRATrain", "inputs": train_inputs(n, unique("browser_reload"))}
    ui.load_api_graph(graph, "tlora_browser_reload.json", positions={"1": (20, 80), "2": (20, 300), "3": (420, 80)})
    ui.queue()
    ui.wait_js("() => (app.graph.getNodeById(3)?.tloraPanel?.points().length || 0) >= 2", timeout=300,
               what="two steps before the reload")
    ui.reload()
    ui.wait_runs_final([3], timeout=600)
    panel = ui.panel(3)
    run = panel["run"]
    assert [p["step"] for p in panel["points"]] == list(range(1, n + 1)), panel["points"]
    assert run["sources"]["route"] >= 2, run["sources"]  # the steps before the reload came from the route
    assert run["sources"]["event"] >= 1, (
        f"the run ended before the page was back ({run['sources']}): nothing followed live; raise n")
    assert registry_history(comfy_server, run["id"]) == [(p["step"], p["loss"]) for p in panel["points"]]
    assert run["status"] == "done" and panel["badge"] == "complete"
    box = ui.node_box(3)
    ui.view(box["x"] - 90, box["y"] + box["h"] - 900, 1.0)
    ui.screenshot("browser_reload")
    ui.console.assert_clean()


@pytest.mark.every_host  # the panel and the card on every tested host's own frontend
def test_adapter_card_shows_what_was_picked(ui: ComfyPage, comfy_server: Any) -> None:
    """Pick adapters in loader nodes with the mouse: the card shows the file's real parameter count."""
    import torch
    from safetensors.torch import save_file

    from tlora import ModuleAdapter
    from tlora import save_file as save_tlora

    gen = torch.Generator().manual_seed(0)
    shapes = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": ((320, 320), "trm:2", "tr:4"),
              "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": ((320, 768), "trm:2", "lora:8")}
    adapters = {k: ModuleAdapter.create(s, t, r, shapes="auto", generator=gen) for k, (s, t, r) in shapes.items()}
    tlora_name, lora_name = f"{unique('browser_card')}.safetensors", f"{unique('browser_lora')}.safetensors"
    path = comfy_server.loras_dir / tlora_name
    save_tlora(adapters, str(path), config={"transform": "trm:2", "residual": "tr:4", "targets": "attn"},
               metadata={"tlora.train.steps": "120", "tlora.train.total_steps": "120", "tlora.train.partial": "false",
                         "tlora.train.instance_prompt": "a photo of sks dog", "tlora.train.loss": "dco"})
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_up.weight": torch.zeros(320, 4), f"{key}.lora_down.weight": torch.zeros(4, 320),
               f"{key}.alpha": torch.tensor(4.0)}, str(comfy_server.loras_dir / lora_name),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4"})
    params = file_params(path)
    try:
        ui.reload()  # the dropdowns list the loras folder as it was when the page loaded
        ui.empty_workflow()  # the default workflow's nodes (0.33: a larger one) would cover ours
        loader = ui.add_node("TLoRALoader", (80, 120))
        blocks = ui.add_node("TLoRABlockWeights", (520, 120))
        ui.view(0, 0, 1.0)

        ui.pick_combo(loader, "adapter_name", tlora_name)
        card = ui.wait_card(loader, tlora_name)
        assert card["params"] == str(params) and card["paramsText"] == f"{params:,} parameters", card
        kb = Decimal(path.stat().st_size) / 1000  # JS toFixed rounds ties up, Python's format to even
        assert card["sizeText"] == f"2 modules · {kb.quantize(Decimal('0.1'), ROUND_HALF_UP)} kB", card
        for expected in ("trm:2", "tr:4", "lora:8", "120", "dco", "a photo of sks dog", "complete"):
            assert expected in card["text"].lower(), (expected, card["text"])  # badges are upper-cased by CSS
        # The card grows to fit a frame or two after it renders (fonts differ); on a busy machine
        # that takes more than settle()'s frames, so wait for the final layout.
        def fitted() -> dict | None:
            now = ui.card(loader)
            return now if now["overflow"] <= 0 else None

        card = wait_until(fitted, 10, "the card to fit on its node")
        assert card["visible"], "the card must be visible on its node"

        ui.pick_combo(blocks, "adapter_name", lora_name)
        other = ui.wait_card(blocks, lora_name)
        assert "not tlora" in other["text"].lower() and "networks.lora" in other["text"], other["text"]

        ui.pick_combo(loader, "adapter_name", lora_name)
        refused = ui.wait_card(loader, lora_name)
        assert "only reads TLoRA files" in refused["text"], refused["text"]
        ui.pick_combo(loader, "adapter_name", tlora_name)
        assert ui.wait_card(loader, tlora_name)["params"] == str(params)
        ui.screenshot("browser_adapter_card")
        ui.console.assert_clean()
    finally:
        path.unlink(missing_ok=True)
        (comfy_server.loras_dir / lora_name).unlink(missing_ok=True)


def test_sample_preview_on_the_panel(ui: ComfyPage, comfy_server: Any) -> None:
    """With sample_every, the newest training sample shows on the panel (live and after a reload) and is the
    node's progress-bar preview."""
    graph = base_graph()
    graph["3"] = {"class_type": "TLoRATrain", "inputs": train_inputs(2, unique("browser_sample"), sample_every=1)}
    ui.load_api_graph(graph, "tlora_browser_sample.json", positions={"1": (20, 80), "2": (20, 300), "3": (420, 80)})
    ui.record_events()
    # ComfyUI's own preview messages (what its progress bar shows on a node).
    ui.js("""() => { window.__tloraPreviews = [];
                     const api = comfyAPI.api.api;
                     api.addEventListener('b_preview_with_metadata', e => window.__tloraPreviews.push(
                         String(e.detail?.nodeId ?? e.detail?.displayNodeId)));
                     api.addEventListener('b_preview', () => window.__tloraPreviews.push('?')); }""")
    ui.queue()
    ui.wait_runs_final([3], timeout=600)
    panel = ui.panel(3)
    run = panel["run"]
    assert run["status"] == "done" and panel["badge"] == "complete", run
    samples = [e for e in ui.events() if str(e.get("node")) == "3" and e.get("sample")]
    assert [e["sample"]["step"] for e in samples] == [1, 2], samples
    assert run["sample"]["step"] == 2 and run["sample"]["filename"] == samples[-1]["sample"]["filename"]
    previews = ui.js("() => window.__tloraPreviews")
    assert len(previews) >= 2 and set(previews) <= {"3", "?"}, previews

    def shown() -> dict:
        ui.wait_js("() => { const img = app.graph.getNodeById(3).tloraPanel.sampleImg; "
                   "return img.complete && img.naturalWidth > 0; }", timeout=30, what="the sample image to load")
        return ui.js("""() => { const p = app.graph.getNodeById(3).tloraPanel;
                                return {src: p.sampleImg.src, text: p.sampleText.textContent,
                                        visible: !p.sampleBox.hidden && p.sampleImg.getClientRects().length > 0,
                                        width: p.sampleImg.naturalWidth}; }""")
    live = shown()
    assert live["visible"] and live["width"] == 64 and live["text"] == "sample at step 2", live
    assert samples[-1]["sample"]["filename"] in live["src"] and "/view?" in live["src"]
    box = ui.node_box(3)
    ui.view(box["x"] - 90, box["y"] + box["h"] - 900, 1.0)
    ui.screenshot("browser_sample")

    # After a reload the latest sample comes back from /tlora/runs (no events).
    ui.reload()
    ui.wait_runs_final([3], timeout=60)
    again = ui.panel(3)["run"]
    assert again["sources"] == {"event": 0, "route": 2} and again["sample"]["step"] == 2, again
    restored = shown()
    assert restored["visible"] and restored["text"] == "sample at step 2" and restored["src"] == live["src"]
    ui.console.assert_clean()


def test_failed_run_shows_why(ui: ComfyPage, comfy_server: Any) -> None:
    """A run that fails before its first step says so on the panel, with the reason, also after a reload."""
    graph = base_graph()
    inputs = train_inputs(3, unique("browser_fail"))
    inputs["transform"] = "bogus"  # a free-text input the editor passes as it is: refused when adapters are made
    graph["3"] = {"class_type": "TLoRATrain", "inputs": inputs}
    ui.load_api_graph(graph, "tlora_browser_fail.json", positions={"1": (20, 80), "2": (20, 300), "3": (420, 80)})
    ui.record_events()
    ui.queue()
    ui.wait_js("() => { const r = app.graph.getNodeById(3)?.tloraPanel?.run; "
               "return r?.status === 'failed' && r.syncedAt >= r.lastEventAt; }", timeout=300,
               what="the failed run on the panel, re-read from the route")
    ended = [e for e in ui.events() if str(e.get("node")) == "3" and e.get("status")]
    assert ended and ended[-1]["status"] == "failed" and ended[-1]["file"] is None, ended
    panel = ui.panel(3)
    text = panel["summaryText"] or ""
    assert "Failed" in text and "unknown transform kind 'bogus'" in text and "No file was saved." in text, text
    assert panel["badge"] == "failed"
    ui.reload()
    ui.wait_js("() => app.graph.getNodeById(3)?.tloraPanel?.run?.status === 'failed'", timeout=60,
               what="the failed run after a reload")
    again = ui.panel(3)
    assert again["run"]["id"] == ended[-1]["run_id"] and "unknown transform kind" in (again["summaryText"] or "")
    # ComfyUI itself reports the node's error as an execution error (a console error is expected there).
    ui.console.assert_clean()


def test_nodes_inside_a_subgraph(ui: ComfyPage, comfy_server: Any) -> None:
    """A training node and a loader inside a subgraph: the panel charts every step of the node's run (the server
    names it "<subgraph node>:<node>") and shows it again after a reload; the new file is offered in the loader
    inside the subgraph at once, and picking it there with the mouse fills the card."""
    n = 3
    graph = base_graph()
    graph["3"] = {"class_type": "TLoRATrain", "inputs": train_inputs(n, unique("browser_subgraph"))}
    graph["5"] = {"class_type": "TLoRALoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 1.0}}
    ui.load_api_graph(graph, "tlora_browser_subgraph.json",
                      positions={"1": (20, 80), "2": (20, 300), "3": (420, 80), "5": (420, 700)})
    outer = ui.js("""() => { const g = app.graph;
                             const {node} = g.convertToSubgraph(new Set([g.getNodeById(3), g.getNodeById(5)]));
                             return node.id; }""")
    inner = f"app.graph.getNodeById({outer})?.subgraph?.getNodeById"  # undefined until a reload restored it
    assert ui.js(f"() => Boolean({inner}(3)?.tloraPanel && {inner}(5)?.tloraCard)"), "panels on the inner nodes"
    ui.record_events()
    ui.queue()
    final = f"() => {{ const r = {inner}(3)?.tloraPanel?.run; return r?.status === 'done' && Boolean(r.summary); }}"
    ui.wait_js(final, timeout=600, what="the inner node's finished run")
    mine = [e for e in ui.events() if str(e.get("node")) == f"{outer}:3" and "status" not in e]
    assert [e["step"] for e in mine] == list(range(1, n + 1)), ui.events()
    points = ui.js(f"() => {inner}(3).tloraPanel.points().map(p => [p.step, p.loss])")
    assert [tuple(p) for p in points] == [(e["step"], e["loss"]) for e in mine]
    file = ui.js(f"() => {inner}(3).tloraPanel.run.summary.file")
    ui.wait_js(f"f => {inner}(5).widgets.find(w => w.name === 'adapter_name').options.values.includes(f)", file,
               timeout=30, what="the new file offered in the loader inside the subgraph")

    ui.reload()
    ui.wait_js(final, timeout=60, what="the inner node's run after a reload")
    restored = ui.js(f"() => {inner}(3).tloraPanel.run.sources")
    assert restored == {"event": 0, "route": n}, restored

    ui.js(f"() => {{ const o = app.graph.getNodeById({outer}); app.canvas.openSubgraph(o.subgraph, o); }}")
    ui.wait_js("() => app.canvas.graph !== app.graph", timeout=15, what="the subgraph open on the canvas")
    box = ui.node_box(5)
    ui.view(box["x"] - 40, box["y"] - 40, 1.0)
    ui.pick_combo(5, "adapter_name", file)
    card = ui.wait_card(5, file)
    assert card["params"] == str(file_params(comfy_server.loras_dir / file)), card
    ui.screenshot("browser_subgraph")
    ui.console.assert_clean()
