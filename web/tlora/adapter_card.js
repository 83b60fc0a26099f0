// The card on loader nodes: what the adapter picked in `adapter_name` is (from /tlora/adapter).

import { el } from "./train_panel.js";
import { describeKind, formatBytes, formatCount, formatLoss, formatLr } from "./format.js";

const CACHE_MS = 5000;
// Layout heights in px (see style.js: 12px text at 1.35 line height, 4px gaps, 6px padding).
const PAD = 14;
const GAP = 4;
const LINE = 17;
const HEAD = 18;
const BIG = 21;
const KV_ROW = 17;

/** "trm:2" x 32 from a file's config (kind -> module count), or parsed from "trm:2 + tr:6" pairs. */
function kindCounts(info, part) {
  const fromConfig = info.config?.[`${part}_kinds`];
  if (fromConfig && typeof fromConfig === "object") return fromConfig;
  const out = {};
  for (const [pair, n] of Object.entries(info.kinds || {})) {
    const [t, r] = pair.split(" + ");
    const k = part === "transform" ? t : r;
    if (k) out[k] = (out[k] || 0) + n;
  }
  return out;
}

function kindText(counts) {
  const entries = Object.entries(counts);
  if (!entries.length) return "–";
  if (entries.length === 1) return `${entries[0][0]} · ${describeKind(entries[0][0])}`;
  return entries.map(([k, n]) => `${k} ×${n}`).join(", ");
}

/** "stable-diffusion-v1/tlora" -> "stable-diffusion-v1" (the card already says TLoRA). */
function baseLabel(arch) {
  const base = String(arch || "").replace(/\/tlora$/, "");
  return !base || base.startsWith("unknown") ? "unknown base" : base;
}

/** ISO time from the file -> "2026-11-29 05:47 UTC" (short enough for one line). */
function formatTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : `${d.toISOString().slice(0, 16).replace("T", " ")} UTC`;
}

function kindTitle(counts) {
  return Object.entries(counts).map(([k, n]) => `${k}: ${describeKind(k)} (${n} modules)`).join("\n");
}

export class AdapterCard {
  /** deps: {fetchJson(path) -> Promise<json|null>, relayout()}; `tloraOnly`: the node refuses other files. */
  constructor(node, deps, tloraOnly) {
    this.node = node;
    this.deps = deps;
    this.tloraOnly = tloraOnly;
    this.name = null;
    this.info = null;
    this.height = PAD + LINE;
    this._cache = new Map();
    this.element = el("div", { class: "tlora-card", "data-tlora": "card" });
    this._message("Pick an adapter to see what it is.");
  }

  minHeight() {
    return this.height;
  }

  /** Called whenever the combo's value may have changed (cheap when it did not). */
  update(name) {
    if (name === this.name) return;
    this.name = name;
    if (!name || typeof name !== "string") {
      this.info = null;
      this._message("No adapter in the loras folder yet.");
      return;
    }
    this.element.dataset.loading = "true";
    this._load(name).then((info) => {
      if (name !== this.name) return; // the user picked another one meanwhile
      delete this.element.dataset.loading;
      this.info = info;
      if (!info) this._message("Could not read this adapter.", true);
      else if (info.error) this._message(info.error, true);
      else this._render(info);
    });
  }

  /** Forget cached answers (after a training run rewrote a file). */
  invalidate() {
    this._cache.clear();
    const name = this.name;
    this.name = null;
    this.update(name);
  }

  _load(name) {
    const hit = this._cache.get(name);
    if (hit && Date.now() - hit.at < CACHE_MS) return hit.promise;
    const promise = this.deps.fetchJson(`/tlora/adapter?name=${encodeURIComponent(name)}`, true);
    this._cache.set(name, { at: Date.now(), promise });
    return promise;
  }

  _message(text, isError = false) {
    this.element.dataset.state = isError ? "error" : "empty";
    this.element.replaceChildren(el("div", { class: isError ? "tlora-msg" : "tlora-hint", text }));
    this._setHeight(2 * LINE);
  }

  _setHeight(content) {
    const h = Math.ceil(PAD + content);
    if (h !== this.height) {
      this.height = h;
      this.deps.relayout();
    }
    // Fonts differ between systems: once laid out, grow by whatever still overflows.
    requestAnimationFrame(() => requestAnimationFrame(() => {
      const over = this.element.scrollHeight - this.element.clientHeight;
      if (this.element.clientHeight > 0 && over > 0) {
        this.height += over;
        this.deps.relayout();
      }
    }));
  }

  _render(info) {
    this.element.dataset.state = "ready";
    this.element.dataset.name = info.name;
    if (!info.tlora) {
      this._renderOther(info);
      return;
    }
    const t = info.training || {};
    const partial = info.partial === true;
    const head = el("div", { class: "tlora-row" }, [
      el("span", { class: "tlora-title tlora-grow", text: `TLoRA · ${baseLabel(info.architecture)}` }),
      t["tlora.train.steps"] !== undefined || partial
        ? el("span", { class: "tlora-badge", "data-kind": partial ? "partial" : "complete",
                       text: partial ? "partial" : "complete" })
        : null,
    ]);
    const params = el("div", { class: "tlora-big", "data-role": "params", "data-value": String(info.params),
                               text: `${formatCount(info.params)} parameters` });
    const size = el("div", { class: "tlora-dim", "data-role": "size",
                             text: `${formatCount(info.modules)} modules · ${formatBytes(info.file_bytes)}` });
    const kv = [];
    const add = (k, v, title) => {
      if (v === undefined || v === null || v === "") return;
      kv.push(el("span", { text: k }), el("span", { text: String(v), title: title || String(v) }));
    };
    const tk = kindCounts(info, "transform");
    const rk = kindCounts(info, "residual");
    add("transform", kindText(tk), kindTitle(tk));
    add("residual", kindText(rk), kindTitle(rk));
    add("targets", info.config?.targets ?? t["tlora.train.targets"]);
    if (t["tlora.train.steps"] !== undefined) {
      const total = t["tlora.train.total_steps"];
      add("steps", total && total !== t["tlora.train.steps"] ? `${t["tlora.train.steps"]} of ${total}` : t["tlora.train.steps"]);
      const loss = [t["tlora.train.loss"], t["tlora.train.final_loss"] && `final ${formatLoss(Number(t["tlora.train.final_loss"]))}`];
      add("loss", loss.filter(Boolean).join(" · "));
      const lr = t["tlora.train.lr"] && formatLr(Number(t["tlora.train.lr"]));
      add("learning rate", [lr, t["tlora.train.lr_schedule"]].filter(Boolean).join(" · "));
    }
    add("base model", t["tlora.train.base_model"]);
    add("prompt", t["tlora.train.instance_prompt"]);
    const data = [t["tlora.train.dataset_size"] && `${t["tlora.train.dataset_size"]} images`,
                  t["tlora.train.resolution"] && `${t["tlora.train.resolution"]} px`,
                  t["tlora.train.seed"] !== undefined && `seed ${t["tlora.train.seed"]}`].filter(Boolean);
    add("data", data.join(" · "));
    add("trained", formatTime(t["tlora.train.time"]));
    this.element.replaceChildren(head, params, size, el("div", { class: "tlora-kv" }, kv));
    this._setHeight(HEAD + BIG + LINE + 3 * GAP + KV_ROW * (kv.length / 2));
  }

  _renderOther(info) {
    const t = info.training || {};
    const module = t.ss_network_module || "";
    const kind = module.includes("lora") ? "LoRA" : module.includes("lycoris") ? "LyCORIS" : "Adapter";
    const kv = [];
    const add = (k, v) => {
      if (v === undefined || v === null || v === "") return;
      kv.push(el("span", { text: k }), el("span", { text: String(v), title: String(v) }));
    };
    add("network", module);
    add("dim / alpha", t.ss_network_dim && `${t.ss_network_dim} / ${t.ss_network_alpha ?? "?"}`);
    add("steps", t.ss_max_train_steps ?? t.ss_steps);
    const rows = [
      el("div", { class: "tlora-row" }, [
        el("span", { class: "tlora-title tlora-grow", text: `${kind} · ${baseLabel(info.architecture)}` }),
        el("span", { class: "tlora-badge", "data-kind": this.tloraOnly ? "error" : "idle", text: "not TLoRA" }),
      ]),
      el("div", { class: "tlora-dim", "data-role": "size",
                  text: `${formatBytes(info.file_bytes)}${info.tensors ? ` · ${formatCount(info.tensors)} tensors` : ""}` }),
    ];
    let height = HEAD + LINE + GAP;
    if (kv.length) {
      rows.push(el("div", { class: "tlora-kv" }, kv));
      height += GAP + KV_ROW * (kv.length / 2);
    }
    if (this.tloraOnly) {
      rows.push(el("div", { class: "tlora-msg",
                            text: "This loader only reads TLoRA files: use Load Adapter (block weights) or Load LoRA." }));
      height += GAP + 2 * LINE;
    }
    this.element.replaceChildren(...rows);
    this._setHeight(height);
  }
}
