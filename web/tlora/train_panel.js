// The live panel on a Train TLoRA node: progress, loss chart, latest sample, final summary.
// Fed by `tlora.train` events; after a page reload it re-reads the run from /tlora/runs.

import { LossChart, COLORS } from "./chart.js";
import { formatBytes, formatCount, formatDuration, formatLoss, formatLr } from "./format.js";

const FINAL = new Set(["done", "cancelled", "diverged", "failed"]);
// Without events for this long while a run is "running", poll its route (another tab queued
// it, or the socket reconnected under a new client id).
const QUIET_MS = 5000;
const POLL_MS = 2500;

/** Tiny DOM builder: el("div", {class: "x"}, [children]). */
export function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of [].concat(children)) if (c) node.append(c);
  return node;
}

/** A chart point from a step event or a history entry: step, loss, rate, and the held-out loss if it has one. */
function point(data) {
  const p = { step: data.step, loss: data.loss, lr: data.lr };
  if (Number.isFinite(data.val_loss)) p.val_loss = data.val_loss;
  return p;
}

function stat(label) {
  const value = el("span", { text: "–" });
  return { box: el("div", { class: "tlora-stat" }, [el("span", { text: label }), value]), value };
}

export class TrainPanel {
  /**
   * node: the LiteGraph node; deps: {fetchJson(path) -> Promise<json|null>, viewUrl(ref) -> url,
   * relayout() -> void (grow the node when sections appear), storageKey -> string,
   * ownsRun(run record) -> bool (the run's node id names this node, subgraphs included)}.
   */
  constructor(node, deps) {
    this.node = node;
    this.deps = deps;
    this.run = null;
    this.logScale = Boolean(node.properties?.tlora_log_scale);
    this._frame = 0;
    this._poll = 0;
    this._backfilling = null;
    this._build();
    this.render();
  }

  _build() {
    this.badge = el("span", { class: "tlora-badge", "data-kind": "idle", text: "idle" });
    this.stepText = el("span", { class: "tlora-title tlora-grow", "data-role": "step", text: "Train TLoRA" });
    this.progress = el("div");
    this.stats = { loss: stat("loss"), lr: stat("lr"), time: stat("step time"), eta: stat("eta") };
    this.canvas = el("canvas", { "data-role": "chart" });
    this.chart = new LossChart(this.canvas);
    this.chart.logScale = this.logScale;
    this.toggle = el("button", { class: "tlora-toggle", type: "button", "data-role": "log-toggle",
                                 "aria-pressed": String(this.logScale), title: "Logarithmic loss axis",
                                 text: "log scale" });
    this.toggle.addEventListener("click", (e) => {
      e.stopPropagation();
      this.setLogScale(!this.logScale);
    });
    // Keep the canvas from starting a node drag when the button is pressed.
    this.toggle.addEventListener("pointerdown", (e) => e.stopPropagation());
    const legend = el("div", { class: "tlora-legend" }, [
      el("span", {}, [el("i", { style: `background:${COLORS.raw}` }), "loss per step"]),
      el("span", {}, [el("i", { style: `background:${COLORS.smooth}` }), "smoothed"]),
      (this.valLegend = el("span", { hidden: true }, [el("i", { style: `background:${COLORS.val}` }), "held-out"])),
      this.toggle,
    ]);
    this.sampleImg = el("img", { alt: "latest training sample", "data-role": "sample" });
    this.sampleText = el("span", { class: "tlora-dim" });
    this.sampleBox = el("div", { class: "tlora-sample tlora-hideable", hidden: true }, [this.sampleImg, this.sampleText]);
    this.summary = el("div", { class: "tlora-summary tlora-hideable", "data-role": "summary", hidden: true });
    this.hint = el("div", { class: "tlora-hint tlora-hideable", text: "Queue the graph: the loss appears here step by step." });
    this.element = el("div", { class: "tlora-panel", "data-tlora": "train" }, [
      el("div", { class: "tlora-row" }, [this.stepText, this.badge]),
      el("div", { class: "tlora-progress" }, [this.progress]),
      el("div", { class: "tlora-stats" }, Object.values(this.stats).map((s) => s.box)),
      el("div", { class: "tlora-chart-box" }, [this.canvas]),
      legend,
      this.hint,
      this.sampleBox,
      this.summary,
    ]);
    // The canvas follows the node's size: redraw when the widget is laid out anew.
    if (typeof ResizeObserver !== "undefined") {
      this._resize = new ResizeObserver(() => this.requestDraw());
      this._resize.observe(this.canvas);
    }
  }

  /** Height the DOM widget needs for what is currently shown. */
  minHeight() {
    let h = 212;
    if (!this.hint.hidden) h += 20;
    if (!this.sampleBox.hidden) h += 104;
    if (!this.summary.hidden) h += 22 + 17 * this.summary.childElementCount;
    return h;
  }

  setLogScale(on) {
    this.logScale = on;
    this.chart.logScale = on;
    this.toggle.setAttribute("aria-pressed", String(on));
    if (this.node.properties) this.node.properties.tlora_log_scale = on;
    this.requestDraw();
  }

  // ----- data in ------------------------------------------------------------------------------
  _ensureRun(runId, steps, startStep) {
    if (this.run && this.run.id === runId) return false;
    this.run = { id: runId, steps: steps || 0, startStep: startStep || 0, status: "running", points: new Map(),
                 latest: {}, sample: null, summary: null, message: "", lastEventAt: 0, syncedAt: 0,
                 sources: { event: 0, route: 0 } };
    try {
      sessionStorage.setItem(this.deps.storageKey, runId);
    } catch {
      // Storage can be full or disabled; only reload-recovery of finished runs needs it.
    }
    return true;
  }

  /** One `tlora.train` event addressed to this node. */
  handleEvent(data) {
    if (!data || typeof data.run_id !== "string") return;
    const fresh = this._ensureRun(data.run_id, data.steps, 0);
    const run = this.run;
    run.lastEventAt = Date.now();
    if (Number.isFinite(data.steps)) run.steps = data.steps;
    if (data.status) {
      run.status = data.status;
      run.message = data.message || "";
      if (Number.isFinite(data.step)) run.latest.step = data.step;
      run.summary = { ...(run.summary || {}), file: data.file ?? run.summary?.file, final_loss: data.loss };
      if (typeof data.partial === "boolean") run.summary.partial = data.partial;
      if (Number.isFinite(data.steps_done)) run.summary.steps_done = data.steps_done;
      this.render();
      this.refresh(); // the route adds parameter count, size and the partial flag
      return;
    }
    if (!Number.isFinite(data.step)) return;
    if (!run.points.has(data.step)) run.sources.event += 1;
    run.points.set(data.step, point(data));
    run.latest = { ...run.latest, ...data };
    if (data.sample) run.sample = { ...data.sample, step: data.step };
    // Joined mid-run (page reloaded, or a missed message): fetch the steps we did not see.
    const expected = data.step - run.startStep;
    if ((fresh && data.step > 1) || run.points.size < expected) this.backfill();
    this.render();
  }

  /** Merge a /tlora/runs/<id> record (history, latest state, status, summary). */
  applyRecord(rec) {
    if (!rec || typeof rec.run_id !== "string") return;
    this._ensureRun(rec.run_id, rec.steps, rec.start_step);
    const run = this.run;
    run.syncedAt = Date.now();
    if (Number.isFinite(rec.steps)) run.steps = rec.steps;
    if (Number.isFinite(rec.start_step)) run.startStep = rec.start_step;
    for (const h of rec.history || []) {
      if (!Number.isFinite(h.step)) continue;
      const seen = run.points.get(h.step);
      if (seen) {
        // The held-out loss is recorded after its step: a point that came live may learn it here.
        if (Number.isFinite(h.val_loss) && !Number.isFinite(seen.val_loss)) seen.val_loss = h.val_loss;
        continue;
      }
      run.points.set(h.step, point(h));
      run.sources.route += 1;
    }
    const state = rec.state || {};
    if (Number.isFinite(state.step) && !(run.latest.step > state.step)) run.latest = { ...run.latest, ...state };
    if (state.sample && !(run.sample && run.sample.step >= (state.sample.step ?? state.step ?? 0))) {
      run.sample = { ...state.sample, step: state.sample.step ?? state.step };
    }
    // An event may already have said how the run ended; the route only adds detail.
    if (rec.status && (!FINAL.has(run.status) || FINAL.has(rec.status))) run.status = rec.status;
    if (rec.summary && Object.keys(rec.summary).length) run.summary = { ...(run.summary || {}), ...rec.summary };
    // Why a run stopped (diverged, failed) is in the registry too: a reloaded page shows it again.
    if (typeof rec.summary?.message === "string" && rec.summary.message && !run.message) {
      run.message = rec.summary.message.split("\n")[0].slice(0, 240);
    }
    if (rec.file && !run.file) run.file = rec.file;
    this.render();
  }

  /** Re-read this run from the server (after a reload, at the end, or while events are missing). */
  async refresh() {
    if (!this.run) return;
    const id = this.run.id;
    const rec = await this.deps.fetchJson(`/tlora/runs/${encodeURIComponent(id)}`);
    if (rec && this.run && this.run.id === id) this.applyRecord(rec);
  }

  backfill() {
    if (!this._backfilling) {
      this._backfilling = this.refresh().finally(() => {
        this._backfilling = null;
      });
    }
    return this._backfilling;
  }

  /** After a reload: show the run this node had in this tab, if the server still knows it. */
  async restore(runs) {
    let runId = null;
    try {
      runId = sessionStorage.getItem(this.deps.storageKey);
    } catch {
      runId = null;
    }
    const list = runs || [];
    // A registry that records node ids lets any tab find the run of this node (node ids repeat
    // across workflows: only a run that fits this node's settings counts).
    const owns = this.deps.ownsRun ?? ((r) => String(r.node) === String(this.node.id));
    const mine = list.filter((r) => r.node !== undefined && r.node !== null && owns(r) && this.fits(r));
    const pick = list.find((r) => r.run_id === runId && this.fits(r)) || mine[mine.length - 1];
    if (!pick || (this.run && this.run.id !== pick.run_id && this.run.lastEventAt)) return;
    this._ensureRun(pick.run_id, pick.steps, pick.start_step);
    await this.refresh();
    this.watch();
  }

  /**
   * Could this node have made that run? Node ids repeat across workflow tabs, so a run id stored
   * for "node 3" is only trusted when the run's length and file name fit this node's settings.
   */
  fits(rec) {
    const value = (name) => this.node.widgets?.find((w) => w.name === name)?.value;
    const steps = value("steps");
    const stem = String(value("output_name") ?? "").trim().replace(/\.safetensors$/i, "");
    if (Number.isFinite(steps) && Number.isFinite(rec.steps) && steps !== rec.steps) return false;
    if (stem && typeof rec.file === "string" && !rec.file.startsWith(stem)) return false;
    return true;
  }

  /** The node starts executing: remember which runs exist, to find its run if it dies before any event. */
  noteStart() {
    this._startedAt = Date.now();
    this._before = this.deps.fetchJson("/tlora/runs").then((l) => new Set((l?.runs || []).map((r) => r.run_id)));
  }

  /** The node's execution failed or was interrupted: show how its run ended (if no event of the trainer said so). */
  async noteEnd(message) {
    const before = this._before ? await this._before : null;
    this._before = null;
    const run = this.run;
    if (run && FINAL.has(run.status) && run.lastEventAt >= (this._startedAt || 0)) {
      // The trainer already said how this execution's run ended (and the route was asked then).
      if (message && !run.message) run.message = String(message).split("\n")[0].slice(0, 240);
      this.render();
      return;
    }
    if (!(this.run && this.run.status === "running") && before) {
      // No event of this execution arrived: the run it started (if any) is the one that is new.
      const list = await this.deps.fetchJson("/tlora/runs");
      const fresh = (list?.runs || []).filter((r) => !before.has(r.run_id));
      const pick = fresh[fresh.length - 1];
      if (!pick) return;
      this._ensureRun(pick.run_id, pick.steps, pick.start_step);
    }
    if (!this.run) return;
    if (message && !this.run.message) this.run.message = String(message).split("\n")[0].slice(0, 240);
    await this.refresh();
  }

  /** Poll the route while a run is running but no events come in. */
  watch() {
    clearInterval(this._poll);
    this._poll = setInterval(() => {
      const run = this.run;
      if (!run || FINAL.has(run.status) || !this.node.graph) {
        clearInterval(this._poll);
        this._poll = 0;
        return;
      }
      if (Date.now() - run.lastEventAt > QUIET_MS) this.refresh();
    }, POLL_MS);
  }

  dispose() {
    clearInterval(this._poll);
    this._resize?.disconnect();
    cancelAnimationFrame(this._frame);
  }

  // ----- state for tests and tools ---------------------------------------------------------------
  /** [{step, loss}] sorted by step: exactly what the chart is drawn from. */
  points() {
    return this.run ? [...this.run.points.values()].sort((a, b) => a.step - b.step) : [];
  }

  // ----- rendering ------------------------------------------------------------------------------
  requestDraw() {
    if (this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = 0;
      const run = this.run;
      this.chart.setData(this.points(), run?.steps, run?.startStep);
      this.chart.draw();
      this.valLegend.hidden = !this.chart.drawn.val; // only for runs that hold images out
    });
  }

  render() {
    const run = this.run;
    const wasHint = !this.hint.hidden;
    const wasSample = !this.sampleBox.hidden;
    const wasSummary = this.summary.childElementCount;
    if (!run) {
      this.hint.hidden = false;
      this.requestDraw();
      return;
    }
    this.hint.hidden = true;
    const pts = this.points();
    const last = pts[pts.length - 1];
    const step = run.latest.step ?? last?.step ?? run.startStep;
    const total = run.steps || step;
    this.stepText.textContent = `Step ${formatCount(step)} / ${formatCount(total)}`;
    this.progress.style.width = `${total ? Math.min(100, (100 * step) / total) : 0}%`;
    this.element.dataset.step = String(step);
    this.element.dataset.steps = String(total);
    this.element.dataset.runId = run.id;
    this.element.dataset.status = run.status;

    const badge = run.status === "done" ? (run.summary?.partial ? "partial" : "complete")
      : run.status === "running" ? "running" : run.status;
    this.badge.dataset.kind = badge;
    this.badge.textContent = badge === "running" ? "training" : badge;

    const loss = last?.loss ?? run.latest.loss;
    this.stats.loss.value.textContent = formatLoss(loss);
    this.stats.lr.value.textContent = formatLr(run.latest.lr ?? last?.lr);
    this.stats.time.value.textContent = formatDuration(run.latest.step_time);
    this.stats.eta.value.textContent = run.status === "running" ? formatDuration(run.latest.eta) : "–";

    if (run.sample && run.sample.filename) {
      const url = this.deps.viewUrl(run.sample);
      if (this.sampleImg.dataset.src !== url) {
        this.sampleImg.dataset.src = url;
        this.sampleImg.src = url;
      }
      this.sampleText.textContent = `sample at step ${formatCount(run.sample.step)}`;
      this.sampleBox.hidden = false;
    } else {
      this.sampleBox.hidden = true;
    }
    this._renderSummary(run);
    if (wasHint !== !this.hint.hidden || wasSample !== !this.sampleBox.hidden
        || wasSummary !== this.summary.childElementCount) this.deps.relayout();
    this.requestDraw();
  }

  _renderSummary(run) {
    const s = run.summary;
    if (!FINAL.has(run.status) || !s) {
      this.summary.hidden = true;
      this.summary.replaceChildren();
      return;
    }
    const rows = [];
    const done = run.latest.step ?? s.steps_done;
    const partial = run.status !== "done" || s.partial === true;
    const head = run.status === "done"
      ? (partial ? "Saved (partial)" : "Saved")
      : run.status === "cancelled" ? "Cancelled" : run.status === "diverged" ? "Stopped: loss diverged" : "Failed";
    rows.push(el("div", { class: "tlora-row" }, [
      el("span", { class: "tlora-title tlora-grow", text: head }),
      el("span", { class: "tlora-dim", text: `${formatCount(s.steps_done ?? done)} / ${formatCount(run.steps)} steps` }),
    ]));
    if (s.file) {
      rows.push(el("div", { class: "tlora-file", "data-role": "file", text: s.file }));
      const parts = [];
      if (Number.isFinite(s.params)) parts.push(`${formatCount(s.params)} parameters`);
      if (Number.isFinite(s.file_bytes)) parts.push(formatBytes(s.file_bytes));
      parts.push(partial ? "partial" : "complete");
      if (Number.isFinite(s.final_loss)) parts.push(`final loss ${formatLoss(s.final_loss)}`);
      rows.push(el("div", { "data-role": "summary-line", text: parts.join(" · ") }));
      if (partial) rows.push(el("div", { class: "tlora-hint", text: "Pick this file in `resume` to continue the run." }));
    } else if (run.status !== "done") {
      rows.push(el("div", { class: "tlora-hint", text: "No file was saved." }));
    }
    if (run.message) rows.push(el("div", { class: "tlora-msg", text: run.message }));
    this.summary.replaceChildren(...rows);
    this.summary.hidden = false;
  }
}
