// Pieces several pages share.

import { api } from '../lib/api.js';
import { h, replace, svg } from '../lib/dom.js';

// Icons as SVG, not font glyphs: "⏸" and friends render as empty boxes where the font lacks them.
const ICON_PATHS = {
  queued: 'M8 1.5a6.5 6.5 0 1 0 0 13 6.5 6.5 0 0 0 0-13zM8 4v4.5l3 2',
  running: 'M5 3.5v9l7-4.5z',
  done: 'M3 8.5l3.2 3L13 4.5',
  failed: 'M4 4l8 8M12 4l-8 8',
  interrupted: 'M5.5 3.5v9M10.5 3.5v9',
  cancelled: 'M8 1.5a6.5 6.5 0 1 0 0 13 6.5 6.5 0 0 0 0-13zM3.5 12.5l9-9',
  errors: 'M8 2l6.5 12h-13zM8 6.5v3.5M8 12v.5',
};
const STATUS_TEXT = { 'done-with-errors': 'done with errors', 'failed-scores': 'failed: no scores' };
const STATUS_CLASS = { 'done-with-errors': 'status-interrupted', 'failed-scores': 'status-failed' };
const STATUS_SHAPE = { 'done-with-errors': 'errors', 'failed-scores': 'failed' };

function icon(status) {
  const d = ICON_PATHS[STATUS_SHAPE[status] ?? status] ?? ICON_PATHS.queued;
  return svg('svg', { viewBox: '0 0 16 16', width: 12, height: 12, class: 'icon', 'aria-hidden': 'true', focusable: 'false' },
    svg('path', { d, fill: status === 'running' ? 'currentColor' : 'none', stroke: 'currentColor', 'stroke-width': 2, 'stroke-linecap': 'round', 'stroke-linejoin': 'round' }));
}

/** A status label that reads without colour: icon + word, colour as a bonus. */
export function statusBadge(status, props = {}) {
  return h('span', { class: `badge ${STATUS_CLASS[status] ?? `status-${status}`}`, ...props },
    icon(status), ' ', STATUS_TEXT[status] ?? status);
}

/**
 * What a run's outcome honestly is. The server says "done" once every sample is stored, even
 * when a metric failed on every one of them; a run whose declared scores are all missing reads
 * as "failed-scores", one missing some as "done-with-errors".
 */
export function outcome(run) {
  if (run.status !== 'done') return run.status;
  const declared = (run.scores ?? []).map((s) => s.name);
  if (declared.length === 0) return 'done';
  const have = declared.filter((n) => run.aggregates?.[n]).length;
  if (have === 0) return 'failed-scores';
  return have < declared.length ? 'done-with-errors' : 'done';
}

/** The badge of a run's outcome (see `outcome`). */
export function runBadge(run, props = {}) {
  return statusBadge(outcome(run), { 'data-outcome': outcome(run), ...props });
}

/** A field's wrapper with label, hint and a slot for its validation message. */
export function field({ id, label, input, hint, className = '' }) {
  const errorId = `${id}-error`;
  const hintId = hint ? `${id}-hint` : null;
  input.id = id;
  input.setAttribute('aria-describedby', [hintId, errorId].filter(Boolean).join(' '));
  // A message goes as soon as the person edits the field; submitting checks again.
  const clear = () => {
    if (input.getAttribute('aria-invalid') === 'true') setFieldError(input, null);
  };
  input.addEventListener('input', clear);
  input.addEventListener('change', clear);
  return h('div', { class: `field ${className}`, 'data-field': id },
    h('label', { for: id }, label),
    input,
    hint ? h('p', { class: 'hint', id: hintId }, hint) : null,
    h('p', { class: 'field-error', id: errorId, hidden: true }),
  );
}

/** Show (or clear, with a null message) a field's validation message. */
export function setFieldError(input, message) {
  const el = document.getElementById(`${input.id}-error`);
  if (message) {
    input.setAttribute('aria-invalid', 'true');
    if (el) {
      el.textContent = message;
      el.hidden = false;
    }
  } else {
    input.removeAttribute('aria-invalid');
    if (el) {
      el.textContent = '';
      el.hidden = true;
    }
  }
}

/** A message box for a whole form or page: role=alert for errors, role=status otherwise. */
export function messageBox() {
  const el = h('div', { class: 'message', hidden: true });
  return {
    el,
    error(text) {
      el.className = 'message form-error';
      el.setAttribute('role', 'alert');
      replace(el, text); // flattens nested arrays, skips nulls (replaceChildren would print them)
      el.hidden = false;
    },
    ok(text) {
      el.className = 'message form-ok';
      el.setAttribute('role', 'status');
      replace(el, text); // flattens nested arrays, skips nulls (replaceChildren would print them)
      el.hidden = false;
    },
    clear() {
      el.hidden = true;
      el.replaceChildren();
    },
  };
}

/**
 * "Download report": a format picker (the installed reporter plugins) and a button that asks the
 * server to render the report of `ids` (one run, or a comparison with the first as baseline) and
 * saves it. The request carries the token, so a plain link would not do.
 */
export function reportControl(ids, idPrefix = 'report') {
  const format = h('select', { id: `${idPrefix}-format` }, h('option', { value: 'md' }, 'Markdown'));
  const button = h('button', { type: 'button', 'data-testid': 'download-report' }, 'Download report');
  const status = h('span', { class: 'small', role: 'status' });
  api.plugins().then((plugins) => {
    const reporters = plugins.filter((p) => p.kind === 'reporter' && p.format);
    if (reporters.length) replace(format, reporters.map((p) => h('option', { value: p.format }, `${p.format} (${p.name})`)));
    else button.disabled = true;
  }, () => {});
  button.addEventListener('click', async () => {
    button.disabled = true;
    status.textContent = 'Rendering…';
    status.className = 'small muted';
    try {
      const { blob, filename } = await api.report(ids, format.value);
      const url = URL.createObjectURL(blob);
      const a = h('a', { href: url, download: filename, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
      status.textContent = `Saved ${filename}.`;
    } catch (e) {
      status.textContent = `No report: ${e.message}`;
      status.className = 'small error-text';
    } finally {
      button.disabled = false;
    }
  });
  return h('div', { class: 'field inline report-control' }, h('label', { for: `${idPrefix}-format` }, 'Report format'), format, button, status);
}

/** A sample's references, one or more: `references` when it has several, else `reference`. */
export function referencesOf(sample) {
  return sample?.references?.length ? sample.references : [sample?.reference ?? ''];
}

/**
 * A sample's references as text: the one reference as it is, several as a numbered list (the
 * metrics score against each and keep the best, so every one is shown).
 */
export function referencesView(sample, { className = 'text', testid } = {}) {
  const refs = referencesOf(sample);
  if (refs.length === 1) return h('div', { class: className, 'data-testid': testid }, refs[0]);
  return h('ol', { class: `references ${className}`, 'data-testid': testid, 'aria-label': `${refs.length} references` },
    refs.map((r) => h('li', {}, r)));
}
