// The runs page: every run, newest first, refreshed every 2 s while any is queued or running,
// with checkboxes to pick runs for the compare page.

import { api } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { dateTime, interval, isActive, num, runLabel, shortId } from '../lib/format.js';
import { statusBadge } from './common.js';

const POLL_MS = 2000;
// Picked runs, in the order they were picked (the first is the comparison's baseline). Kept
// across visits so a person can look at a run and come back to their selection.
const picked = [];

export async function mountRuns(main, ctx) {
  ctx.setTitle('Runs');
  const count = h('p', { class: 'muted', id: 'runs-count' });
  const compareHint = h('span', { id: 'compare-hint', class: 'muted' });
  const compareButton = h('button', { type: 'button', class: 'primary', 'aria-describedby': 'compare-hint', 'data-testid': 'compare-selected' }, 'Compare');
  const clearButton = h('button', { type: 'button' }, 'Clear selection');
  const message = h('div', { role: 'alert', class: 'form-error', hidden: true });
  const tbody = h('tbody');
  const table = h('table', { class: 'data runs-table', 'data-testid': 'runs-table' },
    h('caption', { class: 'visually-hidden' }, 'Runs, newest first'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Select')),
      h('th', { scope: 'col' }, 'Run'),
      h('th', { scope: 'col' }, 'Status'),
      h('th', { scope: 'col' }, 'Kind'),
      h('th', { scope: 'col' }, 'Model'),
      h('th', { scope: 'col' }, 'Adapter'),
      h('th', { scope: 'col' }, 'Key metrics (mean [95% interval])'),
      h('th', { scope: 'col' }, 'Created'),
    )),
    tbody,
  );
  const empty = h('p', { hidden: true }, 'No runs yet. ', h('a', { href: '#/launch' }, 'Launch one'), '.');

  replace(main,
    h('div', { class: 'page-head' },
      h('h1', {}, 'Runs'),
      h('a', { href: '#/launch', class: 'button' }, 'Launch a run'),
    ),
    count,
    h('div', { class: 'toolbar', role: 'group', 'aria-label': 'Selection' }, compareButton, clearButton, compareHint),
    message,
    h('div', { class: 'table-scroll' }, table),
    empty,
  );

  const updateSelection = () => {
    compareButton.disabled = picked.length < 2;
    clearButton.disabled = picked.length === 0;
    compareHint.textContent = picked.length < 2
      ? `Select two or more runs to compare (${picked.length} selected).`
      : `${picked.length} selected; the first picked is the baseline.`;
  };
  compareButton.addEventListener('click', () => {
    if (picked.length >= 2) window.location.hash = `#/compare?runs=${picked.map(encodeURIComponent).join(',')}`;
  });
  clearButton.addEventListener('click', () => {
    picked.length = 0;
    for (const box of tbody.querySelectorAll('input[type=checkbox]')) box.checked = false;
    updateSelection();
  });
  updateSelection();

  const statuses = new Map();
  let first = true;
  let failures = 0;

  const load = async () => {
    let runs;
    try {
      runs = await api.runs({ signal: ctx.signal });
      failures = 0;
      message.hidden = true;
    } catch (e) {
      if (ctx.signal.aborted) return;
      failures += 1;
      message.hidden = false;
      message.textContent = `Could not load runs: ${e.message}${failures > 1 ? ` (retrying)` : ''}`;
      schedule(Math.min(30000, POLL_MS * 2 ** failures));
      return;
    }
    if (ctx.signal.aborted) return;
    // Drop picks of runs that no longer exist.
    for (let i = picked.length - 1; i >= 0; i--) if (!runs.some((r) => r.id === picked[i])) picked.splice(i, 1);
    render(runs);
    const active = runs.filter((r) => isActive(r.status)).length;
    count.textContent = `${runs.length} run${runs.length === 1 ? '' : 's'}${active ? `, ${active} queued or running (refreshing every 2 s)` : ''}.`;
    if (!first) {
      const changes = runs.filter((r) => statuses.has(r.id) && statuses.get(r.id) !== r.status);
      if (changes.length) ctx.announce(changes.map((r) => `${runLabel(r)} is ${r.status}.`).join(' '));
    }
    for (const r of runs) statuses.set(r.id, r.status);
    first = false;
    if (active) schedule(POLL_MS);
  };

  let timer = null;
  const schedule = (ms) => {
    clearTimeout(timer);
    timer = setTimeout(load, ms);
  };
  ctx.signal.addEventListener('abort', () => clearTimeout(timer));

  const render = (runs) => {
    // Rebuilding the rows is simplest; keep keyboard focus on the same control across it.
    const focusKey = document.activeElement?.closest?.('tbody') === tbody ? document.activeElement.dataset.focusKey : null;
    replace(tbody, runs.map((run) => row(run)));
    empty.hidden = runs.length > 0;
    table.hidden = runs.length === 0;
    updateSelection();
    if (focusKey) tbody.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus();
  };

  const row = (run) => {
    const label = runLabel(run);
    const box = h('input', {
      type: 'checkbox',
      'aria-label': `Select ${label} (${shortId(run.id)})`,
      'data-focus-key': `select:${run.id}`,
      'data-testid': `select-${run.id}`,
    });
    box.checked = picked.includes(run.id);
    box.addEventListener('change', () => {
      const i = picked.indexOf(run.id);
      if (box.checked && i === -1) picked.push(run.id);
      if (!box.checked && i !== -1) picked.splice(i, 1);
      updateSelection();
    });
    const md = run.metadata ?? {};
    return h('tr', { 'data-run-id': run.id, 'data-status': run.status },
      h('td', {}, box),
      h('th', { scope: 'row' },
        h('a', { href: `#/runs/${encodeURIComponent(run.id)}`, 'data-focus-key': `link:${run.id}` }, label),
        h('div', { class: 'muted mono small' }, shortId(run.id)),
      ),
      h('td', {}, statusBadge(run.status), progressText(run)),
      h('td', {}, run.kind),
      h('td', {}, md.model || md.base_model || '—'),
      // A training run's `adapter` is the folder it wrote; its name is what people pick.
      h('td', {}, md.adapter_name || md.adapter || '—'),
      h('td', {}, keyMetrics(run)),
      h('td', {}, h('time', { datetime: run.created ?? '' }, dateTime(run.created))),
    );
  };

  await load();
}

function progressText(run) {
  const p = run.progress;
  if (!isActive(run.status) || !p || !p.total) return null;
  return h('div', { class: 'small muted' }, `${p.done}/${p.total} ${p.unit ?? ''}`);
}

/** The first few aggregates, in the order the metrics declared their scores. */
export function keyMetrics(run, limit = 3) {
  const aggs = run.aggregates ?? {};
  const order = (run.scores ?? []).map((s) => s.name).filter((n) => n in aggs);
  for (const n of Object.keys(aggs)) if (!order.includes(n)) order.push(n);
  if (order.length === 0) return run.error ? h('span', { class: 'small error-text' }, truncate(run.error, 80)) : '—';
  return h('ul', { class: 'metrics' },
    order.slice(0, limit).map((n) => h('li', { title: `${n}: ${num(aggs[n].mean)} ${interval(aggs[n])}` },
      h('span', { class: 'metric-name' }, n), ' ', h('span', { class: 'num' }, num(aggs[n].mean)),
      ' ', h('span', { class: 'muted small' }, interval(aggs[n])))),
    order.length > limit ? h('li', { class: 'muted small' }, `+${order.length - limit} more`) : null,
  );
}

function truncate(s, n) {
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}
