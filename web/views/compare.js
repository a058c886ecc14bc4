// The compare page: two or more runs side by side. Each score's mean per run, the difference
// from the first run (the baseline) with its paired 95% interval and a verdict, charts of both,
// and the samples, sorted by how much the runs disagree, with a drill-down that shows each run's
// output next to the baseline's with word-level differences highlighted.
//
// URL: #/compare?runs=A,B[,C…][&sample=ID]. Changing only `sample` updates the page in place.
// The first run is the baseline; the Baseline control reorders `runs` to make another one first.
// Keys: j / k for the next / previous sample (list and drill-down).

import { api } from '../lib/api.js';
import { deltaForest, runColor, scoreBars, verdictText } from '../lib/charts.js';
import { wordDiff, diffStats } from '../lib/diff.js';
import { h, replace } from '../lib/dom.js';
import { interval, num, runLabel, shortId, signed } from '../lib/format.js';
import { direction } from './run.js';
import { messageBox, referencesOf, referencesView, reportControl, runBadge } from './common.js';

const PAGE = 50;

export async function mountCompare(main, ctx) {
  ctx.setTitle('Compare');
  const ids = (ctx.params.get('runs') ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  const pickerHost = h('section', { 'aria-labelledby': 'picker-h', class: 'panel' });
  const results = h('div', { 'data-testid': 'compare-results' });
  replace(main, h('h1', {}, 'Compare runs'), pickerHost, results);

  const runsPromise = api.runs({ signal: ctx.signal });
  renderPicker(pickerHost, ids, runsPromise, ctx);
  if (ids.length < 2) {
    return null;
  }
  results.append(h('p', { class: 'muted', role: 'status' }, 'Comparing…'));
  let data;
  try {
    data = await api.compare(ids, { signal: ctx.signal });
  } catch (e) {
    if (ctx.signal.aborted) throw e;
    replace(results, h('p', { class: 'form-error', role: 'alert' }, `Could not compare these runs: ${e.message}`));
    return null;
  }
  const view = renderResults(results, data, ids, ctx);
  view.showSample(ctx.params.get('sample'), { initial: true });
  return {
    update(params) {
      const next = (params.get('runs') ?? '').split(',').map((s) => s.trim()).filter(Boolean);
      if (next.join(',') !== ids.join(',')) return false;
      view.showSample(params.get('sample'));
      return true;
    },
  };
}

// --- Choosing runs ----------------------------------------------------------------------------

async function renderPicker(host, ids, runsPromise, ctx) {
  const heading = h('h2', { id: 'picker-h' }, 'Runs to compare');
  replace(host, heading, h('p', { class: 'muted' }, 'Loading runs…'));
  let runs;
  try {
    runs = await runsPromise;
  } catch (e) {
    if (ctx.signal.aborted) return;
    replace(host, heading, h('p', { class: 'form-error', role: 'alert' }, `Could not load runs: ${e.message}`));
    return;
  }
  // Only runs with per-sample scores can be compared.
  const candidates = runs.filter((r) => r.kind !== 'train' && r.status === 'done');
  const unfinished = runs.filter((r) => r.kind !== 'train' && r.status !== 'done').length;
  const picked = ids.filter((id) => candidates.some((r) => r.id === id));
  const summary = h('p', { id: 'picker-summary', class: 'muted', 'aria-live': 'polite' });
  const button = h('button', { type: 'submit', class: 'primary', 'aria-describedby': 'picker-summary' }, 'Compare');
  const update = () => {
    button.disabled = picked.length < 2;
    const names = picked.map((id) => runLabel(candidates.find((r) => r.id === id)));
    summary.textContent = picked.length === 0
      ? 'Pick two or more runs; the first you pick is the baseline.'
      : `Baseline: ${names[0]}${names.length > 1 ? `; compared: ${names.slice(1).join(', ')}` : '; pick at least one more.'}`;
  };
  const list = h('ul', { class: 'plain picker', 'data-testid': 'compare-picker' }, candidates.map((r) => {
    const box = h('input', { type: 'checkbox', id: `pick-${r.id}`, value: r.id, 'data-testid': `pick-${r.id}` });
    box.checked = picked.includes(r.id);
    box.addEventListener('change', () => {
      const i = picked.indexOf(r.id);
      if (box.checked && i === -1) picked.push(r.id);
      if (!box.checked && i !== -1) picked.splice(i, 1);
      update();
    });
    return h('li', { class: 'check' }, box,
      h('label', { for: `pick-${r.id}` }, runLabel(r),
        h('span', { class: 'muted small' }, ` · ${r.kind} · ${shortId(r.id)} · `), runBadge(r)));
  }));
  const form = h('form', { class: 'picker-form' },
    candidates.length ? h('fieldset', {}, h('legend', {}, 'Finished evaluation runs'), list) : h('p', { class: 'muted' }, 'There are no finished evaluation runs yet.'),
    unfinished ? h('p', { class: 'muted small' }, `${unfinished} evaluation run${unfinished === 1 ? ' is' : 's are'} not listed because ${unfinished === 1 ? 'it has' : 'they have'} not finished.`) : null,
    summary,
    h('div', { class: 'actions' }, button),
  );
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (picked.length >= 2) window.location.hash = `#/compare?runs=${picked.map(encodeURIComponent).join(',')}`;
  });
  update();
  const body = ids.length >= 2
    ? h('details', {}, h('summary', {}, `Change the selection (${candidates.length} runs available)`), form)
    : form;
  replace(host, heading, body);
}

// --- Results ------------------------------------------------------------------------------------

function verdictOf(delta) {
  if (!delta) return 'ns';
  if (delta.verdict === true) return 'better';
  if (delta.verdict === false) return 'worse';
  // No verdict field at all: derive it from `significant` and the sign.
  if (delta.verdict === undefined && delta.significant) {
    const up = delta.difference.mean > 0;
    return up === (delta.higher_is_better !== false) ? 'better' : 'worse';
  }
  return 'ns';
}

const VERDICT_ICON = { better: '▲', worse: '▼', ns: '≈' };
function verdictBadge(v) {
  return h('span', { class: `badge verdict-${v}`, 'data-verdict': v },
    h('span', { 'aria-hidden': 'true' }, VERDICT_ICON[v]), ' ', verdictText(v));
}

function renderResults(host, data, ids, ctx) {
  const runs = data.runs ?? [];
  const scores = data.scores ?? [];
  const deltas = data.deltas ?? [];
  const samples = data.samples ?? [];
  const labels = uniqueLabels(runs);
  const baseLink = `#/compare?runs=${ids.map(encodeURIComponent).join(',')}`;
  const deltaFor = (runIndex, score) => deltas.find((d) => d.score === score && (d.run === runs[runIndex].id || d.run === runs[runIndex].name));

  // Scores table: one column per run; each non-baseline cell also holds its difference from the
  // baseline, so five runs need six columns, not ten.
  const table = h('table', { class: 'data compare-table', 'data-testid': 'compare-table' },
    h('caption', {}, `Mean [95% interval] per run; under each, the difference from the baseline, ${labels[0]}, with its paired 95% interval`),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Score'),
      runs.map((r, i) => h('th', { scope: 'col', class: 'num' }, swatch(i), labels[i], i === 0 ? h('span', { class: 'muted small' }, ' (baseline)') : null)),
    )),
    h('tbody', {}, scores.map((s) => h('tr', { 'data-score': s.name },
      h('th', { scope: 'row' }, s.name, ' ', direction(s), h('div', { class: 'muted small' }, s.metric ?? '')),
      runs.map((r, i) => {
        const a = r.aggregates?.[s.name];
        const mean = a ? [num(a.mean), ' ', h('span', { class: 'muted small' }, interval(a))] : '—';
        if (i === 0) return h('td', { class: 'num' }, mean);
        const d = deltaFor(i, s.name);
        if (!d) return h('td', { class: 'num' }, mean, h('div', { class: 'muted small' }, 'Δ —'));
        const v = verdictOf(d);
        return h('td', { class: 'num' }, mean,
          h('div', { class: `delta delta-${v}`, 'data-testid': 'delta', title: d.paired !== undefined ? `${d.paired} paired samples` : null },
            h('span', { class: 'visually-hidden' }, `difference from ${labels[0]}: `),
            h('span', { 'aria-hidden': 'true' }, 'Δ '),
            h('span', { class: 'delta-mean' }, signed(d.difference.mean)), ' ',
            h('span', { class: 'muted small' }, interval(d.difference, signed)), ' ',
            verdictBadge(v)));
      }),
    ))),
  );

  // Baseline: another run first in `runs`, the rest in their order.
  const baseline = h('select', { id: 'baseline-select', 'data-testid': 'baseline-select' },
    runs.map((r, i) => h('option', { value: String(i) }, labels[i])));
  baseline.addEventListener('change', () => {
    const i = Number(baseline.value);
    const order = [ids[i], ...ids.filter((_, j) => j !== i)];
    window.location.hash = `#/compare?runs=${order.map(encodeURIComponent).join(',')}`;
  });
  const glossary = h('p', { class: 'muted small explain', 'data-testid': 'glossary' },
    h('strong', {}, 'Δ'), ' is a run’s mean minus the baseline’s, over the samples both scored (paired). ',
    h('strong', {}, 'Better'), ' / ', h('strong', {}, 'worse'), ': its 95% interval (paired bootstrap) lies entirely on one side of zero, in the score’s good or bad direction; ',
    h('strong', {}, 'not significant'), ': the interval contains zero. ↑ / ↓: higher or lower is better.');

  const corpusNames = [...new Set(runs.flatMap((r) => Object.keys(r.corpus ?? {})))];
  const corpusTable = corpusNames.length ? h('table', { class: 'data' },
    h('caption', {}, 'Corpus-level statistics (no intervals)'),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Statistic'), runs.map((r, i) => h('th', { scope: 'col', class: 'num' }, labels[i])))),
    h('tbody', {}, corpusNames.map((n) => h('tr', {}, h('th', { scope: 'row' }, n), runs.map((r) => h('td', { class: 'num' }, num(r.corpus?.[n])))))),
  ) : null;

  // Charts.
  const bars = h('div', { class: 'small-multiples' }, scores.map((s) => h('figure', { class: 'chart' },
    h('figcaption', {}, s.name, ' ', direction(s)),
    scoreBars(s, runs.map((r, i) => ({ label: labels[i], color: runColor(i), est: r.aggregates?.[s.name] }))),
  )));
  const forestRows = [];
  for (const s of scores) {
    runs.slice(1).forEach((r, j) => {
      const d = deltaFor(j + 1, s.name);
      const range = Number.isFinite(s.max - s.min) && s.max > s.min ? s.max - s.min : null;
      if (d) forestRows.push({ label: runs.length > 2 ? `${s.name} · ${labels[j + 1]}` : s.name, difference: d.difference, verdict: verdictOf(d), range });
    });
  }

  const legend = h('ul', { class: 'legend plain' }, runs.map((r, i) => h('li', {}, swatch(i), h('a', { href: `#/runs/${encodeURIComponent(r.id)}` }, labels[i]), ' ', runBadge(r))));

  const samplesHost = h('section', { 'aria-labelledby': 'samples-h', class: 'panel', 'data-testid': 'compare-samples' });
  const box = messageBox();

  replace(host,
    h('div', { class: 'toolbar' },
      legend,
      h('div', { class: 'field inline' }, h('label', { for: 'baseline-select' }, 'Baseline'), baseline),
      reportControl(ids, 'compare-report')),
    h('section', { 'aria-labelledby': 'scores-h', class: 'panel' },
      h('h2', { id: 'scores-h' }, 'Scores'),
      glossary,
      scores.length ? h('div', { class: 'table-scroll' }, table) : h('p', { class: 'muted' }, 'These runs share no scores.'),
      corpusTable ? h('div', { class: 'table-scroll' }, corpusTable) : null,
    ),
    scores.length ? h('section', { 'aria-labelledby': 'charts-h', class: 'panel' },
      h('h2', { id: 'charts-h' }, 'Charts'),
      h('h3', {}, 'Means with 95% intervals'),
      bars,
      forestRows.length ? [
        h('h3', {}, `Differences against ${labels[0]}`),
        h('p', { class: 'muted small' }, 'One scale for every row: each difference as a share of its score’s range (so ROUGE’s 0–1 and BLEU’s 0–100 compare); the raw difference is printed on the right. The dashed line is zero; an interval that crosses it is not significant.'),
        h('div', { class: 'table-scroll' }, deltaForest(forestRows)),
      ] : null,
    ) : null,
    box.el,
    samplesHost,
  );

  return samplesView(samplesHost, { runs, labels, scores, samples, baseLink, ctx });
}

function uniqueLabels(runs) {
  const labels = runs.map((r) => runLabel(r));
  return labels.map((l, i) => (labels.indexOf(l) !== i || labels.lastIndexOf(l) !== i ? `${l} (${shortId(runs[i].id)})` : l));
}

function swatch(i) {
  return h('span', { class: 'swatch', style: { background: runColor(i) }, 'aria-hidden': 'true' });
}

// --- Samples --------------------------------------------------------------------------------------

function differs(sample) {
  const preds = (sample.predictions ?? []).map((p) => (p ?? '').trim());
  if (preds.some((p) => p !== preds[0])) return true;
  const sc = sample.scores ?? [];
  return Object.keys(sc[0] ?? {}).some((k) => sc.some((m) => m?.[k] !== sc[0][k]));
}

function samplesView(host, { runs, labels, scores, samples, baseLink, ctx }) {
  // Samples pair by id: runs over different rows (another split, another dataset) share none,
  // and an empty table with its controls would read as broken.
  if (!samples.length) {
    replace(host, h('h2', { id: 'samples-h' }, 'Samples'),
      h('p', { class: 'muted', 'data-testid': 'samples-count' }, 'These runs share no samples: samples are paired by id, so runs over different rows (another split or dataset) cannot be compared sample by sample.'));
    return { showSample() {} };
  }
  // Sort keys: 'disagreement' | 'score:NAME:RUN' | 'delta:NAME:RUN'.
  const state = { sort: 'disagreement', desc: true, query: '', onlyDiffer: false, shown: PAGE };
  const value = (s, key) => {
    if (key === 'disagreement') return s.disagreement;
    const [kind, i, ...rest] = key.split(':');
    const name = rest.join(':');
    const v = s.scores?.[Number(i)]?.[name];
    if (kind === 'score') return v;
    const b = s.scores?.[0]?.[name];
    return v === undefined || v === null || b === undefined || b === null ? undefined : v - b;
  };
  const ordered = () => {
    const q = state.query.toLowerCase();
    let list = samples.filter((s) => (!state.onlyDiffer || differs(s))
      && (!q || [s.id, s.source, ...referencesOf(s), ...(s.predictions ?? [])].some((t) => String(t ?? '').toLowerCase().includes(q))));
    if (state.sort !== 'disagreement' || !state.desc) {
      list = [...list].sort((a, b) => {
        const x = value(a, state.sort);
        const y = value(b, state.sort);
        if (x === undefined || x === null || Number.isNaN(x)) return 1;
        if (y === undefined || y === null || Number.isNaN(y)) return -1;
        return state.desc ? y - x : x - y;
      });
    }
    return list;
  };
  const sampleLink = (id) => `${baseLink}&sample=${encodeURIComponent(id)}`;

  const query = h('input', { type: 'search', id: 'sample-filter', placeholder: 'id or text' });
  query.addEventListener('input', () => {
    state.query = query.value;
    state.shown = PAGE;
    renderTable();
  });
  const only = h('input', { type: 'checkbox', id: 'only-differ' });
  only.addEventListener('change', () => {
    state.onlyDiffer = only.checked;
    state.shown = PAGE;
    renderTable();
  });
  const sortSelect = h('select', { id: 'sample-sort' },
    h('option', { value: 'disagreement' }, 'Disagreement'),
    scores.map((s) => [
      ...runs.map((r, i) => h('option', { value: `score:${i}:${s.name}` }, `${s.name} · ${labels[i]}`)),
      ...runs.slice(1).map((r, j) => h('option', { value: `delta:${j + 1}:${s.name}` }, `Δ ${s.name} · ${labels[j + 1]} − ${labels[0]}`)),
    ]),
  );
  const dirSelect = h('select', { id: 'sample-order' }, h('option', { value: 'desc' }, 'Largest first'), h('option', { value: 'asc' }, 'Smallest first'));
  const setSort = (key, desc) => {
    state.sort = key;
    state.desc = desc;
    // Sorting by a score shows that score's columns.
    const name = key.split(':').slice(2).join(':');
    if (name && name !== state.score) {
      state.score = name;
      scoreSelect.value = name;
      renderHead();
    }
    sortSelect.value = key;
    dirSelect.value = desc ? 'desc' : 'asc';
    state.shown = PAGE;
    renderTable();
  };
  sortSelect.addEventListener('change', () => setSort(sortSelect.value, state.desc));
  dirSelect.addEventListener('change', () => setSort(state.sort, dirSelect.value === 'desc'));

  const count = h('p', { class: 'muted', 'aria-live': 'polite', 'data-testid': 'samples-count' });
  const tbody = h('tbody');
  const more = h('button', { type: 'button' }, `Show ${PAGE} more`);
  more.addEventListener('click', () => {
    state.shown += PAGE;
    renderTable();
  });

  // The table shows one score at a time (the Scores control), one column per run, each
  // non-baseline cell with its difference from the baseline below: five runs stay readable at
  // 1280 px, where a column per (score, run, delta) did not.
  state.score = scores[0]?.name ?? null;
  const scoreSelect = h('select', { id: 'sample-score' }, scores.map((sc) => h('option', { value: sc.name }, sc.name)));
  scoreSelect.addEventListener('change', () => {
    state.score = scoreSelect.value;
    if (state.sort !== 'disagreement') {
      const [kind, i] = state.sort.split(':');
      state.sort = `${kind}:${i}:${state.score}`;
      sortSelect.value = state.sort;
    }
    renderHead();
    renderTable();
  });

  // Column headers are sort buttons; aria-sort on the header tells which one is active.
  // The visible text starts each button's name (what voice control users say); hidden words add
  // which score the column is and that pressing it sorts.
  const sortButton = (key, text, context) => {
    const btn = h('button', { type: 'button', class: 'sort-button' },
      text, h('span', { class: 'visually-hidden' }, context ? ` (${context}): sort` : ': sort'), h('span', { class: 'sort-icon', 'aria-hidden': 'true' }));
    btn.addEventListener('click', () => setSort(key, state.sort === key ? !state.desc : true));
    return btn;
  };
  const sortHeader = (key, text, context) => h('th', { scope: 'col', class: 'num', 'data-sort-key': key }, sortButton(key, text, context));
  const thead = h('thead');
  const renderHead = () => replace(thead, h('tr', {},
    h('th', { scope: 'col' }, 'Sample'),
    h('th', { scope: 'col' }, 'Reference and predictions'),
    h('th', { scope: 'col', class: 'num', 'data-sort-key': 'disagreement' }, sortButton('disagreement', 'Disagreement')),
    state.score ? runs.map((r, i) => sortHeader(`score:${i}:${state.score}`, labels[i], state.score)) : null,
  ));
  renderHead();
  const table = h('table', { class: 'data compare-samples', 'data-testid': 'compare-samples-table' },
    h('caption', { class: 'visually-hidden' }, 'Samples of the compared runs'),
    thead,
    tbody,
  );
  const listPart = h('div', { 'data-testid': 'samples-list' },
    h('p', { class: 'muted small explain' }, h('strong', {}, 'Disagreement'), ': how differently the runs scored a sample: for each score, the gap between the best and worst run as a share of the score’s range, summed over the scores. Keys: ', h('kbd', {}, 'j'), ' next sample, ', h('kbd', {}, 'k'), ' previous.'),
    h('div', { class: 'toolbar' },
      h('div', { class: 'field inline' }, h('label', { for: 'sample-filter' }, 'Filter'), query),
      h('div', { class: 'field inline' }, h('label', { for: 'sample-score' }, 'Score shown'), scoreSelect),
      h('div', { class: 'field inline' }, h('label', { for: 'sample-sort' }, 'Sort by'), sortSelect),
      h('div', { class: 'field inline' }, h('label', { for: 'sample-order' }, 'Order'), dirSelect),
      h('div', { class: 'check' }, only, h('label', { for: 'only-differ' }, 'Only where runs differ')),
    ),
    count,
    h('div', { class: 'table-scroll' }, table),
    more,
  );
  const detail = h('div', { 'data-testid': 'sample-detail', hidden: true });
  replace(host, h('h2', { id: 'samples-h' }, 'Samples'), detail, listPart);

  function renderTable() {
    for (const th of table.querySelectorAll('th[data-sort-key]')) {
      const active = th.dataset.sortKey === state.sort;
      if (active) th.setAttribute('aria-sort', state.desc ? 'descending' : 'ascending');
      else th.removeAttribute('aria-sort');
      const icon = th.querySelector('.sort-icon');
      if (icon) icon.textContent = active ? (state.desc ? ' ▼' : ' ▲') : '';
    }
    const list = ordered();
    const sc = scores.find((x) => x.name === state.score);
    replace(tbody, list.slice(0, state.shown).map((s, rank) => h('tr', { 'data-sample-id': s.id },
      h('th', { scope: 'row' },
        h('a', { href: sampleLink(s.id), 'data-testid': 'open-sample', 'aria-label': `Open sample ${s.id} (rank ${rank + 1})` }, s.id)),
      h('td', { class: 'texts-cell' },
        h('div', { class: 'text clamp-2 reference-line' }, h('span', { class: 'muted' }, referencesOf(s).length > 1 ? `Reference 1 of ${referencesOf(s).length}: ` : 'Reference: '), referencesOf(s)[0]),
        h('ul', { class: 'plain predictions' }, runs.map((r, i) => h('li', { class: 'text clamp-2' },
          swatch(i), h('span', { class: 'visually-hidden' }, `${labels[i]}: `), (s.predictions ?? [])[i] ?? h('span', { class: 'muted' }, 'no prediction'))))),
      h('td', { class: 'num' }, num(s.disagreement)),
      sc ? runs.map((r, i) => {
        const v = s.scores?.[i]?.[sc.name];
        if (i === 0) return h('td', { class: 'num' }, num(v));
        const d = value(s, `delta:${i}:${sc.name}`);
        const better = d === undefined || d === 0 ? '' : (d > 0) === (sc.higher_is_better !== false) ? 'up' : 'down';
        return h('td', { class: 'num' }, num(v), h('div', { class: `small sample-delta ${better}` }, d === undefined ? '' : `Δ ${signed(d)}`));
      }) : null,
    )));
    count.textContent = `${list.length} of ${samples.length} samples${state.onlyDiffer ? ' where the runs differ' : ''}; showing ${Math.min(state.shown, list.length)}.`;
    more.hidden = list.length <= state.shown;
  }
  renderTable();

  let lastOpened = null;
  let openId = null;

  // j / k: next / previous sample. In the drill-down they open it; in the list they move focus
  // along the samples' links (Enter opens). Typing in a field is left alone.
  const onKey = (e) => {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || (e.key !== 'j' && e.key !== 'k')) return;
    if (e.target.closest?.('input, textarea, select, [contenteditable=""], [contenteditable="true"]')) return;
    if (document.querySelector('dialog[open]')) return;
    const step = e.key === 'j' ? 1 : -1;
    const list = ordered();
    if (openId) {
      const pos = list.findIndex((x) => x.id === openId);
      const next = list[pos + step];
      if (next) {
        e.preventDefault();
        window.location.hash = sampleLink(next.id);
      }
      return;
    }
    const links = [...tbody.querySelectorAll('a[data-testid="open-sample"]')];
    if (!links.length) return;
    const at = links.indexOf(document.activeElement);
    const target = links[at === -1 ? (step > 0 ? 0 : links.length - 1) : Math.max(0, Math.min(links.length - 1, at + step))];
    e.preventDefault();
    target.focus();
    target.scrollIntoView({ block: 'nearest' });
  };
  document.addEventListener('keydown', onKey);
  ctx.signal.addEventListener('abort', () => document.removeEventListener('keydown', onKey), { once: true });

  return {
    showSample(id, { initial = false } = {}) {
      openId = id || null;
      if (!id) {
        detail.hidden = true;
        detail.replaceChildren();
        listPart.hidden = false;
        ctx.setTitle('Compare');
        if (lastOpened && !initial) {
          tbody.querySelector(`tr[data-sample-id="${CSS.escape(lastOpened)}"] a`)?.focus();
        }
        return;
      }
      const sample = samples.find((s) => s.id === id);
      lastOpened = id;
      listPart.hidden = true;
      detail.hidden = false;
      if (!sample) {
        replace(detail, h('h3', { tabindex: -1 }, `No sample ${id}`), h('p', {}, h('a', { href: baseLink }, 'Back to all samples')));
        detail.querySelector('h3').focus();
        return;
      }
      const list = ordered();
      const pos = list.findIndex((s) => s.id === id);
      const prev = pos > 0 ? list[pos - 1] : null;
      const next = pos >= 0 && pos < list.length - 1 ? list[pos + 1] : null;
      ctx.setTitle(`Sample ${id}`);
      replace(detail, sampleDetail(sample, { runs, labels, scores, baseLink, prev, next, pos, total: list.length, sampleLink }));
      const heading = detail.querySelector('h3');
      heading.focus();
      heading.scrollIntoView({ block: 'start' });
      ctx.announce(`Sample ${id}.`);
    },
  };
}

function sampleDetail(sample, { runs, labels, scores, baseLink, prev, next, pos, total, sampleLink }) {
  const preds = sample.predictions ?? [];
  const base = preds[0];
  const showDiff = h('input', { type: 'checkbox', id: 'show-diff' });
  showDiff.checked = true;
  const columns = h('div', { class: 'summaries', 'data-testid': 'summaries' }, runs.map((r, i) => {
    const text = preds[i];
    let body;
    let stats = null;
    if (text === null || text === undefined) body = h('p', { class: 'muted' }, 'No prediction for this sample.');
    else if (i === 0) body = h('p', { class: 'summary-text' }, text);
    else {
      const runsDiff = wordDiff(base ?? '', text);
      const s = diffStats(runsDiff);
      stats = h('p', { class: 'muted small' }, s.ins || s.del ? `${s.ins} word${s.ins === 1 ? '' : 's'} added, ${s.del} removed compared with ${labels[0]}.` : `Same words as ${labels[0]}.`);
      body = h('p', { class: 'summary-text diff', 'data-testid': 'diff' }, runsDiff.map((d) => [
        d.space,
        d.op === 'same' ? d.text
          : d.op === 'ins' ? h('ins', {}, h('span', { class: 'visually-hidden' }, '[added: '), d.text, h('span', { class: 'visually-hidden' }, ']'))
            : h('del', {}, h('span', { class: 'visually-hidden' }, '[removed: '), d.text, h('span', { class: 'visually-hidden' }, ']')),
      ]));
    }
    return h('section', { class: 'summary', 'aria-labelledby': `summary-h-${i}`, 'data-testid': `summary-${i}`, style: { borderTopColor: runColor(i) } },
      h('h4', { id: `summary-h-${i}` }, swatch(i), labels[i], i === 0 ? ' (baseline)' : ''),
      body,
      stats,
    );
  }));
  showDiff.addEventListener('change', () => columns.classList.toggle('no-diff', !showDiff.checked));

  const scoreTable = h('table', { class: 'data', 'data-testid': 'sample-scores' },
    h('caption', {}, 'Scores on this sample'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Score'),
      runs.map((r, i) => h('th', { scope: 'col', class: 'num' }, labels[i])),
      runs.slice(1).map((r, j) => h('th', { scope: 'col', class: 'num' }, `Δ ${labels[j + 1]}`)),
    )),
    h('tbody', {}, scores.map((s) => h('tr', {},
      h('th', { scope: 'row' }, s.name, ' ', direction(s)),
      runs.map((r, i) => h('td', { class: 'num' }, num(sample.scores?.[i]?.[s.name]))),
      runs.slice(1).map((r, j) => {
        const a = sample.scores?.[0]?.[s.name];
        const b = sample.scores?.[j + 1]?.[s.name];
        return h('td', { class: 'num' }, a === undefined || b === undefined ? '—' : signed(b - a));
      }),
    ))),
  );

  return h('article', { class: 'sample-detail', 'aria-labelledby': 'sample-h' },
    h('nav', { class: 'sample-nav', 'aria-label': 'Samples' },
      h('a', { href: baseLink }, '← All samples'),
      prev ? h('a', { href: sampleLink(prev.id), rel: 'prev' }, '‹ Previous') : null,
      pos >= 0 ? h('span', { class: 'muted' }, `${pos + 1} of ${total}`) : null,
      next ? h('a', { href: sampleLink(next.id), rel: 'next' }, 'Next ›') : null,
      h('span', { class: 'muted small' }, 'Keys: ', h('kbd', {}, 'j'), ' next, ', h('kbd', {}, 'k'), ' previous'),
    ),
    h('h3', { id: 'sample-h', tabindex: -1 }, `Sample ${sample.id}`),
    h('p', { class: 'muted' }, `Disagreement ${num(sample.disagreement)}`),
    h('div', { class: 'sample-texts' },
      h('section', { 'aria-labelledby': 'source-h', class: 'source' },
        h('h4', { id: 'source-h' }, 'Dialogue (source)'),
        sample.source ? h('p', { class: 'summary-text', 'data-testid': 'sample-source' }, sample.source) : h('p', { class: 'muted' }, 'No source text.')),
      h('section', { 'aria-labelledby': 'reference-h', class: 'reference' },
        h('h4', { id: 'reference-h' }, referencesOf(sample).length > 1 ? `References (${referencesOf(sample).length})` : 'Reference'),
        referencesView(sample, { className: 'summary-text', testid: 'sample-reference' })),
    ),
    h('div', { class: 'section-head' },
      h('h4', {}, 'Summaries'),
      h('div', { class: 'check' }, showDiff, h('label', { for: 'show-diff' }, `Highlight differences from ${labels[0]}`)),
    ),
    h('p', { class: 'muted small legend-text' }, 'Highlighted: ', h('ins', {}, 'words added'), ' and ', h('del', {}, 'words removed'), ` compared with the baseline’s summary.`),
    columns,
    h('div', { class: 'table-scroll' }, scoreTable),
  );
}
