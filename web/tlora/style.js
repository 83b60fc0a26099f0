// Styles for the TLoRA panels, injected once (extensions have no stylesheet hook).
// Colours come from ComfyUI's theme variables, with dark-theme fallbacks.

const CSS = `
.tlora-panel, .tlora-card {
  box-sizing: border-box;
  width: 100%;
  height: 100%;
  display: flex;
  flex-direction: column;
  gap: 4px;
  padding: 6px 8px;
  border-radius: 6px;
  background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #4e4e4e);
  color: var(--input-text, #ddd);
  font: 12px/1.35 ui-sans-serif, system-ui, -apple-system, "Segoe UI", sans-serif;
  overflow: hidden;
  font-variant-numeric: tabular-nums;
}
.tlora-row { display: flex; align-items: center; gap: 8px; min-height: 18px; }
.tlora-grow { flex: 1; min-width: 0; }
.tlora-title { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tlora-dim { color: var(--descrip-text, #999); }
.tlora-badge {
  padding: 0 6px; border-radius: 8px; font-size: 10px; font-weight: 600; line-height: 16px;
  text-transform: uppercase; letter-spacing: .04em; white-space: nowrap;
  background: #3a3a3a; color: #bbb;
}
.tlora-badge[data-kind="running"] { background: #1f3b5c; color: #9cc7ff; }
.tlora-badge[data-kind="done"], .tlora-badge[data-kind="complete"] { background: #1e4027; color: #8fdc9f; }
.tlora-badge[data-kind="partial"], .tlora-badge[data-kind="cancelled"] { background: #4a3a14; color: #ffd27a; }
.tlora-badge[data-kind="diverged"], .tlora-badge[data-kind="failed"], .tlora-badge[data-kind="error"] {
  background: #4d1f1f; color: #ff9c9c;
}
.tlora-progress { height: 3px; border-radius: 2px; background: #333; overflow: hidden; flex: none; }
.tlora-progress > div { height: 100%; width: 0; background: #5b9dff; transition: width .2s; }
.tlora-stats { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 2px 8px; }
.tlora-stat { display: flex; flex-direction: column; min-width: 0; }
.tlora-stat > span:first-child { font-size: 10px; color: var(--descrip-text, #999); text-transform: uppercase; letter-spacing: .04em; }
.tlora-stat > span:last-child { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tlora-chart-box { position: relative; flex: 1 1 110px; min-height: 110px; }
.tlora-chart-box canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
.tlora-legend { display: flex; gap: 10px; font-size: 10px; color: var(--descrip-text, #999); align-items: center; }
.tlora-legend i { display: inline-block; width: 12px; height: 2px; vertical-align: middle; margin-right: 4px; }
.tlora-toggle {
  margin-left: auto; cursor: pointer; user-select: none; font-size: 10px; padding: 1px 6px;
  border-radius: 4px; border: 1px solid var(--border-color, #4e4e4e); background: transparent;
  color: var(--descrip-text, #999);
}
.tlora-toggle[aria-pressed="true"] { color: #ffb547; border-color: #ffb547; }
.tlora-sample { display: flex; gap: 8px; align-items: center; flex: none; }
.tlora-sample img {
  width: 96px; height: 96px; object-fit: contain; border-radius: 4px; background: #111;
  border: 1px solid var(--border-color, #4e4e4e);
}
.tlora-summary {
  flex: none; border-top: 1px solid var(--border-color, #4e4e4e); padding-top: 5px;
  display: flex; flex-direction: column; gap: 2px;
}
.tlora-summary .tlora-file { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11px; word-break: break-all; }
.tlora-msg { color: #ff9c9c; font-size: 11px; word-break: break-word; }
.tlora-hint { color: var(--descrip-text, #999); font-size: 11px; }
.tlora-kv { display: grid; grid-template-columns: max-content 1fr; gap: 1px 10px; }
.tlora-kv > span:nth-child(odd) { color: var(--descrip-text, #999); }
.tlora-kv > span:nth-child(even) { min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tlora-big { font-size: 15px; font-weight: 700; }
[hidden].tlora-hideable { display: none !important; }
`;

let injected = false;

/** Add the stylesheet to the page (idempotent). */
export function injectStyles() {
  if (injected || document.getElementById("tlora-styles")) return;
  const el = document.createElement("style");
  el.id = "tlora-styles";
  el.textContent = CSS;
  document.head.appendChild(el);
  injected = true;
}
