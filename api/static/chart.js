// A small line-chart renderer on <canvas>: axes with "nice" ticks, several series,
// dashed lines for bounds. No dependencies; nothing is fetched.
"use strict";

function niceStep(span, maxTicks) {
  // the smallest of 1, 2, 5 x 10^k that gives at most maxTicks intervals
  const raw = span / Math.max(1, maxTicks);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-3) return v.toExponential(0);
  return String(Number(v.toPrecision(3)));
}

/**
 * Draw series on a canvas.
 * @param {HTMLCanvasElement} canvas
 * @param {{series: {name: string, color: string, dash?: number[], points: [number, number][]}[],
 *          yMin?: number, yMax?: number, xLabel?: string}} spec
 */
function drawChart(canvas, spec) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || canvas.width, cssH = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(cssW * dpr)) { canvas.width = Math.round(cssW * dpr); canvas.height = Math.round(cssH * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const legend = spec.series.length > 1;
  const pad = { l: 48, r: 10, t: legend ? 22 : 8, b: 26 };
  const w = cssW - pad.l - pad.r, h = cssH - pad.t - pad.b;
  const pts = spec.series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  canvas.dataset.points = String(pts.length);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  if (pts.length === 0) {
    ctx.fillText("waiting for data…", pad.l + 8, pad.t + h / 2);
    return;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = spec.yMin ?? Math.min(...pts.map(p => p[1])), y1 = spec.yMax ?? Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; if (spec.yMin === undefined) y0 -= (Math.abs(y0) || 1) * 0.1; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * w;
  const Y = y => pad.t + h - (y - y0) / (y1 - y0) * h;
  // grid and ticks
  ctx.strokeStyle = "#e2e5ea"; ctx.lineWidth = 1;
  const ys = niceStep(y1 - y0, 5);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let v = Math.ceil(y0 / ys) * ys; v <= y1 + ys * 1e-9; v += ys) {
    ctx.beginPath(); ctx.moveTo(pad.l, Y(v)); ctx.lineTo(pad.l + w, Y(v)); ctx.stroke();
    ctx.fillText(fmtTick(v), pad.l - 4, Y(v));
  }
  const xs = niceStep(x1 - x0, 6);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let v = Math.ceil(x0 / xs) * xs; v <= x1 + xs * 1e-9; v += xs) {
    ctx.beginPath(); ctx.moveTo(X(v), pad.t + h); ctx.lineTo(X(v), pad.t + h + 3); ctx.stroke();
    ctx.fillText(fmtTick(v), X(v), pad.t + h + 5);
  }
  ctx.strokeStyle = "#9aa1ad";
  ctx.strokeRect(pad.l, pad.t, w, h);
  // series
  let legendX = pad.l + 6;
  for (const s of spec.series) {
    const p = s.points.filter(q => Number.isFinite(q[0]) && Number.isFinite(q[1]));
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.6; ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    p.forEach((q, i) => (i ? ctx.lineTo(X(q[0]), Y(Math.min(Math.max(q[1], y0), y1))) : ctx.moveTo(X(q[0]), Y(Math.min(Math.max(q[1], y0), y1)))));
    ctx.stroke();
    if (p.length === 1) { ctx.fillStyle = s.color; ctx.fillRect(X(p[0][0]) - 2, Y(p[0][1]) - 2, 4, 4); }
    ctx.setLineDash([]);
    if (legend) {
      ctx.fillStyle = s.color; ctx.fillRect(legendX, 7, 10, 3);
      ctx.fillStyle = "#1d2330"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
      ctx.fillText(s.name, legendX + 14, 9);
      legendX += 24 + ctx.measureText(s.name).width;
    }
  }
  canvas.dataset.drawn = String(Number(canvas.dataset.drawn || 0) + 1);
}

window.drawChart = drawChart;
