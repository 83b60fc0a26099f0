// Number and text formatting for the TLoRA panels (pure functions, no ComfyUI imports).
// This file is also loaded on its own by the frontend (it loads every .js): no side effects.

const INT = new Intl.NumberFormat("en-US");

/** 78400 -> "78,400" (exact counts: the card must show the real number, not "78k"). */
export function formatCount(n) {
  return Number.isFinite(n) ? INT.format(Math.round(n)) : "–";
}

/** Decimal units, as file managers and the README quote adapter sizes ("3.2 MB"). */
export function formatBytes(n) {
  if (!Number.isFinite(n)) return "–";
  if (n < 1000) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(2)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

/** Seconds -> "850 ms", "2.4 s", "7m 32s", "1h 02m". */
export function formatDuration(s) {
  if (!Number.isFinite(s) || s < 0) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

/** Learning rates span decades: always scientific, 3 significant digits. */
export function formatLr(lr) {
  return Number.isFinite(lr) ? lr.toExponential(2) : "–";
}

/** Losses: 4 significant digits, scientific when tiny or huge. */
export function formatLoss(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toPrecision(4);
}

/** Axis labels: short. */
export function formatTick(v) {
  if (!Number.isFinite(v)) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e4)) return v.toExponential(0);
  return Number(v.toPrecision(3)).toString();
}

/** "trm:2" -> "tensor ring, rank 2" (what the kinds in a file's config mean). */
export function describeKind(kind) {
  const [name, rank] = String(kind).split(":");
  const names = { trm: "tensor ring", tr: "tensor ring", lora: "low rank", diag: "diagonal", none: "none" };
  const label = names[name] ?? name;
  return rank ? `${label}, rank ${rank}` : label;
}
