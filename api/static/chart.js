// The dashboard's charts, on uPlot (vendored in /static/vendor/uplot/, served by the service
// itself: nothing is fetched from elsewhere). x is the training step. Each chart has a
// cursor whose values show in its legend, drag-to-zoom on x (double-click resets), and,
// when asked, a log scale for y. The chart's container carries data-points (finite values
// it holds, all series together) and data-drawn (how many times it drew), for the tests.
// Marks (setMarks) are vertical lines at steps, labelled: the B-hat chart marks the end of
// the guard's warm-up (the bound is frozen there) and every guard action; data-marks says
// how many of them the last draw put inside the plot.
"use strict";

const CHART_W = 420, CHART_H = 200;

class StepChart {
  /**
   * @param {HTMLElement} el the container (uPlot puts its canvas and legend in it)
   * @param {{series: {label: string, color: string, dash?: number[]}[],
   *          yRange?: (min: number, max: number) => [number, number]}} spec
   */
  constructor(el, spec) {
    this.el = el;
    this.spec = spec;
    this.log = false;
    this.zoomed = false;
    this.data = [[], ...spec.series.map(() => [])];
    this.marks = [];
    el.dataset.points = "0";
    el.dataset.drawn = "0";
    el.dataset.marks = "0";
    this.u = null;
    this.make();
  }

  options() {
    const y = this.log
      ? { distr: 3, log: 10 }
      : { range: this.spec.yRange ? (u, min, max) => this.spec.yRange(min, max) : undefined };
    return {
      width: CHART_W, height: CHART_H,
      scales: { x: { time: false }, y },
      series: [
        { label: "step", value: (u, v) => (v === null || v === undefined ? "–" : String(v)) },
        ...this.spec.series.map(s => ({
          label: s.label, stroke: s.color, width: 1.5, dash: s.dash, spanGaps: true,
          value: (u, v) => (v === null || v === undefined ? "–" : Number(v.toPrecision(4)).toString()),
        })),
      ],
      axes: [{ size: 36 }, { size: 56 }],
      cursor: { drag: { x: true, y: false, setScale: true } },
      legend: { live: true },
      hooks: {
        draw: [u => {
          this.drawMarks(u);
          this.el.dataset.drawn = String(+this.el.dataset.drawn + 1);
        }],
        setScale: [(u, key) => { if (key === "x") this.zoomed = this.isZoomed(u); }],
      },
    };
  }

  isZoomed(u) {
    const xs = this.data[0];
    if (!xs.length || u.scales.x.min === null) return false;
    return u.scales.x.min > xs[0] || u.scales.x.max < xs[xs.length - 1];
  }

  /** What uPlot draws: on a log scale, values <= 0 have no place (left out). */
  view() {
    if (!this.log) return this.data;
    return [this.data[0], ...this.data.slice(1).map(ys => ys.map(v => (v !== null && v > 0 ? v : null)))];
  }

  make() {
    if (this.u) this.u.destroy();
    this.zoomed = false;
    this.u = new uPlot(this.options(), this.view(), this.el);
    this.count();
  }

  setLog(on) {
    if (on === this.log) return;
    this.log = on;
    this.make();
  }

  /** Vertical lines at steps: [{x, color, label}] (drawn with the next draw). */
  setMarks(marks) {
    this.marks = marks;
    this.u.redraw(false, false);
  }

  drawMarks(u) {
    const ctx = u.ctx, { left, top, width, height } = u.bbox;
    let n = 0;
    ctx.save();
    ctx.font = `${Math.round(10 * devicePixelRatio)}px sans-serif`;
    ctx.setLineDash([3 * devicePixelRatio, 3 * devicePixelRatio]);
    ctx.lineWidth = 1.5 * devicePixelRatio;
    for (const m of this.marks) {
      const x = u.valToPos(m.x, "x", true);
      if (!Number.isFinite(x) || x < left || x > left + width) continue;
      ctx.strokeStyle = m.color; ctx.fillStyle = m.color;
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.fillText(m.label, x + 3 * devicePixelRatio, top + (10 + 11 * (n % 3)) * devicePixelRatio);
      n++;
    }
    ctx.restore();
    this.el.dataset.marks = String(n);
  }

  /** Replace the data (columns: xs, then one array per series; xs ascending). */
  setData(data) {
    this.data = data;
    // a zoomed chart keeps the user's range; otherwise it follows the data
    this.u.setData(this.view(), !this.zoomed);
    this.count();
  }

  count() {
    let n = 0;
    for (const ys of this.data.slice(1)) for (const v of ys) if (v !== null && Number.isFinite(v)) n++;
    this.el.dataset.points = String(n);
  }
}

/**
 * Columns for a chart, x ascending: a step seen again (the run went back to a checkpoint)
 * replaces what was drawn from it on.
 */
class Columns {
  constructor(keys) {
    this.keys = keys;
    this.cols = [[], ...keys.map(() => [])];
  }

  push(rec) {
    const xs = this.cols[0];
    while (xs.length && xs[xs.length - 1] >= rec.step) for (const c of this.cols) c.pop();
    xs.push(rec.step);
    this.keys.forEach((k, i) => {
      const v = rec[k];
      this.cols[i + 1].push(v === null || v === undefined || !Number.isFinite(v) ? null : v);
    });
  }
}

window.StepChart = StepChart;
window.Columns = Columns;
