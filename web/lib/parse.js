// Parsing what people type or upload on the launch page, in the browser, so mistakes are shown
// next to the field before anything is sent. Pure functions, no DOM: the unit tests import this
// module directly.
//
// `parsePredictions` follows the server's own reader (host/src/eval/input.rs) rule for rule and
// message for message: JSON Lines with `id`, `prediction`, `reference` (or `references`, a
// non-empty list of strings) and an optional `source`;
// blank lines skipped; every bad line reported with its 1-based number.

/**
 * Parse a predictions file's bytes. Returns `{ rows, errors }`; `rows` hold
 * `{ id, prediction, reference | references, source? }` (as the server takes them: `references`
 * only for two or more) with `id` always a string, and `errors` hold
 * `{ line, message }` (line 0 for a problem with the file as a whole).
 */
export function parsePredictions(bytes) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const decoder = new TextDecoder('utf-8', { fatal: true });
  const rows = [];
  const errors = [];
  const firstLine = new Map();
  let start = 0;
  let line = 0;
  while (start <= data.length) {
    let end = data.indexOf(0x0a, start);
    if (end === -1) end = data.length;
    line++;
    let raw = data.subarray(start, end);
    start = end + 1;
    if (raw.length > 0 && raw[raw.length - 1] === 0x0d) raw = raw.subarray(0, raw.length - 1);
    let text;
    try {
      text = decoder.decode(raw);
    } catch {
      errors.push({ line, message: 'not valid UTF-8' });
      continue;
    }
    text = text.replace(/^\uFEFF+/, '');
    if (text.trim() === '') continue;
    const parsed = parseRow(text);
    if (typeof parsed === 'string') {
      errors.push({ line, message: parsed });
      continue;
    }
    const previous = firstLine.get(parsed.id);
    if (previous !== undefined) {
      errors.push({
        line,
        message: `duplicate id ${JSON.stringify(parsed.id)} (first on line ${previous}); ids pair samples across runs and must be unique`,
      });
      continue;
    }
    firstLine.set(parsed.id, line);
    rows.push(parsed);
  }
  if (rows.length === 0 && errors.length === 0) errors.push({ line: 0, message: 'the file holds no samples' });
  return { rows, errors };
}

function parseRow(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return `invalid JSON: ${e.message}`;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return 'expected a JSON object';
  let id;
  const rawId = value.id;
  if (typeof rawId === 'string' && rawId !== '') id = rawId;
  else if (typeof rawId === 'number' && Number.isFinite(rawId)) id = String(rawId);
  else if (rawId === '') return 'field `id` is empty';
  else if (rawId === undefined) return 'missing field `id`';
  else return `field \`id\` must be a string or number, not ${typeName(rawId)}`;
  // The server's order: references first, then the prediction, then the source.
  const textField = (name, required) => {
    const v = value[name];
    if (typeof v === 'string') return { ok: v };
    if (!required && (v === null || v === undefined)) return { ok: undefined };
    if (v === undefined) return { err: `missing field \`${name}\`` };
    return { err: `field \`${name}\` must be a string, not ${typeName(v)}` };
  };
  let reference;
  let references;
  const hasOne = value.reference !== undefined;
  const hasMany = value.references !== undefined;
  if (hasOne && hasMany) return 'both `reference` and `references`: give one (`references` for several)';
  if (hasMany) {
    const items = value.references;
    if (!Array.isArray(items)) return `field \`references\` must be a list of strings, not ${typeName(items)}`;
    if (items.length === 0) return 'field `references` is an empty list; give at least one';
    const bad = items.findIndex((x) => typeof x !== 'string');
    if (bad >= 0) return `field \`references\`, item ${bad + 1}: must be a string, not ${typeName(items[bad])}`;
    reference = items[0];
    // One reference reads and is sent as `reference`, as the server stores it.
    if (items.length > 1) references = items.slice();
  } else if (!hasOne) {
    return 'missing field `reference` (or `references`)';
  } else {
    const r = textField('reference', true);
    if (r.err) return r.err;
    reference = r.ok;
  }
  const prediction = textField('prediction', true);
  if (prediction.err) return prediction.err;
  const source = textField('source', false);
  if (source.err) return source.err;
  const row = { id, prediction: prediction.ok };
  if (references) row.references = references;
  else row.reference = reference;
  if (source.ok !== undefined) row.source = source.ok;
  return row;
}

function typeName(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  switch (typeof v) {
    case 'boolean': return 'a boolean';
    case 'number': return 'a number';
    case 'string': return 'a string';
    default: return 'an object';
  }
}

/**
 * Parse per-metric settings written as `key=value`, one per line (or separated by commas).
 * Blank lines and lines starting with `#` are ignored. Values stay strings: the metric plugin
 * decides what they mean. Returns `{ settings, errors }`, errors as `{ line, message }`.
 */
export function parseSettings(text) {
  const settings = {};
  const errors = [];
  const lines = String(text ?? '').split('\n');
  lines.forEach((raw, i) => {
    for (const part of raw.split(',')) {
      const entry = part.trim();
      if (entry === '' || entry.startsWith('#')) continue;
      const eq = entry.indexOf('=');
      if (eq <= 0) {
        errors.push({ line: i + 1, message: `expected key=value, got ${JSON.stringify(entry)}` });
        continue;
      }
      const key = entry.slice(0, eq).trim();
      const value = entry.slice(eq + 1).trim();
      if (Object.hasOwn(settings, key)) {
        errors.push({ line: i + 1, message: `${JSON.stringify(key)} is set twice` });
        continue;
      }
      settings[key] = value;
    }
  });
  return { settings, errors };
}

/** Split a list typed as "q_proj, v_proj" or "q_proj v_proj" into its items. */
export function parseList(text) {
  return String(text ?? '')
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

/**
 * Read a number typed into a text field ("2e-4", "0.01"). Returns `{ value }` or `{ error }`;
 * an empty field gives `{ value: null }` so optional fields can tell "unset" from "invalid".
 */
export function parseNumber(text, { integer = false, min = -Infinity, max = Infinity, minExclusive = false, maxExclusive = false } = {}) {
  const s = String(text ?? '').trim();
  if (s === '') return { value: null };
  if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(s)) return { error: 'Enter a number, such as 0.0002 or 2e-4.' };
  const value = Number(s);
  if (!Number.isFinite(value)) return { error: 'Enter a finite number.' };
  if (integer && !Number.isInteger(value)) return { error: 'Enter a whole number.' };
  const low = minExclusive ? value <= min : value < min;
  const high = maxExclusive ? value >= max : value > max;
  if (low || high) return { error: rangeMessage(min, max, minExclusive, maxExclusive) };
  return { value };
}

function rangeMessage(min, max, minExclusive, maxExclusive) {
  const parts = [];
  if (min !== -Infinity) parts.push(`${minExclusive ? 'greater than' : 'at least'} ${min}`);
  if (max !== Infinity) parts.push(`${maxExclusive ? 'less than' : 'at most'} ${max}`);
  return `Must be ${parts.join(' and ')}.`;
}

/**
 * Parse training keys written as `key=value`, one per line (`lora.r=8` for a table's key).
 * Values are JSON where they parse (`2e-5`, `true`, `["rouge"]`, `"5"` for the text 5), text
 * otherwise; commas stay inside values. Blank lines and `#` lines are ignored. Returns
 * `{ config, errors }`: `config` nested by the dots, errors as `{ line, message }`.
 */
export function parseConfigLines(text) {
  const config = {};
  const errors = [];
  const seen = new Set();
  String(text ?? '').split('\n').forEach((raw, i) => {
    const entry = raw.trim();
    if (entry === '' || entry.startsWith('#')) return;
    const eq = entry.indexOf('=');
    const key = eq > 0 ? entry.slice(0, eq).trim() : '';
    if (!/^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$/.test(key)) {
      errors.push({ line: i + 1, message: `expected key=value, got ${JSON.stringify(entry)}` });
      return;
    }
    if (seen.has(key)) {
      errors.push({ line: i + 1, message: `${JSON.stringify(key)} is set twice` });
      return;
    }
    seen.add(key);
    const rawValue = entry.slice(eq + 1).trim();
    let value = rawValue;
    try { value = JSON.parse(rawValue); } catch { /* text */ }
    const path = key.split('.');
    let node = config;
    for (const part of path.slice(0, -1)) {
      if (typeof node[part] !== 'object' || node[part] === null || Array.isArray(node[part])) node[part] = {};
      node = node[part];
    }
    node[path[path.length - 1]] = value;
  });
  return { config, errors };
}

/**
 * The inverse of `parseConfigLines` for the keys of `config` outside `skip` (dotted names)
 * whose value differs from `defaults` (same nesting): one `key=value` line each, text as
 * itself unless it would read back as something else.
 */
export function configLines(config, defaults = {}, skip = new Set()) {
  const lines = [];
  const walk = (node, base, prefix) => {
    for (const [k, v] of Object.entries(node ?? {})) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (skip.has(key) || v === null || v === undefined) continue;
      const d = base?.[k];
      if (typeof v === 'object' && !Array.isArray(v)) {
        walk(v, d, key);
        continue;
      }
      if (JSON.stringify(v) === JSON.stringify(d)) continue;
      let text = typeof v === 'string' ? v : JSON.stringify(v);
      if (typeof v === 'string') {
        try { JSON.parse(v); text = JSON.stringify(v); } catch { /* reads back as text */ }
        if (v !== v.trim()) text = JSON.stringify(v);
      }
      lines.push(`${key}=${text}`);
    }
  };
  walk(config, defaults, '');
  return lines.join('\n');
}
