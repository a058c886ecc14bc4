// Charts. Time series (loss, learning rate) use the vendored uPlot, loaded by index.html as a
// classic script that defines `window.uPlot`. Comparison charts are small hand-drawn SVGs:
// grouped bars with error bars and interval ("forest") plots are categorical, which uPlot is not
// built for, and SVG keeps each mark's exact numbers in a <title> for pointer and screen reader.

import { h, svg } from './dom.js';
import { num, signed } from './format.js';

// Colours chosen for at least 4.5:1 against white, so they also work as text.
export const PALETTE = ['#1f5fbf', '#a8326a', '#1b7340', '#8a4b00', '#6b3fa0', '#00677f', '#5d6b00', '#b3261e'];
export const runColor = (i) => PALETTE[i % PALETTE.length];

/**
 * A live line chart. `series`: `[{ label, color, points?: true }]` (points-only series draw
 * markers without a line, as eval loss does). Returns `{ el, setData(xs, ...ys), destroy() }`.
 */
export function lineChart({ title, xLabel, yLabel, series, height = 240, log = false }) {
  const summary = h('p', { class: 'visually-hidden' });
  const plot = h('div', { class: 'chart-plot' });
  const el = h('figure', { class: 'chart' }, h('figcaption', {}, title), plot, summary);
  const uPlot = window.uPlot;
  if (!uPlot) {
    plot.append(h('p', { class: 'muted' }, 'Charts are unavailable: vendor/uPlot.iife.min.js did not load.'));
  }
  let chart = null;
  let data = [[], ...series.map(() => [])];

  const make = (width) => {
    // Axis colours follow the page's theme (light or dark) at the moment the chart is drawn.
    const css = getComputedStyle(document.documentElement);
    const ink = css.getPropertyValue('--tick').trim() || '#333';
    const grid = css.getPropertyValue('--grid').trim() || '#e3e3e3';
    const paper = css.getPropertyValue('--panel').trim() || '#fff';
    chart = new uPlot(
      {
        width,
        height,
        scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        axes: [
          { label: xLabel, stroke: ink, grid: { stroke: grid }, ticks: { stroke: grid } },
          { label: yLabel, stroke: ink, grid: { stroke: grid }, ticks: { stroke: grid }, size: 80, values: (u, vals) => vals.map((v) => num(v)) },
        ],
        series: [
          { label: xLabel },
          ...series.map((s) => ({
            label: s.label,
            stroke: s.color,
            width: 2,
            spanGaps: true,
            value: (u, v) => num(v),
            ...(s.points
              ? { paths: () => null, points: { show: true, size: 9, stroke: s.color, fill: paper, width: 2 } }
              : { points: { show: false } }),
          })),
        ],
      },
      data,
      plot,
    );
  };

  let observer = null;
  if (uPlot) {
    observer = new ResizeObserver((entries) => {
      const width = Math.max(200, Math.floor(entries[0].contentRect.width));
      if (!chart) make(width);
      else if (chart.width !== width) chart.setSize({ width, height });
    });
    observer.observe(plot);
  }

  return {
    el,
    setData(xs, ...ys) {
      data = [xs, ...ys];
      chart?.setData(data);
      const parts = series.map((s, i) => {
        const col = ys[i];
        let last = -1;
        for (let k = col.length - 1; k >= 0; k--) if (col[k] !== null && col[k] !== undefined) { last = k; break; }
        return last === -1 ? null : `${s.label} ${num(col[last])} at ${xLabel} ${xs[last]}`;
      }).filter(Boolean);
      summary.textContent = `${title}: ${xs.length} points${parts.length ? `; latest ${parts.join(', ')}` : ''}.`;
    },
    destroy() {
      observer?.disconnect();
      chart?.destroy();
    },
  };
}

// Rounded-up bound for an axis: 1, 2 or 5 times a power of ten.
function niceCeil(x) {
  if (x <= 0) return 0;
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

function yDomain(score, ests) {
  const lows = ests.map((e) => e.low).filter(Number.isFinite);
  const highs = ests.map((e) => e.high).filter(Number.isFinite);
  const dataLow = Math.min(...lows, ...ests.map((e) => e.mean));
  const dataHigh = Math.max(...highs, ...ests.map((e) => e.mean));
  let lo = Number.isFinite(score.min) ? Math.min(score.min, dataLow) : Math.min(0, dataLow);
  let hi = niceCeil(Math.max(dataHigh * 1.15, lo + 1e-9));
  if (Number.isFinite(score.max)) hi = Math.min(score.max, hi);
  if (hi <= dataHigh) hi = dataHigh + (dataHigh - lo) * 0.1 || 1;
  if (hi <= lo) hi = lo + 1;
  return [lo, hi];
}

/**
 * One score's means across runs as bars with 95% error bars. `runs`: `[{ label, color, est }]`
 * with `est` = `{ mean, low, high }` or null.
 */
export function scoreBars(score, runs) {
  const W = 320;
  const H = 190;
  const m = { top: 14, right: 10, bottom: 34, left: 46 };
  const present = runs.filter((r) => r.est && Number.isFinite(r.est.mean));
  const [lo, hi] = present.length ? yDomain(score, present.map((r) => r.est)) : [0, 1];
  const y = (v) => m.top + (H - m.top - m.bottom) * (1 - (v - lo) / (hi - lo));
  const band = (W - m.left - m.right) / Math.max(1, runs.length);
  const barW = Math.min(48, band * 0.6);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => lo + (hi - lo) * f);
  const arrow = score.higher_is_better ? 'higher is better' : 'lower is better';
  const desc = runs.map((r) => (r.est ? `${r.label} ${num(r.est.mean)} [${num(r.est.low)}, ${num(r.est.high)}]` : `${r.label} no value`)).join('; ');
  return svg('svg', {
    viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'bars', role: 'img',
    'aria-label': `${score.name} (${arrow}): ${desc}`,
  },
  ticks.map((t) => [
    svg('line', { x1: m.left, x2: W - m.right, y1: y(t), y2: y(t), class: 'grid' }),
    svg('text', { x: m.left - 6, y: y(t) + 4, 'text-anchor': 'end', class: 'tick' }, num(t)),
  ]),
  runs.map((r, i) => {
    const cx = m.left + band * (i + 0.5);
    const label = svg('text', { x: cx, y: H - m.bottom + 16, 'text-anchor': 'middle', class: 'tick' }, truncate(r.label, 14));
    if (!r.est || !Number.isFinite(r.est.mean)) return label;
    const top = y(Math.max(r.est.mean, lo));
    const base = y(Math.max(lo, Math.min(hi, 0 >= lo && 0 <= hi ? 0 : lo)));
    const el = svg('g', { class: 'bar' },
      svg('title', {}, `${r.label}: ${num(r.est.mean)} [${num(r.est.low)}, ${num(r.est.high)}]`),
      svg('rect', { x: cx - barW / 2, y: Math.min(top, base), width: barW, height: Math.max(1, Math.abs(base - top)), fill: r.color, 'fill-opacity': 0.8 }),
    );
    if (Number.isFinite(r.est.low) && Number.isFinite(r.est.high)) {
      const yl = y(Math.max(lo, r.est.low));
      const yh = y(Math.min(hi, r.est.high));
      el.append(
        svg('line', { x1: cx, x2: cx, y1: yl, y2: yh, class: 'whisker' }),
        svg('line', { x1: cx - 7, x2: cx + 7, y1: yl, y2: yl, class: 'whisker' }),
        svg('line', { x1: cx - 7, x2: cx + 7, y1: yh, y2: yh, class: 'whisker' }),
      );
    }
    return [el, label];
  }),
  svg('line', { x1: m.left, x2: W - m.right, y1: H - m.bottom, y2: H - m.bottom, class: 'axis' }),
  );
}

const VERDICT_COLOR = { better: '#1b7340', worse: '#b3261e', ns: '#5f6368' };

/**
 * Differences against the baseline with their paired 95% intervals, one row per (score, run),
 * all on one scale: each difference divided by its score's range (`range`; rows without one
 * are drawn as they are), so rows compare with each other. `rows`:
 * `[{ label, difference, verdict, range? }]` with verdict 'better' | 'worse' | 'ns'.
 */
export function deltaForest(rows) {
  const W = 640;
  const rowH = 30;
  const m = { top: 8, bottom: 26, left: 190, right: 200 };
  const H = m.top + m.bottom + rowH * rows.length;
  const plotW = W - m.left - m.right;
  const scaled = rows.map((r) => {
    const k = r.range ? 1 / r.range : 1;
    return { low: r.difference.low * k, high: r.difference.high * k, mean: r.difference.mean * k };
  });
  const extent = Math.max(...scaled.flatMap((d) => [Math.abs(d.low), Math.abs(d.high), Math.abs(d.mean)]).filter(Number.isFinite), 0) * 1.15 || 1;
  const x = (v) => m.left + plotW * (0.5 + Math.max(-extent, Math.min(extent, v)) / (2 * extent));
  const pct = (v) => (v === 0 ? '0' : `${v > 0 ? '+' : v < 0 ? '−' : ''}${Math.abs(v * 100).toFixed(Math.abs(v) < 0.1 ? 1 : 0)}%`);
  const axisY = m.top + rowH * rows.length;
  return svg('svg', {
    viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: 'forest', role: 'img',
    'aria-label': `Differences against the baseline, on one scale (share of each score's range): ${rows.map((r) => `${r.label} ${signed(r.difference.mean)} [${signed(r.difference.low)}, ${signed(r.difference.high)}], ${verdictText(r.verdict)}`).join('; ')}`,
  },
  rows.map((r, i) => {
    const d = r.difference;
    const sd = scaled[i];
    const cy = m.top + rowH * i + rowH / 2;
    const color = VERDICT_COLOR[r.verdict];
    return svg('g', {},
      svg('title', {}, `${r.label}: ${signed(d.mean)} [${signed(d.low)}, ${signed(d.high)}]${r.range ? ` (${pct(sd.mean)} of the range)` : ''}, ${verdictText(r.verdict)}`),
      i % 2 ? svg('rect', { x: 0, y: cy - rowH / 2, width: W, height: rowH, class: 'stripe' }) : null,
      svg('text', { x: m.left - 10, y: cy + 4, 'text-anchor': 'end', class: 'tick' }, truncate(r.label, 26)),
      svg('line', { x1: x(sd.low), x2: x(sd.high), y1: cy, y2: cy, stroke: color, 'stroke-width': 3 }),
      svg('circle', { cx: x(sd.mean), cy, r: 5, fill: color }),
      svg('text', { x: W - m.right + 10, y: cy + 4, class: 'tick' }, `${signed(d.mean)} ${verdictText(r.verdict)}`),
    );
  }),
  svg('line', { x1: x(0), x2: x(0), y1: m.top, y2: axisY, class: 'zero' }),
  svg('line', { x1: m.left, x2: W - m.right, y1: axisY, y2: axisY, class: 'axis' }),
  [-extent, -extent / 2, 0, extent / 2, extent].map((t) => svg('text', { x: x(t), y: axisY + 16, 'text-anchor': 'middle', class: 'tick' }, pct(t))),
  );
}

export function verdictText(v) {
  return v === 'better' ? 'better' : v === 'worse' ? 'worse' : 'not significant';
}

function truncate(s, n) {
  s = String(s);
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}
