// Loss chart on a <canvas>: raw loss per step, a smoothed curve, the held-out loss where a run measures it,
// linear or log y axis.
// Plain 2D canvas (no chart library: the frontend ships none we may rely on).

import { formatTick } from "./format.js";

export const COLORS = {
  raw: "rgba(110, 168, 255, 0.55)",
  rawPoint: "rgba(140, 190, 255, 0.9)",
  smooth: "#ffb547",
  val: "#5fd38d",
  grid: "rgba(255, 255, 255, 0.07)",
  axis: "rgba(255, 255, 255, 0.22)",
  text: "#a9a9a9",
  empty: "#7d7d7d",
};

/** Smoothing weight for `n` points: the EMA spans about a tenth of the run (0.6 ... 0.98). */
export function smoothingFor(n) {
  return Math.min(0.98, Math.max(0.6, 1 - 10 / Math.max(n, 1)));
}

/** Debiased exponential moving average (no lag towards 0 at the start, as TensorBoard does). */
export function smooth(values, weight) {
  const out = [];
  let acc = 0;
  let norm = 0;
  for (const v of values) {
    if (!Number.isFinite(v)) {
      out.push(NaN);
      continue;
    }
    acc = acc * weight + (1 - weight) * v;
    norm = norm * weight + (1 - weight);
    out.push(acc / norm);
  }
  return out;
}

/** Round-ish tick values covering [lo, hi] (about `count` of them). */
function linearTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) ?? 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    const t = 10 ** e;
    if (t >= lo * 0.999 && t <= hi * 1.001) ticks.push(t);
  }
  // Less than a decade of range: fall back to linear ticks inside it.
  return ticks.length >= 2 ? ticks : linearTicks(lo, hi, 3).filter((t) => t > 0);
}

export class LossChart {
  /** `canvas` is owned by the caller (sized by CSS); we only draw on it. */
  constructor(canvas) {
    this.canvas = canvas;
    this.points = [];
    this.totalSteps = 0;
    this.startStep = 0;
    this.logScale = false;
    // What the last draw put on screen (read by tests and by nobody else).
    this.drawn = { raw: 0, smooth: 0, val: 0, log: false };
  }

  /** points: [{step, loss, val_loss?}] sorted by step (val_loss on the steps that measured a held-out loss). */
  setData(points, totalSteps, startStep = 0) {
    this.points = points;
    this.totalSteps = totalSteps || 0;
    this.startStep = startStep || 0;
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth));
    const h = Math.max(1, Math.round(canvas.clientHeight));
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "10px ui-sans-serif, system-ui, sans-serif";

    const log = this.logScale;
    const pts = this.points.filter((p) => Number.isFinite(p.loss) && (!log || p.loss > 0));
    const sm = smooth(pts.map((p) => p.loss), smoothingFor(pts.length));
    const vals = this.points.filter((p) => Number.isFinite(p.val_loss) && (!log || p.val_loss > 0));
    this.drawn = { raw: pts.length, smooth: sm.filter(Number.isFinite).length, val: vals.length, log };
    if (!pts.length) {
      ctx.fillStyle = COLORS.empty;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(log && this.points.length ? "no positive loss to show on a log axis" : "waiting for the first step",
                   w / 2, h / 2);
      return;
    }

    // One scale for both losses: the held-out points are never drawn off the chart.
    const all = [...pts.map((p) => p.loss), ...vals.map((p) => p.val_loss)];
    let lo = Math.min(...all);
    let hi = Math.max(...all);
    const tx = log ? Math.log10 : (v) => v;
    if (lo === hi) {
      lo = log ? lo / 2 : lo - Math.abs(lo || 1) * 0.1;
      hi = log ? hi * 2 : hi + Math.abs(hi || 1) * 0.1;
    }
    const pad = (tx(hi) - tx(lo)) * 0.08;
    const y0 = tx(lo) - pad;
    const y1 = tx(hi) + pad;
    const xMin = this.startStep;
    const xMax = Math.max(this.totalSteps, pts[pts.length - 1].step, xMin + 1);

    const left = 38;
    const right = 8;
    const top = 6;
    const bottom = 16;
    const X = (step) => left + ((step - xMin) / (xMax - xMin)) * (w - left - right);
    const Y = (v) => top + (1 - (tx(v) - y0) / (y1 - y0)) * (h - top - bottom);

    // Grid and y labels.
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const yTicks = log ? logTicks(10 ** y0, 10 ** y1) : linearTicks(y0, y1, 4);
    for (const t of yTicks) {
      const y = Y(t);
      if (y < top - 1 || y > h - bottom + 1) continue;
      ctx.strokeStyle = COLORS.grid;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(w - right, y);
      ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(formatTick(t), left - 4, y);
    }
    // x axis: first and last step of the run, so the line fills up as training proceeds.
    ctx.strokeStyle = COLORS.axis;
    ctx.beginPath();
    ctx.moveTo(left, h - bottom);
    ctx.lineTo(w - right, h - bottom);
    ctx.stroke();
    ctx.fillStyle = COLORS.text;
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.fillText(String(xMin), left, h - bottom + 3);
    ctx.textAlign = "right";
    ctx.fillText(String(xMax), w - right, h - bottom + 3);

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 2, w - left - right, h - top - bottom + 4);
    ctx.clip();
    // Raw loss: thin, translucent; dots while there are few enough steps to tell apart.
    ctx.strokeStyle = COLORS.raw;
    ctx.lineWidth = 1;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.loss)) : ctx.moveTo(X(p.step), Y(p.loss))));
    ctx.stroke();
    if (pts.length <= 80) {
      ctx.fillStyle = COLORS.rawPoint;
      for (const p of pts) {
        ctx.beginPath();
        ctx.arc(X(p.step), Y(p.loss), 2, 0, Math.PI * 2);
        ctx.fill();
      }
    }
    // Smoothed: the trend people actually read.
    ctx.strokeStyle = COLORS.smooth;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let started = false;
    pts.forEach((p, i) => {
      if (!Number.isFinite(sm[i])) return;
      if (started) ctx.lineTo(X(p.step), Y(sm[i]));
      else ctx.moveTo(X(p.step), Y(sm[i]));
      started = true;
    });
    ctx.stroke();
    // Held-out loss: its own colour, dots joined (measured every validate_every steps).
    if (vals.length) {
      ctx.strokeStyle = COLORS.val;
      ctx.fillStyle = COLORS.val;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      vals.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.val_loss)) : ctx.moveTo(X(p.step), Y(p.val_loss))));
      ctx.stroke();
      for (const p of vals) {
        ctx.beginPath();
        ctx.arc(X(p.step), Y(p.val_loss), 2.5, 0, Math.PI * 2);
        ctx.fill();
      }
    }
    ctx.restore();
  }
}
