// Formatting numbers, intervals, times and statuses the same way on every page.

/** A score or loss: three significant-ish decimals, fewer for large values. */
export function num(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '—';
  if (!Number.isFinite(x)) return x > 0 ? '∞' : '−∞';
  const a = Math.abs(x);
  let s;
  if (a === 0) s = '0';
  else if (a >= 1000) s = x.toFixed(0);
  else if (a >= 100) s = x.toFixed(1);
  else if (a >= 10) s = x.toFixed(2);
  else if (a >= 0.001) s = x.toFixed(3);
  else s = x.toExponential(2);
  return s.replace('-', '−');
}

/**
 * A difference, always signed. Small differences keep two significant digits in plain decimals
 * ("−0.00093", not "−9.31e-4"): they sit beside scores written that way and are read against
 * them.
 */
export function signed(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '—';
  if (x === 0) return '±0';
  const a = Math.abs(x);
  const body = a < 0.001 && a >= 1e-8
    ? x.toFixed(Math.min(9, 1 - Math.floor(Math.log10(a)))).replace('-', '−')
    : num(x);
  return (x > 0 ? '+' : '') + body;
}

/** "[low, high]" for a 95% interval. */
export function interval(est, fmt = num) {
  if (!est) return '';
  return `[${fmt(est.low)}, ${fmt(est.high)}]`;
}

/** Parse a timestamp: RFC 3339 text, or seconds / milliseconds since the epoch. */
export function toDate(t) {
  if (t === null || t === undefined || t === '') return null;
  if (typeof t === 'number') return new Date(t < 1e12 ? t * 1000 : t);
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? null : d;
}

/** "2025-05-01 14:03" in the viewer's time zone. */
export function dateTime(t) {
  const d = toDate(t);
  if (!d) return '—';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** "1 h 02 min", "3 min 05 s", "42 s". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return '—';
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, '0')} s`;
  const hrs = Math.floor(m / 60);
  return `${hrs} h ${String(m % 60).padStart(2, '0')} min`;
}

/** Elapsed time between two timestamps, or until now. */
export function elapsed(from, to) {
  const a = toDate(from);
  if (!a) return '—';
  const b = toDate(to) ?? new Date();
  return duration((b - a) / 1000);
}

export function bytes(n) {
  if (!Number.isFinite(n)) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

export const ACTIVE = new Set(['queued', 'running']);
export const isActive = (status) => ACTIVE.has(status);

/** A run's display name: its name, else the start of its id. */
export function runLabel(run) {
  return run?.name || shortId(run?.id);
}

// Run ids are UUIDv7: the leading digits are a timestamp shared by runs made close together,
// so the short form is the random tail.
export function shortId(id) {
  return id ? `…${String(id).slice(-7)}` : '?';
}
