// The one module that talks to the server: every request, the bearer token, and what to do on a
// 401. Views call the functions exported here and never `fetch` themselves.
//
// Reads are open; mutating calls send `Authorization: Bearer TOKEN`. The token comes from the URL
// the server prints (`#token=…` or `?token=…`), is kept in localStorage, and is asked for with a
// dialog when the server answers 401.

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

async function request(method, path, { json, form, signal } = {}) {
  const mutating = method !== 'GET' && method !== 'HEAD';
  let rejected = false;
  for (;;) {
    const headers = { Accept: 'application/json' };
    const token = getToken();
    if (mutating && token) headers.Authorization = `Bearer ${token}`;
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
      throw new ApiError(0, `Could not reach the server (${e.message}). Is \`adapterlab serve\` still running?`);
    }
    if (res.status === 401) {
      const next = await askForToken({ rejected: rejected || Boolean(token) });
      if (!next) throw new ApiError(401, 'This action needs the server’s access token.');
      setToken(next);
      rejected = true;
      continue;
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
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
  runs: (opts) => request('GET', '/api/runs', opts),
  run: (id, opts) => request('GET', `/api/runs/${enc(id)}`, opts),
  samples: (id, opts) => request('GET', `/api/runs/${enc(id)}/samples`, opts),
  cancel: (id) => request('POST', `/api/runs/${enc(id)}/cancel`),
  createRun: (body) => request('POST', '/api/runs', { json: body }),
  adapters: (opts) => request('GET', '/api/adapters', opts),
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
  eventsUrl: (id) => `/api/runs/${enc(id)}/events`,
};
