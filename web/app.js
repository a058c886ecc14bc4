// The dashboard's entry point: hash routing, the token dialog, and page-level announcements.
// Each page lives in views/ and is mounted into <main> with a context whose `signal` aborts when
// the page is left, so polling loops, event streams and charts stop with it.
//
// Routes: #/runs, #/runs/ID, #/launch[?kind=train|generate][&clone=ID],
// #/compare?runs=A,B[&sample=ID], #/plugins, #/playground.

import { api, captureTokenFromUrl, getToken, onReachability, onUnauthorized, setToken } from './lib/api.js';
import { mountRuns } from './views/runs.js';
import { mountRun } from './views/run.js';
import { mountLaunch } from './views/launch.js';
import { mountCompare } from './views/compare.js';
import { mountPlugins } from './views/plugins.js';
import { mountPlayground } from './views/playground.js';

const ROUTES = [
  { pattern: /^\/runs\/?$/, nav: 'runs', mount: mountRuns },
  { pattern: /^\/runs\/([^/]+)$/, nav: 'runs', mount: mountRun },
  { pattern: /^\/launch$/, nav: 'launch', mount: mountLaunch },
  { pattern: /^\/compare$/, nav: 'compare', mount: mountCompare },
  { pattern: /^\/plugins$/, nav: 'plugins', mount: mountPlugins },
  { pattern: /^\/playground$/, nav: 'playground', mount: mountPlayground },
];

const main = document.getElementById('main');
const announcer = document.getElementById('announcer');

/** Say something to screen-reader users without moving focus. */
export function announce(message) {
  announcer.textContent = '';
  // A fresh text node after a tick makes repeated messages be read again.
  setTimeout(() => {
    announcer.textContent = message;
  }, 50);
}

function parseHash() {
  let raw = window.location.hash.replace(/^#/, '');
  try {
    raw = decodeURI(raw);
  } catch {
    // A malformed %-escape: route on the text as it is.
  }
  raw ||= '/runs';
  const q = raw.indexOf('?');
  const path = q === -1 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q === -1 ? '' : raw.slice(q + 1));
  return { path, params };
}

let current = null; // { route, path, controller, view }

async function route(force = false) {
  const { path, params } = parseHash();
  // The same page with new parameters (a compare drill-down, say) can update in place.
  if (!force && current && current.path === path && current.view?.update) {
    if (current.view.update(params) !== false) return;
  }
  current?.controller.abort();
  const controller = new AbortController();
  const match = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (match && a.dataset.nav === match.r.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  current = { path, controller, view: null };
  updateTokenButton(); // another tab may have changed it
  const ctx = {
    signal: controller.signal,
    params,
    announce,
    setTitle(title) {
      document.title = `${title} · adapterlab`;
    },
  };
  main.replaceChildren();
  if (!match) {
    ctx.setTitle('Not found');
    main.innerHTML = '<h1 tabindex="-1">Page not found</h1><p>There is no page here. <a href="#/runs">Go to the runs</a>.</p>';
    focusHeading();
    return;
  }
  try {
    const view = await match.r.mount(main, { ...ctx, id: match.m[1] ? decodeURIComponent(match.m[1]) : undefined });
    if (controller.signal.aborted) return;
    current.view = view ?? null;
  } catch (e) {
    if (e.name === 'AbortError' || controller.signal.aborted) return;
    console.error(e);
    main.replaceChildren();
    const h1 = document.createElement('h1');
    h1.textContent = 'Something went wrong';
    h1.tabIndex = -1;
    const p = document.createElement('p');
    p.className = 'form-error';
    p.setAttribute('role', 'alert');
    p.textContent = e.message;
    main.append(h1, p);
  }
  if (!controller.signal.aborted) focusHeading();
}

let firstRoute = true;
// After navigation, move focus to the page's heading so keyboard and screen-reader users start
// at the new content; on the very first load the browser's own starting point is kept.
function focusHeading() {
  const h1 = main.querySelector('h1');
  if (!h1) return;
  h1.tabIndex = -1;
  if (firstRoute) {
    firstRoute = false;
    return;
  }
  h1.focus({ preventScroll: false });
  announce(h1.textContent);
}

// --- Token dialog ---------------------------------------------------------------------------

const dialog = document.getElementById('token-dialog');
const tokenInput = document.getElementById('token-input');
const tokenError = document.getElementById('token-dialog-error');
let pendingAsk = null;

/**
 * Show the token dialog; resolves to the token entered, or null when dismissed. `needed` is set
 * when a request was refused (401), `rejected` when the token sent was wrong.
 */
function askToken({ needed = false, rejected = false } = {}) {
  if (pendingAsk) return pendingAsk;
  document.getElementById('token-dialog-title').textContent = needed ? 'Access token needed' : 'Access token';
  tokenError.hidden = !rejected;
  tokenInput.value = '';
  pendingAsk = new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener('close', onClose);
      pendingAsk = null;
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === 'save' ? tokenInput.value.trim() || null : null);
    dialog.addEventListener('close', onClose);
    dialog.returnValue = '';
    dialog.showModal();
    tokenInput.focus();
  });
  return pendingAsk;
}

document.getElementById('token-cancel').addEventListener('click', () => dialog.close('cancel'));
document.getElementById('token-form').addEventListener('submit', (e) => {
  if (!tokenInput.value.trim()) {
    e.preventDefault();
    tokenInput.focus();
  }
});
document.getElementById('token-button').addEventListener('click', async () => {
  const token = await askToken();
  if (token) {
    setToken(token);
    announce('Token saved.');
  }
  updateTokenButton();
});

function updateTokenButton() {
  const btn = document.getElementById('token-button');
  btn.textContent = getToken() ? 'Access token ✓' : 'Access token';
  btn.setAttribute('aria-label', getToken() ? 'Access token (saved); change it' : 'Access token (not set); enter it');
}

onUnauthorized(async ({ rejected }) => {
  const token = await askToken({ needed: true, rejected });
  if (token) setToken(token);
  updateTokenButton();
  return token;
});

// --- Start ----------------------------------------------------------------------------------

// Clicking the link of the page already shown starts that page afresh (the hash does not change,
// so no hashchange event would come).
document.addEventListener('click', (e) => {
  const a = e.target.closest?.('a[href^="#/"]');
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  if (a.getAttribute('href') === window.location.hash) {
    e.preventDefault();
    route(true);
  }
});

// The skip link's "#main" would otherwise be read as a route.
document.querySelector('[data-skip]').addEventListener('click', (e) => {
  e.preventDefault();
  main.focus();
});

captureTokenFromUrl();
updateTokenButton();
window.addEventListener('hashchange', () => route());
route();

// --- Scrollable tables ------------------------------------------------------------------------
// A wide table scrolls sideways inside its `.table-scroll` box on small screens; keyboard users
// can scroll it only if the box takes focus, so every such box is a focusable, named region.
function labelScrollers(root) {
  for (const box of root.querySelectorAll('.table-scroll:not([tabindex])')) {
    box.tabIndex = 0;
    box.setAttribute('role', 'region');
    const caption = box.querySelector('caption')?.textContent?.trim();
    const before = box.previousElementSibling;
    const heading = (before?.matches('h3') ? before : box.closest('section')?.querySelector('h2'))?.textContent?.trim();
    box.setAttribute('aria-label', caption || (heading ? `${heading} (table)` : 'Table'));
  }
}
new MutationObserver(() => labelScrollers(main)).observe(main, { childList: true, subtree: true });

// --- Server reachability --------------------------------------------------------------------
// The footer says whether the server answers: a health check every 5 s, and every other call
// reports too, so a server that went away shows within seconds, not never.

const footer = document.getElementById('server-version');
let version = '';
let reachable = null;
function showReachability(ok) {
  reachable = ok;
  const text = `adapterlab ${version} · ${ok ? 'server ok' : 'server not reachable'}`.replace('  ', ' ');
  // The footer is a status region: only a real change is written (and so announced).
  if (footer.textContent === text) return;
  footer.dataset.reachable = String(ok);
  footer.textContent = text;
  footer.classList.toggle('error-text', !ok);
}
onReachability(showReachability);
async function checkHealth() {
  try {
    const h = await api.health();
    version = h?.version ?? version;
    showReachability(h?.status === 'ok');
  } catch {
    showReachability(false);
  }
  setTimeout(checkHealth, reachable ? 5000 : 2000);
}
checkHealth();
