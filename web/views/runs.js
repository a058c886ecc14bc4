// The runs page: every run with its hyperparameters and final metrics, searchable, filterable
// (kind, status, tag) and sortable, refreshed every 2 s while any is queued or running (every
// 10 s otherwise, so runs started elsewhere appear), with checkboxes to pick runs for the compare
// page. With no runs at all it is a landing page saying what adapterlab does.

import { api } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { dateTime, interval, isActive, num, runLabel, shortId } from '../lib/format.js';
import { outcome, runBadge } from './common.js';
import { DECODING_PRESETS } from './launch.js';

const POLL_MS = 2000;
const SLOW_POLL_MS = 10000;
// Picked runs, in the order they were picked (the first is the comparison's baseline). Kept
// across visits so a person can look at a run and come back to their selection.
const picked = [];
// Search, filters and sort, kept across visits too.
const view = { query: '', kind: '', status: '', tag: '', sort: 'newest' };

/** Hyperparameters and final numbers of a run, for columns and sorting. */
export function runFacts(run) {
  const md = run.metadata ?? {};
  const lora = /r=(\d+)/.exec(md.lora ?? '');
  const n = (x) => (x === undefined || x === null || x === '' || Number.isNaN(Number(x)) ? undefined : Number(x));
  return {
    lr: n(md.learning_rate),
    r: lora ? Number(lora[1]) : n(md.r),
    trainLoss: n(run.corpus?.train_loss),
    evalLoss: n(run.corpus?.eval_loss),
  };
}

export async function mountRuns(main, ctx) {
  ctx.setTitle('Runs');
  const count = h('p', { class: 'muted', id: 'runs-count', 'aria-live': 'polite' });
  const compareHint = h('span', { id: 'compare-hint', class: 'muted' });
  const compareButton = h('button', { type: 'button', class: 'primary', 'aria-describedby': 'compare-hint', 'data-testid': 'compare-selected' }, 'Compare');
  const clearButton = h('button', { type: 'button' }, 'Clear selection');
  const message = h('div', { role: 'alert', class: 'form-error', hidden: true });

  // Search, filters, sort.
  const search = h('input', { type: 'search', id: 'runs-search', placeholder: 'name, model, tag, note…', 'data-testid': 'runs-search' });
  search.value = view.query;
  const kindSel = h('select', { id: 'runs-kind', 'data-testid': 'runs-kind' }, h('option', { value: '' }, 'All'), ['eval', 'generate', 'train'].map((k) => h('option', { value: k }, k)));
  const statusSel = h('select', { id: 'runs-status', 'data-testid': 'runs-status' }, h('option', { value: '' }, 'All'),
    [['queued', 'queued'], ['running', 'running'], ['done', 'done'], ['done-with-errors', 'done with errors'], ['failed', 'failed'], ['interrupted', 'interrupted'], ['cancelled', 'cancelled']].map(([v, l]) => h('option', { value: v }, l)));
  const tagSel = h('select', { id: 'runs-tag', 'data-testid': 'runs-tag' }, h('option', { value: '' }, 'All'));
  const sortSel = h('select', { id: 'runs-sort', 'data-testid': 'runs-sort' });
  kindSel.value = view.kind;
  statusSel.value = view.status;
  const filters = h('div', { class: 'filters', role: 'search', 'aria-label': 'Find runs' },
    h('div', { class: 'field inline' }, h('label', { for: 'runs-search' }, 'Search'), search),
    h('div', { class: 'field inline' }, h('label', { for: 'runs-kind' }, 'Kind'), kindSel),
    h('div', { class: 'field inline' }, h('label', { for: 'runs-status' }, 'Status'), statusSel),
    h('div', { class: 'field inline' }, h('label', { for: 'runs-tag' }, 'Tag'), tagSel),
    h('div', { class: 'field inline' }, h('label', { for: 'runs-sort' }, 'Sort'), sortSel),
  );

  const tbody = h('tbody');
  const table = h('table', { class: 'data runs-table', 'data-testid': 'runs-table' },
    h('caption', { class: 'visually-hidden' }, 'Runs with their settings and results'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Select')),
      h('th', { scope: 'col' }, 'Run'),
      h('th', { scope: 'col' }, 'Status'),
      h('th', { scope: 'col' }, 'Kind'),
      h('th', { scope: 'col' }, 'Model / adapter'),
      h('th', { scope: 'col', class: 'num' }, h('abbr', { title: 'learning rate' }, 'LR')),
      h('th', { scope: 'col', class: 'num' }, h('abbr', { title: 'LoRA rank' }, 'r')),
      h('th', { scope: 'col', class: 'num' }, 'Train loss'),
      h('th', { scope: 'col', class: 'num' }, 'Eval loss'),
      h('th', { scope: 'col' }, 'Main scores (mean [95% interval])'),
      h('th', { scope: 'col' }, 'Created'),
    )),
    tbody,
  );
  const noMatch = h('p', { class: 'muted', hidden: true, 'data-testid': 'runs-no-match' }, 'No run matches the search and filters.');
  const listPart = h('div', {},
    count,
    filters,
    h('div', { class: 'toolbar', role: 'group', 'aria-label': 'Selection' }, compareButton, clearButton, compareHint),
    message,
    h('div', { class: 'table-scroll' }, table),
    noMatch,
  );
  const landingPart = landing(ctx);
  landingPart.hidden = true;

  replace(main,
    h('div', { class: 'page-head' },
      h('h1', {}, 'Runs'),
      h('a', { href: '#/launch', class: 'button' }, 'Launch a run'),
    ),
    landingPart,
    listPart,
  );

  const updateSelection = () => {
    compareButton.disabled = picked.length < 2;
    clearButton.disabled = picked.length === 0;
    compareHint.textContent = picked.length < 2
      ? `Select two or more runs to compare (${picked.length} selected).`
      : `${picked.length} selected; the first picked is the baseline (you can change it on the compare page).`;
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
  let all = [];

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
      message.textContent = `Could not load runs: ${e.message}${failures > 1 ? ' (retrying)' : ''}`;
      schedule(Math.min(30000, POLL_MS * 2 ** failures));
      return;
    }
    if (ctx.signal.aborted) return;
    // Drop picks of runs that no longer exist.
    for (let i = picked.length - 1; i >= 0; i--) if (!runs.some((r) => r.id === picked[i])) picked.splice(i, 1);
    all = runs;
    render();
    const active = runs.filter((r) => isActive(r.status)).length;
    count.textContent = `${runs.length} run${runs.length === 1 ? '' : 's'}${active ? `, ${active} queued or running (refreshing every 2 s)` : ''}.`;
    if (!first) {
      const changes = runs.filter((r) => statuses.has(r.id) && statuses.get(r.id) !== r.status);
      if (changes.length) ctx.announce(changes.map((r) => `${runLabel(r)} is ${r.status}.`).join(' '));
    }
    for (const r of runs) statuses.set(r.id, r.status);
    first = false;
    schedule(active ? POLL_MS : SLOW_POLL_MS);
  };

  let timer = null;
  const schedule = (ms) => {
    clearTimeout(timer);
    timer = setTimeout(load, ms);
  };
  ctx.signal.addEventListener('abort', () => clearTimeout(timer));

  const scoreNames = () => {
    const names = [];
    for (const r of all) for (const n of Object.keys(r.aggregates ?? {})) if (!names.includes(n)) names.push(n);
    return names;
  };
  const refreshOptions = () => {
    const tags = [...new Set(all.flatMap((r) => r.tags ?? []))].sort();
    const keepTag = view.tag;
    replace(tagSel, h('option', { value: '' }, 'All'), tags.map((t) => h('option', { value: t }, t)));
    tagSel.value = tags.includes(keepTag) ? keepTag : '';
    view.tag = tagSel.value;
    const sorts = [['newest', 'Newest first'], ['oldest', 'Oldest first'], ['name', 'Name'], ['lr', 'Learning rate, highest first'],
      ['r', 'LoRA rank, highest first'], ['trainLoss', 'Train loss, lowest first'], ['evalLoss', 'Eval loss, lowest first'],
      ...scoreNames().map((n) => [`score:${n}`, `${n}, best first`])];
    replace(sortSel, sorts.map(([v, l]) => h('option', { value: v }, l)));
    sortSel.value = sorts.some(([v]) => v === view.sort) ? view.sort : 'newest';
  };

  const visible = () => {
    const q = view.query.trim().toLowerCase();
    let list = all.filter((r) => {
      if (view.kind && r.kind !== view.kind) return false;
      if (view.status) {
        const o = outcome(r);
        const st = o === 'failed-scores' ? 'failed' : o;
        if (st !== view.status) return false;
      }
      if (view.tag && !(r.tags ?? []).includes(view.tag)) return false;
      if (!q) return true;
      const md = r.metadata ?? {};
      return [r.name, r.id, r.kind, md.model, md.adapter, md.adapter_name, md.dataset, r.notes, ...(r.tags ?? [])]
        .some((t) => String(t ?? '').toLowerCase().includes(q));
    });
    const by = view.sort;
    const cmpNum = (get, asc) => (a, b) => {
      const x = get(a);
      const y = get(b);
      if (x === undefined) return y === undefined ? 0 : 1;
      if (y === undefined) return -1;
      return asc ? x - y : y - x;
    };
    if (by === 'oldest') list = [...list].reverse();
    else if (by === 'name') list = [...list].sort((a, b) => runLabel(a).localeCompare(runLabel(b)));
    else if (by === 'lr') list = [...list].sort(cmpNum((r) => runFacts(r).lr, false));
    else if (by === 'r') list = [...list].sort(cmpNum((r) => runFacts(r).r, false));
    else if (by === 'trainLoss') list = [...list].sort(cmpNum((r) => runFacts(r).trainLoss, true));
    else if (by === 'evalLoss') list = [...list].sort(cmpNum((r) => runFacts(r).evalLoss, true));
    else if (by.startsWith('score:')) {
      const n = by.slice(6);
      const info = all.flatMap((r) => r.scores ?? []).find((x) => x.name === n);
      const asc = info ? !info.higher_is_better : false;
      list = [...list].sort(cmpNum((r) => r.aggregates?.[n]?.mean, asc));
    }
    return list;
  };

  const render = () => {
    const empty = all.length === 0;
    landingPart.hidden = !empty;
    listPart.hidden = empty;
    refreshOptions();
    // Rebuilding the rows is simplest; keep keyboard focus on the same control across it.
    const focusKey = document.activeElement?.closest?.('tbody') === tbody ? document.activeElement.dataset.focusKey : null;
    const list = visible();
    replace(tbody, list.map((run) => row(run)));
    table.hidden = list.length === 0;
    noMatch.hidden = list.length > 0 || empty;
    updateSelection();
    if (focusKey) tbody.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus();
  };
  search.addEventListener('input', () => {
    view.query = search.value;
    render();
  });
  for (const [sel, key] of [[kindSel, 'kind'], [statusSel, 'status'], [tagSel, 'tag'], [sortSel, 'sort']]) {
    sel.addEventListener('change', () => {
      view[key] = sel.value;
      render();
    });
  }

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
    const f = runFacts(run);
    // A training run's `adapter` is the folder it wrote; its name is what people pick.
    const adapter = md.adapter_name || md.adapter;
    return h('tr', { 'data-run-id': run.id, 'data-status': run.status, 'data-outcome': outcome(run) },
      h('td', {}, box),
      h('th', { scope: 'row' },
        h('a', { href: `#/runs/${encodeURIComponent(run.id)}`, 'data-focus-key': `link:${run.id}` }, label),
        h('div', { class: 'muted mono small' }, shortId(run.id)),
        (run.tags ?? []).length ? h('ul', { class: 'tags', 'aria-label': 'Tags of the run' }, run.tags.map((t) => h('li', {}, t))) : null,
      ),
      h('td', {}, runBadge(run), progressText(run)),
      h('td', {}, run.kind),
      h('td', {}, modelCell(md.model || md.base_model), adapter ? h('div', { class: 'small muted' }, adapter.split('/').pop()) : null),
      h('td', { class: 'num' }, f.lr === undefined ? '—' : f.lr.toExponential(0).replace('-', '−')),
      h('td', { class: 'num' }, f.r ?? '—'),
      h('td', { class: 'num' }, num(f.trainLoss)),
      h('td', { class: 'num' }, num(f.evalLoss)),
      h('td', {}, keyMetrics(run)),
      h('td', {}, h('time', { datetime: run.created ?? '' }, dateTime(run.created))),
    );
  };

  await load();
}

/**
 * A model as the list shows it: a local folder by its last part (the whole path on hover and
 * in the run's settings), so a long path does not take three lines; names and hub ids whole.
 */
function modelCell(model) {
  if (!model) return '—';
  const local = /^([/~.]|[A-Za-z]:\\)/.test(model);
  const parts = model.split(/[/\\]/).filter(Boolean);
  if (!local || parts.length < 2) return model;
  return h('span', { title: model }, `…/${parts[parts.length - 1]}`);
}

/** What adapterlab does, for a first visit with no runs, and a one-click quick start. */
function landing(ctx) {
  const box = h('p', { role: 'alert', class: 'form-error', hidden: true });
  const quick = h('button', { type: 'button', class: 'primary', 'data-testid': 'quick-start' }, 'Quick start: score the base model on the bundled data');
  quick.addEventListener('click', async () => {
    quick.disabled = true;
    box.hidden = true;
    const { label, mode, ...decoding } = DECODING_PRESETS.greedy;
    try {
      const res = await api.createRun({
        kind: 'generate', name: 'quick start: smollm2 base', model: 'smollm2', dataset: 'bundled', split: 'test', limit: 20,
        ...Object.fromEntries(Object.entries(decoding).filter(([, v]) => v !== '')), temperature: 0,
        metrics: ['rouge'], settings: {}, score_references: false,
      });
      ctx.announce('Quick start launched.');
      window.location.hash = `#/runs/${encodeURIComponent(res.id)}`;
    } catch (e) {
      box.textContent = `The server refused the quick start: ${e.message}`;
      box.hidden = false;
      quick.disabled = false;
    }
  });
  return h('section', { class: 'panel landing', 'aria-labelledby': 'landing-h', 'data-testid': 'landing' },
    h('h2', { id: 'landing-h' }, 'Fine-tune small adapters, then measure them honestly'),
    h('p', {}, 'adapterlab trains QLoRA adapters (a frozen 4-bit base model with small LoRA weights on top), generates with them, scores the outputs with metric plugins (ROUGE, BLEU, BERTScore, an LLM judge, or your own WebAssembly plugin), and compares versions with paired 95% intervals, down to the words that changed in each sample.'),
    h('ol', {},
      h('li', {}, h('a', { href: '#/launch?kind=train' }, 'Train an adapter'), ' on the bundled dialogue-summary set or your own JSON/CSV data.'),
      h('li', {}, h('a', { href: '#/launch?kind=generate' }, 'Generate and score'), ' with the base model or an adapter; every decoding setting is shown and kept with the run.'),
      h('li', {}, h('a', { href: '#/launch' }, 'Evaluate a predictions file'), ' (JSON Lines) you made elsewhere.'),
      h('li', {}, 'Pick two or more finished runs here and ', h('strong', {}, 'Compare'), ' them.'),
    ),
    h('p', { class: 'muted' }, 'No runs yet. The quick start generates summaries for 20 rows of the bundled test split with the base model (greedy, no repetition penalty) and scores them with ROUGE; it downloads the model the first time.'),
    h('div', { class: 'actions' }, quick),
    box,
  );
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
  const missing = (run.scores ?? []).filter((s) => !(s.name in aggs)).map((s) => s.name);
  if (order.length === 0) {
    if (run.error) return h('span', { class: 'small error-text' }, truncate(run.error, 80));
    if (run.status === 'done' && missing.length) return h('span', { class: 'small error-text' }, `no ${missing.join(', ')}: failed on every sample`);
    return '—';
  }
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
