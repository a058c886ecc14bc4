// One run: its metadata and scores, and while it is queued or running a live view fed by the
// server-sent events at /api/runs/ID/events (progress, training loss and learning rate, tokens/s
// and ETA, the log). Eval runs also list their samples with per-sample scores and errors.
// Actions: Resume (interrupted, failed, cancelled), Cancel (queued, running), Clone (the launch
// form filled with this run's settings), Delete (finished runs), tags and notes. Every setting
// the run used is listed under Settings.

import { api } from '../lib/api.js';
import { lineChart, runColor } from '../lib/charts.js';
import { h, replace, throttleFrame } from '../lib/dom.js';
import { bytes, dateTime, duration, elapsed, interval, isActive, num, runLabel } from '../lib/format.js';
import { field, messageBox, outcome, referencesOf, referencesView, reportControl, runBadge } from './common.js';

const POLL_MS = 2000;
const SLOW_POLL_MS = 10000;
const MAX_LOG_LINES = 2000;
const SAMPLES_PAGE = 100;

export async function mountRun(main, ctx) {
  const id = ctx.id;
  let run = await api.run(id, { signal: ctx.signal });
  ctx.setTitle(runLabel(run));

  // --- Header and actions ---
  const statusSlot = h('span', { 'data-testid': 'run-status', 'data-status': run.status });
  const resumeButton = h('button', { type: 'button', class: 'primary', 'data-testid': 'resume-run' }, 'Resume');
  const cancelButton = h('button', { type: 'button', class: 'danger', 'data-testid': 'cancel-run' }, 'Cancel run');
  const cloneLink = h('a', { class: 'button', href: `#/launch?clone=${encodeURIComponent(run.id)}`, 'data-testid': 'clone-run' }, 'Clone');
  const deleteButton = h('button', { type: 'button', class: 'danger', 'data-testid': 'delete-run' }, 'Delete');
  const actionMessage = messageBox();
  const errorBox = h('div', { class: 'message form-error', role: 'alert', 'data-testid': 'run-error', hidden: true });
  // The interrupted state says what happened and offers the way on, in the same place.
  const bannerResume = h('button', { type: 'button', class: 'primary' }, 'Resume this run');
  const banner = h('div', { class: 'message banner', 'data-testid': 'run-banner', hidden: true });

  // --- Progress ---
  const progress = h('progress', { max: 1, value: 0, 'aria-labelledby': 'progress-label', 'data-testid': 'run-progress' });
  const progressText = h('span', { id: 'progress-text', class: 'num' });
  const progressSection = h('section', { 'aria-labelledby': 'progress-label', class: 'panel' },
    h('h2', { id: 'progress-label' }, 'Progress'),
    h('div', { class: 'progress-row' }, progress, progressText),
  );

  // --- Training: charts and live numbers ---
  const training = run.kind === 'train' ? trainingView() : null;

  // --- Scores, details, log, samples ---
  const scoresSection = h('section', { 'aria-labelledby': 'scores-h', class: 'panel' });
  const detailsSection = h('section', { 'aria-labelledby': 'details-h', class: 'panel' });
  const notes = notesView(run, ctx);
  const publish = run.kind === 'train' && run.status === 'done' && run.metadata?.adapter_name ? publishView(run, ctx) : null;
  // role=log on the scrolling box (a live region for additions); the lines are a plain list.
  const logList = h('ol', { class: 'plain' });
  const logBox = h('div', { class: 'log', role: 'log', 'aria-live': 'polite', 'aria-relevant': 'additions', 'aria-labelledby': 'log-h', tabindex: 0, 'data-testid': 'run-log' }, logList);
  const streamState = h('span', { class: 'muted small', 'data-testid': 'stream-state' });
  const logSection = h('section', { 'aria-labelledby': 'log-h', class: 'panel' },
    h('div', { class: 'section-head' }, h('h2', { id: 'log-h' }, 'Log'), streamState),
    logBox,
  );
  const samplesSection = run.kind === 'train' ? null : h('section', { 'aria-labelledby': 'samples-h', class: 'panel' },
    h('h2', { id: 'samples-h' }, 'Samples'), h('p', { class: 'muted' }, 'Samples appear when the run finishes.'));

  replace(main,
    h('nav', { 'aria-label': 'Breadcrumb', class: 'breadcrumb' }, h('a', { href: '#/runs' }, 'Runs'), ' / ', runLabel(run)),
    h('div', { class: 'page-head' },
      h('div', {},
        h('h1', {}, runLabel(run)),
        h('p', { class: 'muted' }, h('span', { class: 'kind' }, `${run.kind} run`), ' · ', h('span', { class: 'mono' }, run.id)),
      ),
      h('div', { class: 'head-actions', role: 'group', 'aria-label': 'Run actions' }, statusSlot, resumeButton, cancelButton, cloneLink, deleteButton),
    ),
    actionMessage.el,
    banner,
    errorBox,
    progressSection,
    training?.el,
    scoresSection,
    samplesSection,
    detailsSection,
    publish?.el,
    notes.el,
    logSection,
  );

  const renderRecord = () => {
    replace(statusSlot, runBadge(run));
    statusSlot.dataset.status = run.status;
    statusSlot.dataset.outcome = outcome(run);
    const resumable = ['interrupted', 'failed', 'cancelled'].includes(run.status);
    resumeButton.hidden = !resumable;
    cancelButton.hidden = !isActive(run.status);
    deleteButton.hidden = isActive(run.status);
    errorBox.hidden = !run.error;
    errorBox.textContent = run.error ? `This run failed: ${run.error}` : '';
    renderBanner();
    setProgress(run.progress);
    if (!isActive(run.status)) training?.settle();
    // The record is re-read every few seconds: rebuild a panel only when what it shows changed,
    // so focus and a half-chosen report format survive the polling.
    const scoresKey = JSON.stringify([run.status, run.scores, run.aggregates, run.reference_aggregates, run.corpus]);
    if (scoresKey !== shownScores) {
      shownScores = scoresKey;
      renderScores(scoresSection, run);
    }
    // Training runs have no scores of their own; keep the panel for runs that do.
    scoresSection.hidden = run.kind === 'train' && Object.keys(run.aggregates ?? {}).length === 0;
    const detailsKey = JSON.stringify([run.created, run.started, run.finished, run.metadata, run.request, run.usage, isActive(run.status)]);
    if (detailsKey !== shownDetails || isActive(run.status)) {
      shownDetails = detailsKey;
      renderDetails(detailsSection, run);
    }
  };
  let shownScores = null;
  let shownDetails = null;

  const setProgress = (p) => {
    if (!p) return;
    const total = p.total || 0;
    progress.max = Math.max(1, total);
    if (total > 0 || run.status === 'done') progress.value = run.status === 'done' && !total ? 1 : Math.min(p.done, total);
    else progress.removeAttribute('value'); // indeterminate until a total is known
    const pct = total ? ` (${Math.floor((100 * p.done) / total)}%)` : '';
    progressText.textContent = total ? `${p.done} / ${total} ${p.unit ?? ''}${pct}` : run.status === 'queued' ? 'waiting to start' : '';
    progressSection.hidden = !total && !isActive(run.status);
  };

  let firstErrors = null; // { count, example } from the samples, once loaded
  function renderBanner() {
    const o = outcome(run);
    if (run.status === 'interrupted') {
      banner.className = 'message banner status-banner-warn';
      replace(banner, h('p', {}, h('strong', {}, 'Interrupted. '),
        run.kind === 'train'
          ? 'The server stopped while this run was training. Resuming continues from its newest checkpoint.'
          : 'The server stopped while this run was working. Resuming starts it over.'),
      bannerResume);
      banner.hidden = false;
    } else if (o === 'failed-scores' || o === 'done-with-errors') {
      banner.className = 'message banner form-error';
      banner.setAttribute('role', 'alert');
      const missing = (run.scores ?? []).filter((sc) => !run.aggregates?.[sc.name]).map((sc) => sc.name);
      replace(banner, h('p', {},
        h('strong', {}, o === 'failed-scores' ? 'No scores: every metric failed on every sample. ' : 'Done with errors: '),
        `${missing.join(', ')} ${missing.length === 1 ? 'has' : 'have'} no value for any sample.`,
        firstErrors?.example ? [' The first error: ', h('span', { class: 'mono' }, firstErrors.example)] : ' The errors are in the samples table below.'));
      banner.hidden = false;
    } else {
      banner.hidden = true;
      banner.removeAttribute('role');
    }
  }

  renderRecord();

  // --- Resume, delete ---
  const resume = async (button) => {
    button.disabled = true;
    actionMessage.clear();
    try {
      const res = await api.resume(run.id);
      run = { ...run, status: res?.status ?? 'queued', error: null, finished: null };
      renderRecord();
      actionMessage.ok(`Resumed; the run is ${run.status}.`);
      ctx.announce(`Run ${run.status}.`);
      startLive();
    } catch (e) {
      actionMessage.error(`Could not resume: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  };
  resumeButton.addEventListener('click', () => resume(resumeButton));
  bannerResume.addEventListener('click', () => resume(bannerResume));
  deleteButton.addEventListener('click', async () => {
    if (!window.confirm(`Delete ${runLabel(run)} with its samples and log? This cannot be undone.`)) return;
    deleteButton.disabled = true;
    try {
      await api.deleteRun(run.id);
      ctx.announce(`Run ${runLabel(run)} deleted.`);
      window.location.hash = '#/runs';
    } catch (e) {
      actionMessage.error(`Could not delete: ${e.message}`);
      deleteButton.disabled = false;
    }
  });

  // --- Cancel ---
  cancelButton.addEventListener('click', async () => {
    if (!window.confirm(`Cancel ${runLabel(run)}?`)) return;
    cancelButton.disabled = true;
    try {
      const res = await api.cancel(run.id);
      run = { ...run, status: res?.status ?? run.status };
      renderRecord();
      actionMessage.ok(`Cancellation requested; the run is ${run.status}.`);
      ctx.announce(`Run ${run.status}.`);
    } catch (e) {
      actionMessage.error(`Could not cancel: ${e.message}`);
    } finally {
      cancelButton.disabled = false;
    }
  });

  // --- Samples, once finished ---
  let samplesLoaded = false;
  const loadSamples = async () => {
    if (!samplesSection || samplesLoaded) return;
    samplesLoaded = true;
    try {
      const samples = await api.samples(run.id, { signal: ctx.signal });
      const withErrors = (samples ?? []).filter((x) => x.errors && Object.keys(x.errors).length);
      if (withErrors.length) {
        const [k, v] = Object.entries(withErrors[0].errors)[0];
        firstErrors = { count: withErrors.length, example: `${k}: ${v}` };
        renderBanner();
      }
      renderSamples(samplesSection, run, samples ?? []);
    } catch (e) {
      if (ctx.signal.aborted) return;
      samplesLoaded = false;
      replace(samplesSection, h('h2', { id: 'samples-h' }, 'Samples'), h('p', { class: 'form-error', role: 'alert' }, `Could not load samples: ${e.message}`));
    }
  };

  // --- Live updates ---
  // The record is re-read every 2 s while the run is active and every 10 s after, so the page
  // follows a run that changes state elsewhere (resumed from another tab, the server restarted).
  let finished = !isActive(run.status);
  let timer = null;
  const refresh = async () => {
    try {
      const next = await api.run(run.id, { signal: ctx.signal });
      if (ctx.signal.aborted) return;
      const changed = next.status !== run.status;
      run = next;
      renderRecord();
      if (changed) ctx.announce(`Run ${run.status}.`);
      if (!isActive(run.status)) onFinished();
      else if (finished) startLive();
    } catch (e) {
      if (ctx.signal.aborted) return;
      if (e.status === 404) {
        actionMessage.error('This run no longer exists: it was deleted.');
        return;
      }
    }
    schedule();
  };
  const schedule = () => {
    clearTimeout(timer);
    if (!ctx.signal.aborted) timer = setTimeout(refresh, finished ? SLOW_POLL_MS : POLL_MS);
  };
  const onFinished = () => {
    if (finished) return;
    finished = true;
    samplesLoaded = false;
    loadSamples();
    // The server ends the stream itself once the run is over; do not wait forever if it doesn't.
    setTimeout(() => closeStream(), 10000);
  };
  ctx.signal.addEventListener('abort', () => clearTimeout(timer));

  if (finished) loadSamples();
  schedule();

  const appendLog = (level, message) => {
    const stick = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 24;
    logList.append(h('li', { class: `log-${level}` },
      h('span', { class: 'log-level' }, level), ' ', h('span', { class: 'log-message' }, message)));
    while (logList.childElementCount > MAX_LOG_LINES) logList.firstElementChild.remove();
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  };

  let lastSeq = -1;
  const onEvent = (e) => {
    const seq = Number(e.lastEventId);
    if (e.lastEventId !== '' && Number.isFinite(seq)) {
      if (seq <= lastSeq) return; // already seen before a reconnect
      lastSeq = seq;
    }
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      return;
    }
    switch (data.type ?? e.type) {
      case 'status':
        // The stream replays a run's history from the start; a replayed "running" must not
        // undo the "done" the record already says. Statuses only move forward.
        if (data.status && rank(data.status) > rank(run.status)) {
          if (!isActive(data.status)) {
            // Show the end only with the final record (scores, finish time): "done" without its
            // aggregates would read, for a moment, as "failed: no scores".
            refresh();
          } else {
            run = { ...run, status: data.status };
            renderRecord();
            ctx.announce(`Run ${data.status}.`);
          }
        }
        break;
      case 'progress':
        run = { ...run, progress: { done: data.done, total: data.total, unit: data.unit } };
        setProgress(run.progress);
        break;
      case 'log':
        appendLog(data.level ?? 'info', data.message ?? '');
        break;
      case 'loss':
      case 'step':
        training?.add(data, data.type ?? e.type);
        break;
      default:
        break;
    }
  };

  let stream = null;
  const closeStream = () => {
    if (!stream) return;
    stream.close();
    stream = null;
  };
  ctx.signal.addEventListener('abort', () => {
    closeStream();
    training?.destroy();
  });
  // Read with fetch (the bearer header), reconnecting with Last-Event-ID while the run is active.
  const openStream = () => {
    if (stream) return;
    stream = api.followEvents(run.id, {
      signal: ctx.signal,
      onEvent,
      // The server ends the stream once the run is over; reconnect only while it is not.
      shouldReconnect: () => !finished && isActive(run.status),
      onState(state, message) {
        if (ctx.signal.aborted) return;
        if (state === 'live') streamState.textContent = finished ? '' : 'Live';
        else if (state === 'connecting') streamState.textContent = isActive(run.status) ? 'Connecting…' : '';
        else if (state === 'reconnecting') streamState.textContent = isActive(run.status) ? 'Reconnecting…' : '';
        else if (state === 'closed') {
          stream = null;
          streamState.textContent = isActive(run.status)
            ? `Live updates stopped${message ? ` (${message})` : ''}; the page still checks every 2 s.`
            : '';
        }
      },
    });
  };
  // The run became active again (resumed): follow it live once more.
  function startLive() {
    finished = false;
    training?.reopen();
    openStream();
    schedule();
  }
  openStream();
}

const rank = (status) => (status === 'queued' ? 0 : status === 'running' ? 1 : 2);

function trainingView() {
  const stats = {
    step: h('dd', { class: 'num' }, '—'),
    epoch: h('dd', { class: 'num' }, '—'),
    loss: h('dd', { class: 'num' }, '—'),
    eval_loss: h('dd', { class: 'num' }, '—'),
    learning_rate: h('dd', { class: 'num' }, '—'),
    grad_norm: h('dd', { class: 'num' }, '—'),
    tokens_per_second: h('dd', { class: 'num', 'data-testid': 'throughput' }, '—'),
    memory_bytes: h('dd', { class: 'num', 'data-testid': 'memory' }, '—'),
    gpu_memory_bytes: h('dd', { class: 'num', 'data-testid': 'gpu-memory' }, '—'),
    eta_seconds: h('dd', { class: 'num', 'data-testid': 'eta' }, '—'),
  };
  const labels = {
    step: 'Step', epoch: 'Epoch', loss: 'Loss', eval_loss: 'Eval loss', learning_rate: 'Learning rate',
    grad_norm: 'Gradient norm', tokens_per_second: 'Tokens/s', memory_bytes: 'Memory (process RSS)',
    gpu_memory_bytes: 'GPU memory (tensors)', eta_seconds: 'Time left (ETA)',
  };
  // A CPU run has no GPU memory: its entry shows only once a value arrives.
  const gpuStat = stats.gpu_memory_bytes;
  const lossChart = lineChart({
    title: 'Loss', xLabel: 'step', yLabel: 'loss',
    series: [{ label: 'train loss', color: runColor(0) }, { label: 'eval loss', color: runColor(1), points: true }],
  });
  const lrChart = lineChart({
    title: 'Learning rate', xLabel: 'step', yLabel: 'learning rate', height: 180,
    series: [{ label: 'learning rate', color: runColor(2) }],
  });
  const speedChart = lineChart({
    title: 'Throughput', xLabel: 'step', yLabel: 'tokens/s', height: 180,
    series: [{ label: 'tokens/s', color: runColor(3) }],
  });
  const memoryChart = lineChart({
    title: 'Memory', xLabel: 'step', yLabel: 'MiB', height: 180,
    series: [{ label: 'process RSS (MiB)', color: runColor(4) }, { label: 'GPU tensors (MiB, CUDA only)', color: runColor(5) }],
  });
  // Each evaluation's values (eval_loss and the generation metrics' eval_<score>), a row per
  // evaluation, step 0 (before training) included.
  const evalBody = h('tbody');
  const evalHead = h('tr');
  const evalColumns = [];
  const evalTable = h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': 'Evaluations', hidden: '' },
    h('table', { class: 'data', 'data-testid': 'evaluations' }, h('caption', {}, 'Evaluations'), h('thead', {}, evalHead), evalBody));
  const addEvaluation = (d) => {
    const values = { ...(d.eval_metrics ?? {}) };
    if (val(d.eval_loss) !== null) values.eval_loss = d.eval_loss;
    const keys = Object.keys(values).filter((k) => k !== 'eval_samples_per_second');
    if (!keys.length) return;
    for (const k of keys.sort()) {
      if (!evalColumns.includes(k)) evalColumns.push(k);
    }
    evalHead.replaceChildren(h('th', { scope: 'col' }, 'step'), ...evalColumns.map((k) => h('th', { scope: 'col' }, k === 'eval_runtime' ? 'seconds' : k.replace(/^eval_/, ''))));
    const existing = [...evalBody.children].find((r) => r.dataset.step === String(d.step));
    const row = h('tr', { 'data-step': String(d.step) }, h('td', { class: 'num' }, String(d.step)),
      ...evalColumns.map((k) => h('td', { class: 'num' }, values[k] === undefined ? '' : num(values[k]))));
    if (existing) existing.replaceWith(row); else evalBody.append(row);
    evalTable.hidden = false;
  };
  const el = h('section', { 'aria-labelledby': 'training-h', class: 'panel' },
    h('h2', { id: 'training-h' }, 'Training'),
    h('dl', { class: 'stats', 'data-testid': 'training-stats' }, Object.entries(stats).map(([k, dd]) => h('div', {}, h('dt', {}, labels[k]), dd))),
    h('div', { class: 'charts' }, lossChart.el, lrChart.el, speedChart.el, memoryChart.el),
    evalTable,
  );
  gpuStat.parentElement.hidden = true;
  const steps = [];
  const loss = [];
  const evalLoss = [];
  const lr = [];
  const speed = [];
  const rss = [];
  const gpu = [];
  const series = [loss, evalLoss, lr, speed, rss, gpu];
  const perStep = new Set(); // steps whose own loss arrived (a `step` event)
  const mib = (b) => b / (1024 * 1024);
  const draw = throttleFrame(() => {
    lossChart.setData(steps, loss, evalLoss);
    lrChart.setData(steps, lr);
    speedChart.setData(steps, speed);
    memoryChart.setData(steps, rss, gpu);
  });
  const val = (x) => (x === undefined ? null : x);
  let settled = false; // the run is over; replayed events must not bring back an ETA
  // The ETA counts down between logged steps (they may be many seconds apart), from the
  // server's last estimate; each new estimate resets it.
  let etaAt = null;
  const tick = setInterval(() => {
    if (settled || etaAt === null) return;
    stats.eta_seconds.textContent = duration(Math.max(0, (etaAt - Date.now()) / 1000));
  }, 1000);
  return {
    el,
    add(d, kind = 'loss') {
      // Events arrive in step order; a second event for the same step (eval loss logged after
      // the train loss, as HF Trainer does) fills in the same column.
      let i = steps.length - 1;
      if (i < 0 || steps[i] !== d.step) {
        if (i >= 0 && d.step < steps[i]) {
          i = steps.findIndex((s) => s >= d.step);
          if (steps[i] !== d.step) {
            steps.splice(i, 0, d.step);
            for (const s of series) s.splice(i, 0, null);
          }
        } else {
          steps.push(d.step);
          for (const s of series) s.push(null);
          i = steps.length - 1;
        }
      }
      addEvaluation(d);
      // A step's own loss (its `step` event comes first) is not replaced by the logging
      // window's mean that a logged step's `loss` event carries.
      const ownLoss = kind === 'step' || !perStep.has(d.step);
      if (kind === 'step') perStep.add(d.step);
      if (val(d.loss) !== null && ownLoss) loss[i] = d.loss;
      if (val(d.eval_loss) !== null) evalLoss[i] = d.eval_loss;
      if (val(d.learning_rate) !== null) lr[i] = d.learning_rate;
      if (val(d.tokens_per_second) !== null) speed[i] = d.tokens_per_second;
      if (val(d.memory_bytes) !== null) rss[i] = mib(d.memory_bytes);
      if (val(d.gpu_memory_bytes) !== null) gpu[i] = mib(d.gpu_memory_bytes);
      stats.step.textContent = String(d.step);
      if (val(d.epoch) !== null) stats.epoch.textContent = num(d.epoch);
      if (val(d.loss) !== null && ownLoss) stats.loss.textContent = num(d.loss);
      if (val(d.eval_loss) !== null) stats.eval_loss.textContent = num(d.eval_loss);
      if (val(d.learning_rate) !== null) stats.learning_rate.textContent = d.learning_rate.toExponential(2);
      if (val(d.grad_norm) !== null) stats.grad_norm.textContent = num(d.grad_norm);
      if (val(d.tokens_per_second) !== null) stats.tokens_per_second.textContent = Math.round(d.tokens_per_second).toLocaleString('en');
      if (val(d.memory_bytes) !== null) stats.memory_bytes.textContent = bytes(d.memory_bytes);
      if (val(d.gpu_memory_bytes) !== null) {
        stats.gpu_memory_bytes.textContent = bytes(d.gpu_memory_bytes);
        gpuStat.parentElement.hidden = false;
      }
      if (val(d.eta_seconds) !== null && !settled) {
        etaAt = Date.now() + d.eta_seconds * 1000;
        stats.eta_seconds.textContent = duration(d.eta_seconds);
      }
      draw();
    },
    /** The run is going again (resumed): ETAs count once more. */
    reopen() {
      settled = false;
    },
    /** The run is over: a time left no longer means anything. */
    settle() {
      settled = true;
      etaAt = null;
      stats.eta_seconds.textContent = '—';
    },
    destroy() {
      clearInterval(tick);
      lossChart.destroy();
      lrChart.destroy();
      speedChart.destroy();
      memoryChart.destroy();
    },
  };
}

function renderScores(section, run) {
  const aggs = run.aggregates ?? {};
  const refs = run.reference_aggregates ?? {};
  const infos = [...(run.scores ?? [])];
  for (const name of Object.keys(aggs)) if (!infos.some((s) => s.name === name)) infos.push({ name });
  const hasRefs = Object.keys(refs).length > 0;
  const corpus = Object.entries(run.corpus ?? {});
  if (infos.length === 0 && corpus.length === 0) {
    replace(section, h('h2', { id: 'scores-h' }, 'Scores'),
      h('p', { class: 'muted' }, isActive(run.status) ? 'Scores appear when the run finishes.' : 'This run has no scores.'));
    return;
  }
  replace(section,
    h('div', { class: 'section-head' }, h('h2', { id: 'scores-h' }, 'Scores'),
      isActive(run.status) ? null : reportControl([run.id], 'run-report')),
    infos.length ? h('div', { class: 'table-scroll' }, h('table', { class: 'data', 'data-testid': 'aggregates-table' },
      h('caption', {}, 'Mean over samples with its 95% bootstrap interval'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Score'),
        h('th', { scope: 'col' }, 'Metric'),
        h('th', { scope: 'col', class: 'num' }, 'Mean'),
        h('th', { scope: 'col', class: 'num' }, '95% interval'),
        h('th', { scope: 'col', class: 'num' }, 'Range'),
        hasRefs ? h('th', { scope: 'col', class: 'num' }, 'References scored') : null,
      )),
      h('tbody', {}, infos.map((s) => {
        const a = aggs[s.name];
        return h('tr', {},
          h('th', { scope: 'row' }, s.name, ' ', direction(s)),
          h('td', {}, s.metric ?? ''),
          h('td', { class: 'num' }, a ? num(a.mean) : '—'),
          h('td', { class: 'num' }, a ? interval(a) : '—'),
          h('td', { class: 'num muted' }, Number.isFinite(s.min) ? `${num(s.min)} – ${num(s.max)}` : ''),
          hasRefs ? h('td', { class: 'num' }, refs[s.name] ? `${num(refs[s.name].mean)} ${interval(refs[s.name])}` : '—') : null,
        );
      })),
    )) : null,
    corpus.length ? h('div', {},
      h('h3', {}, 'Corpus-level'),
      h('dl', { class: 'stats' }, corpus.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', { class: 'num' }, num(v)))))) : null,
  );
}

/** "higher is better" / "lower is better" as an arrow with words for screen readers. */
export function direction(score) {
  if (score.higher_is_better === undefined) return null;
  return h('span', { class: 'direction', title: score.higher_is_better ? 'higher is better' : 'lower is better' },
    h('span', { 'aria-hidden': 'true' }, score.higher_is_better ? '↑' : '↓'),
    h('span', { class: 'visually-hidden' }, score.higher_is_better ? '(higher is better)' : '(lower is better)'));
}

// Settings a person reads first, in this order; the rest follow alphabetically.
const SETTING_ORDER = [
  'model', 'model_name_or_path', 'adapter', 'adapter_name', 'dataset', 'split', 'limit', 'formatter',
  'decoding', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'repetition_penalty', 'seed',
  'num_train_epochs', 'max_steps', 'learning_rate', 'lr_scheduler_type', 'warmup_ratio', 'warmup_steps',
  'per_device_train_batch_size', 'gradient_accumulation_steps', 'max_seq_length', 'packing',
  'packing_strategy', 'eval_packing', 'attn_implementation', 'logging_steps',
  'lora.r', 'lora.lora_alpha', 'lora.lora_dropout', 'lora.target_modules', 'lora', 'metrics',
];

/** `{a: {b: 1}}` → `[['a.b', '1']]`; lists joined with commas, empty values shown as such. */
function flatten(obj, prefix = '') {
  const out = [];
  for (const [k, v] of Object.entries(obj ?? {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === 'object' && !Array.isArray(v)) out.push(...flatten(v, key));
    else if (Array.isArray(v)) out.push([key, v.length ? v.map((x) => (typeof x === 'object' ? JSON.stringify(x) : String(x))).join(', ') : '(none)']);
    else out.push([key, v === null || v === undefined ? '(none)' : String(v)]);
  }
  return out;
}

/** Metadata that a training measured (shown beside its duration, not among its settings). */
const MEASURED = new Set(['peak_memory_bytes', 'peak_gpu_memory_bytes']);

/** Every setting the run used: its launch request (train, generate), then metadata. */
export function runSettings(run) {
  const seen = new Map();
  for (const [k, v] of flatten(run.request)) seen.set(k, v);
  for (const [k, v] of Object.entries(run.metadata ?? {})) {
    // Measurements, not settings: shown with the run's times.
    if (MEASURED.has(k)) continue;
    // The request is the fuller source; metadata adds what it lacks (adapter name, metrics…).
    const key = k === 'model' && seen.has('model_name_or_path') ? 'model_name_or_path' : k;
    if (!seen.has(key)) seen.set(key, typeof v === 'string' ? v : JSON.stringify(v));
  }
  const rank = (k) => {
    const i = SETTING_ORDER.indexOf(k);
    return i === -1 ? SETTING_ORDER.length : i;
  };
  return [...seen.entries()].sort(([a], [b]) => rank(a) - rank(b) || a.localeCompare(b));
}

function renderDetails(section, run) {
  const u = run.usage ?? {};
  const times = [
    ['Created', dateTime(run.created)],
    ['Started', dateTime(run.started)],
    ['Finished', dateTime(run.finished)],
    ['Duration', run.started ? elapsed(run.started, run.finished) : '—'],
  ];
  const m = run.metadata ?? {};
  if (m.peak_memory_bytes) times.push(['Peak memory (process RSS)', bytes(Number(m.peak_memory_bytes))]);
  if (m.peak_gpu_memory_bytes) times.push(['Peak GPU memory (tensors)', bytes(Number(m.peak_gpu_memory_bytes))]);
  if (u.requests) {
    times.push(['LLM requests', `${u.requests} (${u.cached ?? 0} cached)`]);
    times.push(['Tokens', `${(u.prompt_tokens ?? 0).toLocaleString('en')} prompt, ${(u.completion_tokens ?? 0).toLocaleString('en')} completion`]);
    if (u.cost_usd) times.push(['Estimated cost', `$${u.cost_usd.toFixed(4)}`]);
  }
  const settings = runSettings(run);
  replace(section,
    h('h2', { id: 'details-h' }, 'Settings and details'),
    settings.length ? [
      h('h3', {}, 'Settings used'),
      h('dl', { class: 'details settings', 'data-testid': 'run-settings' },
        settings.map(([k, v]) => h('div', { 'data-setting': k }, h('dt', { class: 'mono' }, k), h('dd', {}, v)))),
    ] : h('p', { class: 'muted' }, 'The server recorded no settings for this run.'),
    provenance(run),
    metricErrors(run),
    h('h3', {}, 'Times'),
    h('dl', { class: 'details', 'data-testid': 'run-metadata' }, times.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v)))),
  );
}

/** Where each plugin behind the scores came from: a user's replacement of a built-in name
 * shows here, with its own sha256. */
function provenance(run) {
  const plugins = Object.entries(run.plugins ?? {});
  if (!plugins.length) return null;
  return [
    h('h3', {}, 'Plugins'),
    h('dl', { class: 'details', 'data-testid': 'run-plugins' }, plugins.map(([name, p]) =>
      h('div', { 'data-plugin': name },
        h('dt', { class: 'mono' }, name),
        h('dd', {}, `${p.version} · ${p.source === 'built-in' ? 'built-in' : 'user plugin'} · sha256 `,
          h('span', { class: 'mono', title: p.sha256 }, (p.sha256 ?? '').slice(0, 12)))))),
  ];
}

/** Errors about a metric as a whole (a failed batch, stored once): shown once, in full. */
function metricErrors(run) {
  const errors = Object.entries(run.metric_errors ?? {});
  if (!errors.length) return null;
  return [
    h('h3', {}, 'Metric errors'),
    h('dl', { class: 'details', 'data-testid': 'run-metric-errors' }, errors.map(([name, e]) =>
      h('div', {}, h('dt', { class: 'mono' }, name), h('dd', { class: 'error-text' }, e)))),
  ];
}

/** Publish the run's adapter to the Hugging Face Hub with its model card, through the
 * server's own HF_TOKEN (the token never reaches the browser). */
function publishView(run, ctx) {
  const name = run.metadata.adapter_name;
  const repo = h('input', { type: 'text', autocomplete: 'off', placeholder: 'owner/name', required: true, pattern: '[A-Za-z0-9][A-Za-z0-9._\\-]*/[A-Za-z0-9][A-Za-z0-9._\\-]*' });
  const revision = h('input', { type: 'text', autocomplete: 'off', placeholder: 'main' });
  const priv = h('input', { type: 'checkbox', id: 'publish-private' });
  const push = h('button', { type: 'submit' }, 'Push to the Hub');
  const box = messageBox();
  const form = h('form', { class: 'panel', 'aria-labelledby': 'publish-h', 'data-testid': 'publish' },
    h('h2', { id: 'publish-h' }, 'Publish'),
    h('p', { class: 'muted' }, `Uploads the adapter `, h('span', { class: 'mono' }, name),
      ' with a model card (PEFT\'s fields and this adapter\'s stored evaluation results) to the Hugging Face Hub, with the server\'s HF_TOKEN.'),
    field({ id: 'publish-repo', label: 'Repository', input: repo, hint: 'owner/name; created when missing.' }),
    field({ id: 'publish-revision', label: 'Branch', input: revision, hint: 'Empty: main.' }),
    h('div', { class: 'check' }, priv, h('label', { for: 'publish-private' }, 'Create the repository private')),
    box.el,
    h('div', { class: 'actions' }, push),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    box.clear();
    push.disabled = true;
    try {
      const body = { repo: repo.value.trim(), private: priv.checked };
      if (revision.value.trim()) body.revision = revision.value.trim();
      const done = await api.pushAdapter(name, body);
      const files = (done?.files ?? []).map((f) => `${f.path}${f.lfs ? ' (LFS)' : ''}`).join(', ');
      box.ok(`Pushed to ${done.repo} on ${done.revision}: ${files}.`);
      ctx.announce('Adapter pushed.');
    } catch (err) {
      box.error(`Not pushed: ${err.message}`);
    } finally {
      push.disabled = false;
    }
  });
  return { el: form };
}

/** Tags and notes, saved with PATCH /api/runs/ID. */
function notesView(run, ctx) {
  const tags = h('input', { type: 'text', autocomplete: 'off', placeholder: 'e.g. baseline, r16' });
  tags.value = (run.tags ?? []).join(', ');
  const notes = h('textarea', { rows: 3 });
  notes.value = run.notes ?? '';
  const save = h('button', { type: 'submit' }, 'Save tags and notes');
  const box = messageBox();
  const shown = h('ul', { class: 'tags', 'aria-label': 'Current tags', 'data-testid': 'run-tags' });
  const showTags = (list) => replace(shown, list.map((t) => h('li', {}, t)));
  showTags(run.tags ?? []);
  const form = h('form', { class: 'panel', 'aria-labelledby': 'notes-h', 'data-testid': 'run-notes' },
    h('div', { class: 'section-head' }, h('h2', { id: 'notes-h' }, 'Tags and notes'), shown),
    field({ id: 'run-tags-input', label: 'Tags', input: tags, hint: 'Comma-separated; the runs list filters by them.' }),
    field({ id: 'run-notes-input', label: 'Notes', input: notes }),
    box.el,
    h('div', { class: 'actions' }, save),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    box.clear();
    const list = [...new Set(tags.value.split(',').map((t) => t.trim()).filter(Boolean))];
    save.disabled = true;
    try {
      const updated = await api.updateRun(run.id, { tags: list, notes: notes.value });
      showTags(updated?.tags ?? list);
      tags.value = (updated?.tags ?? list).join(', ');
      box.ok('Saved.');
      ctx.announce('Tags and notes saved.');
    } catch (err) {
      box.error(`Not saved: ${err.message}`);
    } finally {
      save.disabled = false;
    }
  });
  return { el: form };
}

function renderSamples(section, run, samples) {
  const names = (run.scores ?? []).map((s) => s.name);
  for (const s of samples) for (const k of Object.keys(s.scores ?? {})) if (!names.includes(k)) names.push(k);
  const withErrors = samples.filter((s) => s.errors && Object.keys(s.errors).length).length;
  const filter = h('input', { type: 'search', id: 'samples-filter', placeholder: 'id, text…' });
  const sort = h('select', { id: 'samples-sort' },
    h('option', { value: 'index' }, 'Input order'),
    withErrors ? h('option', { value: 'errors' }, 'Errors first') : null,
    names.flatMap((n) => [h('option', { value: `asc:${n}` }, `${n}, lowest first`), h('option', { value: `desc:${n}` }, `${n}, highest first`)]),
  );
  const wrap = h('input', { type: 'checkbox', id: 'samples-wrap' });
  const count = h('p', { class: 'muted', 'aria-live': 'polite' });
  const tbody = h('tbody');
  const more = h('button', { type: 'button' }, `Show ${SAMPLES_PAGE} more`);
  const table = h('table', { class: 'data samples clamp', 'data-testid': 'samples-table' },
    h('caption', { class: 'visually-hidden' }, 'Samples with their scores'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col', class: 'num' }, '#'),
      h('th', { scope: 'col' }, 'Id'),
      h('th', { scope: 'col' }, 'Prediction'),
      h('th', { scope: 'col' }, 'Reference'),
      names.map((n) => h('th', { scope: 'col', class: 'num' }, n)),
      h('th', { scope: 'col' }, 'Errors'),
    )),
    tbody,
  );
  let shown = SAMPLES_PAGE;
  const rows = () => {
    const q = filter.value.trim().toLowerCase();
    let list = q
      ? samples.filter((s) => [s.id, s.prediction, ...referencesOf(s), s.source].some((t) => String(t ?? '').toLowerCase().includes(q)))
      : [...samples];
    const key = sort.value;
    if (key === 'errors') list.sort((a, b) => Object.keys(b.errors ?? {}).length - Object.keys(a.errors ?? {}).length || a.index - b.index);
    else if (key.includes(':')) {
      const [dir, n] = key.split(/:(.*)/s);
      const v = (s) => s.scores?.[n];
      list.sort((a, b) => {
        const x = v(a);
        const y = v(b);
        if (x === undefined || x === null) return 1;
        if (y === undefined || y === null) return -1;
        return dir === 'asc' ? x - y : y - x;
      });
    } else list.sort((a, b) => (a.index ?? 0) - (b.index ?? 0));
    return list;
  };
  const render = () => {
    const list = rows();
    replace(tbody, list.slice(0, shown).map((s) => h('tr', {},
      h('td', { class: 'num' }, s.index ?? ''),
      h('th', { scope: 'row', class: 'mono' }, s.id),
      h('td', {}, h('div', { class: 'text' }, s.prediction ?? '')),
      h('td', {}, referencesView(s)),
      names.map((n) => h('td', { class: 'num' }, num(s.scores?.[n]))),
      h('td', {}, Object.entries(s.errors ?? {}).map(([k, v]) => h('div', { class: 'error-text small' }, h('strong', {}, k), `: ${v}`))),
    )));
    count.textContent = `${list.length} of ${samples.length} samples${withErrors ? `, ${withErrors} with errors` : ''}; showing ${Math.min(shown, list.length)}.`;
    more.hidden = list.length <= shown;
  };
  filter.addEventListener('input', () => {
    shown = SAMPLES_PAGE;
    render();
  });
  sort.addEventListener('change', render);
  wrap.addEventListener('change', () => table.classList.toggle('clamp', !wrap.checked));
  more.addEventListener('click', () => {
    shown += SAMPLES_PAGE;
    render();
  });
  replace(section,
    h('h2', { id: 'samples-h' }, 'Samples'),
    samples.length === 0 ? h('p', { class: 'muted' }, 'This run has no samples.') : [
      h('div', { class: 'toolbar' },
        h('div', { class: 'field inline' }, h('label', { for: 'samples-filter' }, 'Filter'), filter),
        h('div', { class: 'field inline' }, h('label', { for: 'samples-sort' }, 'Sort'), sort),
        h('div', { class: 'check' }, wrap, h('label', { for: 'samples-wrap' }, 'Show full text')),
      ),
      count,
      h('div', { class: 'table-scroll' }, table),
      more,
    ],
  );
  render();
}
