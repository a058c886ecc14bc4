// The one module that talks to the server: every request, the bearer token, and what to do on a
// 401. Views call the functions exported here and never `fetch` themselves.
//
// Every call sends `Authorization: Bearer TOKEN` (the server asks for it on reads too, all but
// /api/health). The token comes from the URL the server prints (`#token=…` or `?token=…`), is
// kept in localStorage, and is asked for with a dialog when the server answers 401.
//
// A run's live events are Server-Sent Events read with `fetch` and parsed by lib/sse.js, not
// with EventSource, which cannot send headers.

import { sseParser } from './sse.js';

const TOKEN_KEY = 'adapterlab.token';

// Used only where localStorage is unavailable (disabled storage): then the token lasts for this
// page only.
let memoryToken = '';

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return memoryToken;
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    memoryToken = token || '';
  }
}


/**
 * Take a token from the page's URL (`#token=T`, `#/runs?token=T` or `?token=T`), store it and
 * remove it from the address bar so it does not end up in bookmarks or screenshots.
 * Returns true when one was found.
 */
export function captureTokenFromUrl() {
  const url = new URL(window.location.href);
  let token = url.searchParams.get('token');
  url.searchParams.delete('token');
  // The hash is a route with an optional query ("/runs?x=1"), or just a query ("token=T").
  const hash = url.hash.replace(/^#/, '');
  const q = hash.indexOf('?');
  let route = q === -1 ? hash : hash.slice(0, q);
  let query = q === -1 ? '' : hash.slice(q + 1);
  if (!route.startsWith('/')) {
    query = [route, query].filter(Boolean).join('&');
    route = '';
  }
  const params = new URLSearchParams(query);
  if (params.has('token')) {
    token = params.get('token');
    params.delete('token');
  }
  if (token === null) return false;
  setToken(token);
  const rest = params.toString();
  url.hash = route ? route + (rest ? `?${rest}` : '') : '';
  window.history.replaceState(null, '', url.pathname + url.search + url.hash);
  return true;
}

/** An HTTP error with the server's `{"error": "..."}` message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

// Set by the app: shows the token dialog and resolves to the new token, or null if dismissed.
let askForToken = async () => null;
export function onUnauthorized(fn) {
  askForToken = fn;
}

// Set by the app: told whether the server answered at all, after every call (the footer shows
// "server not reachable" within seconds of a failed call, and clears it on the next answer).
let reachability = () => {};
export function onReachability(fn) {
  reachability = fn;
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function request(method, path, { json, form, signal, raw = false } = {}) {
  let rejected = false;
  for (;;) {
    const headers = authHeaders({ Accept: 'application/json' });
    const token = getToken();
    let body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // The browser sets the multipart boundary.
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body, signal, cache: 'no-store' });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      reachability(false);
      throw new ApiError(0, `Could not reach the server (${e.message}). Is \`adapterlab serve\` still running?`);
    }
    reachability(true);
    if (res.status === 401) {
      const next = await askForToken({ rejected: rejected || Boolean(token) });
      if (!next) throw new ApiError(401, await errorMessage(res).catch(() => 'The server needs its access token.'));
      setToken(next);
      rejected = true;
      continue;
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    if (raw) {
      const name = /filename="([^"]+)"/.exec(res.headers.get('Content-Disposition') ?? '')?.[1] ?? 'download';
      return { blob: await res.blob(), filename: name };
    }
    if (res.status === 204) return null;
    const text = await res.text();
    if (text === '') return null;
    try {
      return JSON.parse(text);
    } catch {
      throw new ApiError(res.status, `The server sent something that is not JSON for ${method} ${path}.`);
    }
  }
}

async function errorMessage(res) {
  const text = await res.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === 'string') return body.error;
    // The OpenAI-compatible routes answer in OpenAI's shape.
    if (body && typeof body.error?.message === 'string') return body.error.message;
  } catch {
    // Not JSON: fall through to the status line.
  }
  const detail = text && text.length < 300 ? `: ${text}` : '';
  if (res.status === 413) return `The request is larger than the server accepts (413)${detail}`;
  return `${res.status} ${res.statusText}${detail}`;
}

const enc = encodeURIComponent;

// Plugins change rarely and two pages need them; keep one copy until an upload.
let pluginsCache = null;

export const api = {
  health: (opts) => request('GET', '/api/health', opts),
  schemas: (opts) => request('GET', '/api/schema', opts),
  runs: (opts) => request('GET', '/api/runs', opts),
  run: (id, opts) => request('GET', `/api/runs/${enc(id)}`, opts),
  // The one place samples are requested: when the server pages them, only this changes.
  samples: (id, opts) => request('GET', `/api/runs/${enc(id)}/samples`, opts),
  cancel: (id) => request('POST', `/api/runs/${enc(id)}/cancel`),
  resume: (id) => request('POST', `/api/runs/${enc(id)}/resume`),
  deleteRun: (id) => request('DELETE', `/api/runs/${enc(id)}`),
  /** `patch`: `{ tags?: string[], notes?: string }`. */
  updateRun: (id, patch) => request('PATCH', `/api/runs/${enc(id)}`, { json: patch }),
  createRun: (body) => request('POST', '/api/runs', { json: body }),
  adapters: (opts) => request('GET', '/api/adapters', opts),
  pushAdapter: (name, body) => request('POST', `/api/adapters/${enc(name)}/push`, { json: body }),
  /** A report rendered by the server's reporter plugin: `{ blob, filename }`. */
  report: (ids, format, opts) => request('GET', `/api/report?runs=${ids.map(enc).join(',')}&format=${enc(format)}`, { ...opts, raw: true }),
  compare: (ids, opts) => request('GET', `/api/compare?runs=${ids.map(enc).join(',')}`, opts),
  plugins({ fresh = false } = {}) {
    if (fresh || !pluginsCache) {
      pluginsCache = request('GET', '/api/plugins');
      pluginsCache.catch(() => {
        pluginsCache = null;
      });
    }
    return pluginsCache;
  },
  async uploadPlugin(file) {
    const form = new FormData();
    form.append('file', file, file.name);
    const plugin = await request('POST', '/api/plugins', { form });
    pluginsCache = null;
    return plugin;
  },
  async uninstallPlugin(name) {
    const removed = await request('DELETE', `/api/plugins/${enc(name)}`);
    pluginsCache = null;
    return removed;
  },
  /** The models the server can chat with: the served base and every stored adapter. */
  chatModels: (opts) => request('GET', '/v1/models', opts),
  chat: (body, handlers) => chatStream(body, handlers),
  followEvents: (id, handlers) => followEvents(`/api/runs/${enc(id)}/events`, handlers),
};

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => {
    clearTimeout(t);
    resolve();
  }, { once: true });
});

/**
 * Follow a Server-Sent Events stream with `fetch` and the bearer header. After a dropped
 * connection it reconnects with `Last-Event-ID` (the id of the last event received), so the
 * server sends only what came after; when the server ends the stream itself (it does once the
 * run has finished) it reconnects only if `shouldReconnect()` says so.
 *
 * Handlers: `onEvent({ type, data, lastEventId })`, `onState(state, message?)` with state
 * 'connecting' | 'live' | 'reconnecting' | 'closed', `shouldReconnect()`, and `signal` (aborting
 * it closes the stream). Returns `{ close() }`.
 */
function followEvents(path, { onEvent, onState = () => {}, shouldReconnect = () => true, signal } = {}) {
  const controller = new AbortController();
  signal?.addEventListener('abort', () => controller.abort(), { once: true });
  let lastId = '';
  let closed = false;
  (async () => {
    let failures = 0;
    let rejected = false;
    let message;
    while (!closed && !controller.signal.aborted) {
      onState(failures || lastId ? 'reconnecting' : 'connecting');
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (lastId) headers['Last-Event-ID'] = lastId;
        const res = await fetch(path, { headers, signal: controller.signal, cache: 'no-store' });
        reachability(true);
        if (res.status === 401) {
          const next = await askForToken({ rejected: rejected || Boolean(headers.Authorization) });
          if (!next) {
            message = await errorMessage(res);
            break;
          }
          setToken(next);
          rejected = true;
          continue;
        }
        if (!res.ok) {
          // 404 (the run was deleted) and other refusals will not mend by retrying.
          message = await errorMessage(res);
          if (res.status < 500) break;
          throw new ApiError(res.status, message);
        }
        failures = 0;
        onState('live');
        const parser = sseParser((ev) => {
          lastId = ev.lastEventId;
          onEvent(ev);
        }, { lastEventId: lastId });
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
        }
        if (!shouldReconnect()) break;
      } catch (e) {
        if (controller.signal.aborted) break;
        if (e instanceof TypeError) reachability(false);
        failures += 1;
      }
      if (closed || controller.signal.aborted) break;
      await sleep(Math.min(10_000, 500 * 2 ** failures), controller.signal);
    }
    onState('closed', message);
  })();
  return {
    close() {
      closed = true;
      controller.abort();
    },
  };
}

/**
 * A streamed chat completion (POST /v1/chat/completions with `stream: true`): calls
 * `onDelta(text)` for every piece of the reply as it comes. Resolves to the whole reply and the
 * usage the server reported, if any; rejects with the server's message.
 */
async function chatStream(body, { onDelta = () => {}, signal } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = authHeaders({ Accept: 'text/event-stream', 'Content-Type': 'application/json' });
    let res;
    try {
      res = await fetch('/v1/chat/completions', { method: 'POST', headers, body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }), signal });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      reachability(false);
      throw new ApiError(0, `Could not reach the server (${e.message}).`);
    }
    reachability(true);
    if (res.status === 401 && attempt === 0) {
      const next = await askForToken({ rejected: Boolean(headers.Authorization) });
      if (!next) throw new ApiError(401, await errorMessage(res));
      setToken(next);
      continue;
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    let text = '';
    let usage = null;
    let failure = null;
    const parser = sseParser((ev) => {
      if (ev.data === '[DONE]') return;
      let chunk;
      try {
        chunk = JSON.parse(ev.data);
      } catch {
        return;
      }
      // An error mid-stream comes as an event with OpenAI's error shape.
      if (chunk.error) {
        failure = chunk.error.message ?? String(chunk.error);
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        text += piece;
        onDelta(piece);
      }
    });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    if (failure) throw new ApiError(500, failure);
    return { text, usage };
  }
}
