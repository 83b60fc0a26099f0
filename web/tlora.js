// ComfyUI-TLoRA frontend extension (loaded by ComfyUI's frontend from WEB_DIRECTORY).
// Train TLoRA nodes get a live training panel; loader nodes get a card describing the picked adapter.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { AdapterCard } from "./tlora/adapter_card.js";
import { injectStyles } from "./tlora/style.js";
import { TrainPanel } from "./tlora/train_panel.js";

const EVENT = "tlora.train";
const TRAIN_NODES = new Set(["TLoRATrain"]);
// Loader node -> whether it reads only TLoRA files (the block-weight loader takes any adapter).
const LOADER_NODES = { TLoRALoader: true, TLoRALoaderModelOnly: true, TLoRAInfo: true, TLoRABlockWeights: false };
const TRAIN_MIN_WIDTH = 380;
const CARD_MIN_WIDTH = 320;

/** GET a /tlora route as JSON; null on any failure (or {error} when the caller wants the reason). */
async function fetchJson(path, keepError = false) {
  try {
    const res = await api.fetchApi(path, { cache: "no-store" });
    if (res.ok) return await res.json();
    if (!keepError) return null;
    const body = await res.json().catch(() => null);
    return { error: body?.error ? `Server: ${body.error}` : `Server answered ${res.status}` };
  } catch {
    return keepError ? { error: "Server not reachable" } : null;
  }
}

function viewUrl(ref) {
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "temp" });
  return api.apiURL(`/view?${q}`);
}

function typeOf(node) {
  return node?.comfyClass ?? node?.type;
}

/** The workflow's root graph, or null before there is one (newer frontends log an error on an early read). */
function rootGraph() {
  if (app.isGraphReady === false) return null;
  return app.rootGraph ?? app.graph ?? null;
}

function graphNodes(graph) {
  return graph?._nodes ?? graph?.nodes ?? [];
}

/** Every node of the workflow, those inside subgraphs included (each subgraph's nodes once). */
function allNodes() {
  const root = rootGraph();
  const out = [];
  const seen = new Set();
  const walk = (graph) => {
    if (!graph || seen.has(graph)) return;
    seen.add(graph);
    for (const node of graphNodes(graph)) {
      out.push(node);
      if (node.subgraph) walk(node.subgraph);
    }
  };
  walk(root);
  for (const sub of root?.subgraphs?.values?.() ?? []) walk(sub); // definitions not placed (yet)
  return out;
}

/** The id the server runs a node under: "5" on the root graph, "12:5" inside subgraph node 12. */
function executionId(node) {
  const root = rootGraph();
  if (!node?.graph || node.graph === root) return String(node?.id);
  const owner = allNodes().find((n) => n.subgraph === node.graph);
  return owner ? `${executionId(owner)}:${node.id}` : String(node.id);
}

/** An executing/progress event's node id: a bare id in older frontends, {node, display_node, ...} in newer. */
function eventNodeId(detail) {
  if (detail && typeof detail === "object") return detail.node ?? detail.display_node ?? detail.node_id ?? null;
  return detail;
}

/** The node an event names: "5" on the root graph, "12:5" for node 5 inside subgraph node 12. */
function findNode(id) {
  if (id === undefined || id === null) return null;
  let graph = rootGraph();
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById?.(part) ?? graph?.getNodeById?.(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

/** Fit the node to its panel: grow when needed; shrink only back from a height we set ourselves. */
function relayout(node) {
  requestAnimationFrame(() => {
    if (!node.graph) return;
    const need = node.computeSize();
    const ours = node.tloraHeight !== undefined && Math.abs(node.size[1] - node.tloraHeight) < 1;
    const height = ours ? need[1] : Math.max(node.size[1], need[1]);
    if (height !== node.size[1] || node.size[0] < need[0]) {
      node.setSize([Math.max(node.size[0], need[0]), height]);
      node.tloraHeight = height;
    }
    node.setDirtyCanvas?.(true, true);
  });
}

function addPanel(node, name, content, minWidth) {
  const widget = node.addDOMWidget(name, "tlora-panel", content.element, {
    serialize: false, // not an input: stays out of the prompt and of widgets_values
    hideOnZoom: false,
    getMinHeight: () => content.minHeight(),
    getValue: () => undefined,
    setValue: () => {},
  });
  widget.serialize = false;
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    content.dispose?.();
    return onRemoved?.apply(this, args);
  };
  // Auto-sizing (new nodes, "arrange") would pick the width of the widest input row: too
  // narrow for the chart's axis labels and four stats side by side.
  const computeSize = node.computeSize;
  node.computeSize = function (...args) {
    const size = computeSize.apply(this, args);
    size[0] = Math.max(size[0], minWidth);
    return size;
  };
  relayout(node);
  return widget;
}

function setupTrainNode(node) {
  if (node.tloraPanel) return;
  const deps = {
    fetchJson,
    viewUrl,
    relayout: () => relayout(node),
    get storageKey() {
      return `tlora.run.${executionId(node)}`; // read lazily: a loaded node gets its id after creation
    },
    ownsRun: (run) => findNode(run?.node) === node, // the registry records the server's (execution) id
  };
  node.tloraPanel = new TrainPanel(node, deps);
  addPanel(node, "tlora_training", node.tloraPanel, TRAIN_MIN_WIDTH);
}

function setupLoaderNode(node, tloraOnly) {
  if (node.tloraCard) return;
  const widget = node.widgets?.find((w) => w.name === "adapter_name");
  const card = new AdapterCard(node, { fetchJson, relayout: () => relayout(node) }, tloraOnly);
  node.tloraCard = card;
  addPanel(node, "tlora_card", card, CARD_MIN_WIDTH);
  const current = () => (widget ? widget.value : null);
  if (widget) {
    const callback = widget.callback;
    widget.callback = function (...args) {
      const out = callback?.apply(this, args);
      card.update(current());
      return out;
    };
  }
  // Values loaded from a workflow arrive through configure, without the widget callback.
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const out = onConfigure?.apply(this, args);
    queueMicrotask(() => card.update(current()));
    return out;
  };
  // Programmatic changes (other extensions, combo refreshes) show up at the next frame.
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    card.update(current());
    return onDrawForeground?.apply(this, args);
  };
  // The modern node design (DOM nodes) draws no node foreground and its dropdowns set the
  // value without the widget callback: a light watch keeps the card in step (update() is a
  // no-op while the name is unchanged).
  node.tloraWatch = () => card.update(current());
  queueMicrotask(() => card.update(current()));
}

setInterval(() => {
  for (const node of allNodes()) node.tloraWatch?.();
}, 250);

// The loras list as of the last run that saved a file (null until then): nodes created later
// (a workflow opened after the run) offer it too, not the list the page loaded with.
let adapterNames = null;

/** A new adapter file exists after a run: offer it in the dropdowns without a full refresh. */
async function refreshAdapterLists() {
  const names = await fetchJson("/models/loras");
  if (!Array.isArray(names)) return;
  adapterNames = names;
  offerAdapterNames(names);
}

/** New combo options, in place: the modern node design's dropdown watches the array it was given. */
function setOptions(widget, values) {
  if (Array.isArray(widget.options.values)) widget.options.values.splice(0, widget.options.values.length, ...values);
  else widget.options.values = values;
}

function offerAdapterNames(names) {
  for (const node of allNodes()) {
    const kind = typeOf(node);
    for (const w of node.widgets ?? []) {
      if (w.name === "adapter_name" && kind in LOADER_NODES && w.options) setOptions(w, [...names]);
      if (w.name === "resume" && TRAIN_NODES.has(kind) && w.options && Array.isArray(w.options.values)) {
        const none = w.options.values[0];
        setOptions(w, [none, ...names.filter((n) => n.toLowerCase().endsWith(".safetensors"))]);
      }
    }
    if (node.tloraCard) node.tloraCard.invalidate();
  }
}

async function restoreRuns() {
  const nodes = allNodes().filter((n) => n.tloraPanel);
  if (!nodes.length) return;
  const list = await fetchJson("/tlora/runs");
  const runs = Array.isArray(list?.runs) ? list.runs : [];
  await Promise.all(nodes.map((n) => n.tloraPanel.restore(runs)));
}

function onTrainEvent(event) {
  const data = event.detail;
  const node = findNode(data?.node);
  if (node?.tloraPanel) node.tloraPanel.handleEvent(data);
  if (data?.status && data.file) refreshAdapterLists();
}

function onExecuting(event) {
  findNode(eventNodeId(event.detail))?.tloraPanel?.noteStart();
}

function onExecutionEnd(event) {
  // A crash sends no `tlora.train` status: read how the run ended from the registry.
  const panel = findNode(event.detail?.node_id ?? event.detail?.node)?.tloraPanel;
  if (panel) setTimeout(() => panel.noteEnd(event.detail?.exception_message), 300);
}

const EXTENSION = {
  name: "comfyui.tlora",

  async setup() {
    injectStyles();
    api.addEventListener("executing", onExecuting);
    api.addEventListener("execution_error", onExecutionEnd);
    api.addEventListener("execution_interrupted", onExecutionEnd);
    await restoreRuns();
  },

  async nodeCreated(node) {
    const kind = typeOf(node);
    if (TRAIN_NODES.has(kind) || kind in LOADER_NODES) injectStyles(); // a workflow may load before setup()
    if (TRAIN_NODES.has(kind)) setupTrainNode(node);
    else if (kind in LOADER_NODES) setupLoaderNode(node, LOADER_NODES[kind]);
  },

  async afterConfigureGraph() {
    if (adapterNames) offerAdapterNames(adapterNames);
    await restoreRuns();
  },
};

// ComfyUI serves this folder twice when the pack's folder name differs from its pyproject name
// (WEB_DIRECTORY and [tool.comfy] web both register it): only the first copy may register.
const LOADED = Symbol.for("comfyui.tlora.loaded");
if (!globalThis[LOADED]) {
  globalThis[LOADED] = true;
  // Listen as soon as the script loads, not in setup(): a reload during a run gets the run's events
  // from the socket before setup() (frontend 1.58 logs events nobody listens for as unknown). Events
  // before the graph exists find no node and are ignored; the panel re-reads the run from the route.
  api.addEventListener(EVENT, onTrainEvent);
  app.registerExtension(EXTENSION);
}
