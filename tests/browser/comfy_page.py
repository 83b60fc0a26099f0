"""Driving ComfyUI's real frontend (comfyui-frontend-package) in Debian's chromium through Playwright.

    page = ComfyPage(pw_page, server, console); page.open()
    page.load_api_graph({...}); page.queue(); page.wait_runs_final(["3"])

Everything is read back from the page itself (the nodes' panels, the DOM), never from the
server, except where a test compares the two on purpose.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"

# Flags that work on these machines (no GPU, no sandbox, nothing reaching out to the network).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}

# A fresh profile shows the "Nodes 2.0" banner over the canvas: dismissed as a user would, so
# screenshots show the graph. (The key is the frontend's own localStorage flag.)
# Frontend 1.49+ logs EARLY_GRAPH from its own settings store while the app starts (seen with a
# stack through its Vue computeds only). The same getter would log it for an extension reading
# app.rootGraph too early: such a call is re-logged with the caller's stack so it is never noise.
EARLY_GRAPH = "ComfyApp graph accessed before initialization"
INIT_SCRIPT = """
try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) {}
// A node of the graph the canvas shows (the root graph, or a subgraph the test opened).
window.__tloraNode = id => (window.app?.canvas?.graph ?? window.app?.graph)?.getNodeById(id);
(() => {
  const error = console.error;
  console.error = function (...args) {
    if (String(args[0]).startsWith('%s')) {
      const stack = new Error().stack || '';
      if (stack.includes('/extensions/')) return error.call(this, 'extension read the graph too early: ' + stack);
    }
    return error.apply(this, args);
  };
})();
""" % EARLY_GRAPH

OURS = re.compile(r"tlora", re.IGNORECASE)
EXTERNAL_FETCH = re.compile(r"^(?:(?:Refused to connect to|Connecting to) '([^']+)' violates the following Content "
                            r"Security Policy|Fetch API cannot load (\S+?)\.? Refused to connect because it violates "
                            r"the document's Content Security Policy)")
# comfyui-frontend-package 1.32.9 throws this at start-up on a fresh user directory with no
# custom nodes at all (seen with --disable-all-custom-nodes): its render-mode setting has no
# definition yet. Matched exactly so that any other TypeError still fails the tests.
FRONTEND_STARTUP_BUG = ("TypeError: Cannot read properties of undefined (reading 'id')", "at onChange (")
# PrimeVue's Select in frontend 1.37 (the modern node design's dropdown) throws this inside its
# own bundle when an option is picked from a long, virtually scrolled list (a loras folder with
# many files); the pick itself goes through. Matched with its origin so our code never hides here.
PRIMEVUE_SELECT_BUG = ("Cannot read properties of null (reading '$el')", "/assets/vendor-primevue-")


class ConsoleLog:
    """Console messages, page errors and failed requests of one page, with the noise rules in one place."""

    def __init__(self, page: Any, origin: str) -> None:
        """Start recording everything `page` reports."""
        self.origin = origin
        self.entries: list[dict] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.entries.append(
            {"kind": "pageerror", "text": f"{err}\n{getattr(err, 'stack', '') or ''}", "url": ""}))
        self.navigating = False  # set by ComfyPage.reload: the page's own requests are cut off then
        page.on("requestfailed", lambda req: self.entries.append(
            {"kind": "requestfailed", "text": f"{req.failure}", "url": req.url, "navigating": self.navigating}))
        page.on("response", self._response)

    def _console(self, msg: Any) -> None:
        loc = msg.location or {}
        self.entries.append({"kind": msg.type, "text": msg.text, "url": loc.get("url", "") or ""})

    def _response(self, resp: Any) -> None:
        if resp.status >= 400 and OURS.search(resp.url):
            self.entries.append({"kind": "http", "text": f"HTTP {resp.status}", "url": resp.url})

    def is_noise(self, e: dict) -> bool:
        """True for messages that come from the closed network or the frontend itself, never from us."""
        text, url = e["text"], e["url"]
        external = EXTERNAL_FETCH.match(text)
        target = external and (external.group(1) or external.group(2))
        if (url.startswith(("http://", "https://")) and not url.startswith(self.origin)) or \
                (target and not target.startswith(self.origin)):
            # The frontend asks api.comfy.org about node packs (our node names included) and
            # the page's CSP blocks it: there is no network here, and none of it is our code.
            return True
        if e.get("navigating") and e["kind"] == "requestfailed" and "ERR_ABORTED" in text:
            return True  # a reload aborts whatever the old page still had in flight (ours included)
        if OURS.search(text) or OURS.search(url):
            return False  # anything touching our extension, routes or files counts
        if e["kind"] == "requestfailed":
            return True  # the frontend's own aborted media/template/user-file requests
        if text.startswith("Failed to load resource"):
            return True  # 404s of optional per-user files (user.css, favicon, userdata listings)
        if text.startswith(FRONTEND_STARTUP_BUG[0]) and FRONTEND_STARTUP_BUG[1] in text and "/extensions/" not in text:
            return True
        if text == EARLY_GRAPH and "/extensions/" not in url:
            return True  # the frontend's own (an extension's early read is re-logged, see INIT_SCRIPT)
        if text.startswith(PRIMEVUE_SELECT_BUG[0]) and PRIMEVUE_SELECT_BUG[1] in text and "/extensions/" not in text:
            return True
        return False

    def problems(self) -> list[str]:
        """Errors that are not noise (console errors, uncaught exceptions, our failed requests)."""
        out = []
        for e in self.entries:
            if e["kind"] in ("error", "pageerror", "requestfailed", "http") and not self.is_noise(e):
                out.append(f"[{e['kind']}] {e['text'][:600]} ({e['url']})")
        return out

    def assert_clean(self) -> None:
        """Fail listing every non-noise error."""
        problems = self.problems()
        assert not problems, "JS console errors:\n" + "\n".join(problems)


class ComfyPage:
    """One browser tab on the ComfyUI server."""

    def __init__(self, page: Any, server: Any, console: ConsoleLog, node_design: str = "classic") -> None:
        """Wrap a Playwright page for `server`; node_design: "classic" (canvas) or "vue" (0.12's DOM nodes)."""
        self.page, self.server, self.console = page, server, console
        self.node_design = node_design

    # ----- page ------------------------------------------------------------------------------
    def open(self, timeout: float = 180.0) -> None:
        """Load the UI and wait until the graph and our extension are up."""
        self.page.goto(self.server.url, wait_until="domcontentloaded", timeout=timeout * 1000)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """The app has a graph, the socket is open and comfyui.tlora is registered."""
        self.page.wait_for_function(
            """() => window.app && app.graph && window.comfyAPI && comfyAPI.api.api.socket
                     && comfyAPI.api.api.socket.readyState === 1
                     && (app.extensions || []).some(e => e.name === 'comfyui.tlora')""",
            timeout=timeout * 1000, polling=250)

    def reload(self, timeout: float = 180.0) -> None:
        """Reload the tab (the workflow comes back from the browser's storage, as for a user)."""
        self.console.navigating = True
        try:
            self.page.reload(wait_until="domcontentloaded", timeout=timeout * 1000)
        finally:
            self.console.navigating = False
        self.wait_ready(timeout)

    def js(self, script: str, arg: Any = None) -> Any:
        """page.evaluate."""
        return self.page.evaluate(script, arg)

    def wait_js(self, predicate: str, arg: Any = None, timeout: float = 120.0, what: str = "") -> None:
        """Wait for a JS predicate, failing with `what` and the page's console problems."""
        try:
            self.page.wait_for_function(predicate, arg=arg, timeout=timeout * 1000, polling=250)
        except Exception as err:
            raise AssertionError(f"timed out waiting for {what or predicate}: {err}\n"
                                 f"console: {self.console.problems()}\n"
                                 f"server log:\n{self.server.log_tail(40)}") from None

    # ----- graph -----------------------------------------------------------------------------
    def load_api_graph(self, graph: dict, name: str = "tlora_test.json",
                       positions: Optional[dict[str, tuple[float, float]]] = None) -> None:
        """Build the graph in the editor from API format (what dropping an API JSON file does)."""
        self.js("([g, name]) => app.loadApiJson(g, name)", [graph, name])
        self.wait_js("ids => ids.every(id => app.graph.getNodeById(+id))", list(graph), 30, "graph nodes")
        if positions:
            self.move_nodes(positions)
        self.settle()

    def move_nodes(self, positions: dict) -> None:
        """Put nodes at graph positions {id: (x, y)}.

        Classic nodes read `node.pos` when drawn. The modern design keeps a layout of its own
        that `node.pos` does not reach: there the workflow is loaded again with the positions
        in it, as when a user opens a saved workflow (our panels then restore from /tlora/runs).
        """
        pos = {str(k): list(v) for k, v in positions.items()}
        if self.node_design != "vue":
            self.js("""pos => { for (const [id, xy] of Object.entries(pos)) app.graph.getNodeById(+id).pos = xy;
                                app.canvas.setDirty(true, true); }""", pos)
            self.settle()
            return
        had_runs = self.js("() => app.graph.nodes.filter(n => n.tloraPanel?.run).map(n => n.id)")
        self.js("""async pos => { const g = app.graph.serialize();
                                  for (const n of g.nodes) if (pos[String(n.id)]) n.pos = pos[String(n.id)];
                                  await app.loadGraphData(g, true, true, app.workflowManager?.activeWorkflow?.filename); }""",
                pos)
        self.wait_js("ids => ids.every(id => app.graph.getNodeById(id)?.tloraPanel?.run?.summary)", had_runs, 60,
                     "training panels restored after the layout change")
        self.settle()

    def empty_workflow(self) -> None:
        """Start from an empty graph, as File > New does (the page opens on the host's default workflow)."""
        self.js("""async () => { await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [],
                                                      groups: [], config: {}, extra: {}, version: 0.4}); }""")
        self.wait_js("() => (app.graph._nodes ?? app.graph.nodes).length === 0", timeout=30, what="an empty graph")
        self.settle()

    def add_node(self, class_type: str, pos: tuple[float, float]) -> int:
        """Create a node like the node search does; returns its id."""
        node_id = self.js("""([type, pos]) => { const n = LiteGraph.createNode(type); n.pos = pos;
                                                app.graph.add(n); app.canvas.setDirty(true, true); return n.id; }""",
                          [class_type, list(pos)])
        self.settle()
        if self.node_design == "vue":  # its layout store does not read n.pos: place the node as a saved one
            self.move_nodes({int(node_id): pos})
        return int(node_id)

    def settle(self, frames: int = 3) -> None:
        """Let the canvas draw a few frames (widget positions are computed while drawing)."""
        self.js("""n => new Promise(r => { const f = k => k ? requestAnimationFrame(() => f(k - 1)) : r(); f(n); })""",
                frames)

    def view(self, x: float, y: float, scale: float = 1.0) -> None:
        """Put graph point (x, y) at the canvas' top-left corner at `scale`."""
        self.js("""([x, y, s]) => { const ds = app.canvas.ds; ds.scale = s; ds.offset[0] = -x; ds.offset[1] = -y;
                                    app.canvas.setDirty(true, true); }""", [x, y, scale])
        self.settle()

    def node_box(self, node_id: int) -> dict:
        """Graph-space {x, y, w, h} of a node (title bar included)."""
        return self.js("""id => { const n = window.__tloraNode(id); const t = LiteGraph.NODE_TITLE_HEIGHT;
                                  return {x: n.pos[0], y: n.pos[1] - t, w: n.size[0], h: n.size[1] + t}; }""", node_id)

    def queue(self) -> None:
        """Press Run."""
        self.page.click('[data-testid="queue-button"]')

    def pick_combo(self, node_id: int, widget: str, value: str) -> None:
        """Choose `value` in a combo widget with the mouse: click the widget, click the menu entry."""
        if self.node_design == "vue":
            self._pick_combo_vue(node_id, widget, value)
            return
        self.settle()
        point = self.js("""([id, name]) => {
            const n = window.__tloraNode(id);
            const w = n.widgets.find(w => w.name === name);
            const rect = app.canvas.canvas.getBoundingClientRect();
            const h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT;
            const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + h / 2]);
            return {x: rect.left + cx, y: rect.top + cy, options: w.options.values};
        }""", [node_id, widget])
        assert value in point["options"], f"{value!r} is not offered in {widget}: {point['options']}"
        self.page.mouse.click(point["x"], point["y"])
        entry = self.page.locator(".litecontextmenu .litemenu-entry", has_text=value).first
        entry.wait_for(state="visible", timeout=15000)
        entry.click()
        self.wait_js("([id, name, v]) => window.__tloraNode(id).widgets.find(w => w.name === name).value === v",
                     [node_id, widget, value], 10, f"{widget} = {value}")

    def _pick_combo_vue(self, node_id: int, widget: str, value: str) -> None:
        """The modern node design: the widget is a DOM select on the node; its options open in a list."""
        self.settle()
        box = self.page.locator(f'[data-node-id="{node_id}"] [role="combobox"][aria-label="{widget}"]')
        box.wait_for(state="visible", timeout=15000)
        box.click()
        listbox = self.page.locator(f'#{box.get_attribute("aria-controls")}')
        listbox.wait_for(state="visible", timeout=15000)
        options = listbox.locator('[role="option"]')
        offered = options.all_inner_texts()
        assert value in [o.strip() for o in offered], f"{value!r} is not offered in {widget}: {offered[:8]}"
        options.filter(has_text=value).first.click()
        self.wait_js("([id, name, v]) => window.__tloraNode(id).widgets.find(w => w.name === name).value === v",
                     [node_id, widget, value], 10, f"{widget} = {value}")

    # ----- our panels -----------------------------------------------------------------------------
    def record_events(self) -> None:
        """Keep every `tlora.train` event this tab receives (to compare with what the chart shows)."""
        self.js("""() => { if (window.__tloraEvents) return; window.__tloraEvents = [];
                           comfyAPI.api.api.addEventListener('tlora.train', e => window.__tloraEvents.push(e.detail)); }""")

    def events(self) -> list[dict]:
        """The recorded `tlora.train` events."""
        return self.js("() => window.__tloraEvents || []")

    def panel(self, node_id: int) -> dict:
        """What a training node's panel holds and shows."""
        return self.js("""id => {
            const p = window.__tloraNode(id)?.tloraPanel;
            if (!p) return null;
            const r = p.run;
            return {points: p.points().map(x => ({step: x.step, loss: x.loss, val_loss: x.val_loss ?? null})),
                    drawn: p.chart.drawn, heldOutLegend: !p.valLegend.hidden,
                    run: r && {id: r.id, steps: r.steps, status: r.status, sources: r.sources,
                               summary: r.summary, sample: r.sample},
                    summaryText: p.summary.hidden ? null : p.summary.innerText,
                    stepText: p.stepText.textContent, badge: p.badge.textContent,
                    visible: p.element.isConnected && p.element.getClientRects().length > 0};
        }""", node_id)

    def wait_runs_final(self, node_ids: list[int], timeout: float = 600.0) -> None:
        """Until every panel shows a finished run with its saved file's parameter count."""
        self.wait_js("""ids => ids.every(id => { const r = window.__tloraNode(id)?.tloraPanel?.run;
                          return r && ['done', 'cancelled', 'diverged', 'failed'].includes(r.status)
                                 && r.summary && Number.isFinite(r.summary.params); })""",
                     node_ids, timeout, f"finished runs on nodes {node_ids}")

    def card(self, node_id: int) -> dict:
        """What a loader node's adapter card shows."""
        return self.js("""id => {
            const c = window.__tloraNode(id)?.tloraCard;
            if (!c) return null;
            const q = s => c.element.querySelector(s);
            return {state: c.element.dataset.state, name: c.element.dataset.name || null, text: c.element.innerText,
                    params: q('[data-role=params]')?.dataset.value ?? null,
                    paramsText: q('[data-role=params]')?.textContent ?? null,
                    sizeText: q('[data-role=size]')?.textContent ?? null,
                    overflow: c.element.scrollHeight - c.element.clientHeight,
                    visible: c.element.isConnected && c.element.getClientRects().length > 0};
        }""", node_id)

    def wait_card(self, node_id: int, name: str, timeout: float = 30.0) -> dict:
        """Until the card describes `name`."""
        self.wait_js("([id, name]) => { const c = window.__tloraNode(id)?.tloraCard;"
                     " return c && c.element.dataset.state === 'ready' && c.element.dataset.name === name; }",
                     [node_id, name], timeout, f"card of {name}")
        self.settle()
        return self.card(node_id)

    def screenshot(self, name: str) -> Path:
        """Save the viewport to tests/artifacts/<name>.png."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.settle()
        self.page.screenshot(path=str(path))
        return path


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.25) -> Any:
    """Poll a Python predicate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
