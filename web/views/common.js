// Pieces several pages share.

import { h } from '../lib/dom.js';

const STATUS_ICON = { queued: '◷', running: '▶', done: '✓', failed: '✕', interrupted: '⏸', cancelled: '⊘' };

/** A status label that reads without colour: icon + word, colour as a bonus. */
export function statusBadge(status, props = {}) {
  return h('span', { class: `badge status-${status}`, ...props },
    h('span', { 'aria-hidden': 'true' }, STATUS_ICON[status] ?? '•'), ' ', status);
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
      el.replaceChildren(...(Array.isArray(text) ? text : [text]));
      el.hidden = false;
    },
    ok(text) {
      el.className = 'message form-ok';
      el.setAttribute('role', 'status');
      el.replaceChildren(...(Array.isArray(text) ? text : [text]));
      el.hidden = false;
    },
    clear() {
      el.hidden = true;
      el.replaceChildren();
    },
  };
}
