// The plugins page: what is installed (metrics, formatters, reporters) and an upload form for a
// new .wasm component, which the server validates before installing.

import { api } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { bytes, num } from '../lib/format.js';
import { field, messageBox, setFieldError } from './common.js';

export async function mountPlugins(main, ctx) {
  ctx.setTitle('Plugins');
  const listHost = h('section', { 'aria-labelledby': 'installed-h', class: 'panel' });
  const file = h('input', { type: 'file', name: 'file', accept: '.wasm,application/wasm' });
  const button = h('button', { type: 'submit', class: 'primary' }, 'Upload and validate');
  const box = messageBox();
  const form = h('form', { class: 'panel', 'aria-labelledby': 'upload-h', novalidate: true, 'data-testid': 'plugin-upload' },
    h('h2', { id: 'upload-h' }, 'Add a plugin'),
    field({ id: 'plugin-file', label: 'Plugin component (.wasm)', input: file,
      hint: 'A WebAssembly component built against the adapterlab:plugin contract. The server checks it before installing; metrics show up in the evaluation form straight away.' }),
    box.el,
    h('div', { class: 'actions' }, button),
  );
  replace(main, h('h1', {}, 'Plugins'), listHost, form);

  let highlight = null;
  const load = async (fresh) => {
    try {
      const plugins = await api.plugins({ fresh });
      if (ctx.signal.aborted) return;
      renderList(listHost, plugins, highlight);
    } catch (e) {
      if (ctx.signal.aborted) return;
      replace(listHost, h('h2', { id: 'installed-h' }, 'Installed'), h('p', { class: 'form-error', role: 'alert' }, `Could not load plugins: ${e.message}`));
    }
  };

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    box.clear();
    const f = file.files?.[0];
    if (!f) {
      setFieldError(file, 'Choose a .wasm file.');
      file.focus();
      return;
    }
    if (!/\.wasm$/i.test(f.name)) {
      setFieldError(file, `${f.name} is not a .wasm file.`);
      file.focus();
      return;
    }
    setFieldError(file, null);
    button.disabled = true;
    button.textContent = 'Validating…';
    try {
      const plugin = await api.uploadPlugin(f);
      highlight = plugin?.name ?? null;
      box.ok([
        h('strong', {}, `Installed ${plugin.name} ${plugin.version ?? ''}`), ` (${plugin.kind}). `,
        plugin.kind === 'metric' ? [`Scores: ${(plugin.scores ?? []).map((s) => s.name).join(', ') || 'none'}. `, 'It is now in the ', h('a', { href: '#/launch' }, 'evaluation form'), '.'] : null,
      ]);
      ctx.announce(`Plugin ${plugin.name} installed.`);
      form.reset();
      await load(true);
    } catch (err) {
      box.error([h('strong', {}, 'The plugin was not installed. '), err.message]);
    } finally {
      button.disabled = false;
      button.textContent = 'Upload and validate';
    }
  });

  // Uninstall, from any row's button: user plugins only (the server refuses built-ins).
  listHost.addEventListener('click', async (e) => {
    const button = e.target.closest('button[data-uninstall]');
    if (!button) return;
    const name = button.dataset.uninstall;
    if (!window.confirm(`Uninstall the plugin ${name}? Runs that used it keep their scores.`)) return;
    box.clear();
    button.disabled = true;
    try {
      await api.uninstallPlugin(name);
      box.ok([h('strong', {}, `Uninstalled ${name}.`), ' Runs that used it keep their scores and its provenance.']);
      ctx.announce(`Plugin ${name} uninstalled.`);
      highlight = null;
      await load(true);
    } catch (err) {
      box.error([h('strong', {}, `${name} was not uninstalled. `), err.message]);
      button.disabled = false;
    }
  });

  await load(false);
}

function source(p) {
  const s = p.source ?? {};
  if (s.type === 'builtin') return 'built in';
  if (s.type === 'file') return h('span', { class: 'mono small', title: s.path }, s.path);
  return s.type ?? '—';
}

function renderList(host, plugins, highlight) {
  const kinds = ['metric', 'formatter', 'reporter'];
  const byKind = kinds.map((k) => [k, plugins.filter((p) => p.kind === k)]);
  const other = plugins.filter((p) => !kinds.includes(p.kind));
  if (other.length) byKind.push(['other', other]);
  replace(host,
    h('h2', { id: 'installed-h' }, 'Installed'),
    h('p', { class: 'muted' }, `${plugins.length} plugin${plugins.length === 1 ? '' : 's'}.`),
    byKind.filter(([, list]) => list.length).map(([kind, list]) => [
      h('h3', {}, `${kind[0].toUpperCase()}${kind.slice(1)}s`),
      h('div', { class: 'table-scroll' }, h('table', { class: 'data plugins-table', 'data-testid': `plugins-${kind}` },
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col' }, 'Name'),
          h('th', { scope: 'col' }, 'Version'),
          h('th', { scope: 'col' }, 'Language'),
          h('th', { scope: 'col' }, 'Capabilities'),
          h('th', { scope: 'col' }, 'Source'),
          h('th', { scope: 'col' }, kind === 'metric' ? 'Scores' : kind === 'reporter' ? 'Format' : kind === 'formatter' ? 'Required fields' : 'Details'),
        )),
        h('tbody', {}, list.map((p) => h('tr', { class: p.name === highlight ? 'highlight' : null, 'data-plugin': p.name },
          h('th', { scope: 'row' }, p.name, p.description ? h('div', { class: 'muted small' }, p.description) : null),
          h('td', {}, p.version ?? '—', p.contract ? h('div', { class: 'muted small' }, `contract ${p.contract}`) : null),
          h('td', {}, p.language ?? '—'),
          h('td', {}, (p.capabilities ?? []).length ? h('ul', { class: 'tags' }, p.capabilities.map((c) => h('li', {}, c))) : h('span', { class: 'muted' }, 'none')),
          h('td', {}, source(p),
            p.sha256 ? h('div', { class: 'muted small mono', title: `sha256 ${p.sha256}` }, `sha256 ${p.sha256.slice(0, 12)}…`) : null,
            Number.isFinite(p.size_bytes) ? h('div', { class: 'muted small' }, bytes(p.size_bytes)) : null,
            p.source?.type === 'file'
              ? h('button', { type: 'button', class: 'small danger', 'data-uninstall': p.name, 'aria-label': `Uninstall ${p.name}` }, 'Uninstall')
              : null),
          h('td', {}, details(p)),
        ))),
      )),
    ]),
  );
}

function details(p) {
  if (p.kind === 'metric') {
    const scores = p.scores ?? [];
    if (!scores.length) return '—';
    return h('ul', { class: 'plain' }, scores.map((s) => h('li', { title: s.description ?? '' },
      h('strong', {}, s.name), ' ',
      h('span', { class: 'muted small' }, `${num(s.min)}–${num(s.max)}, ${s.higher_is_better ? 'higher' : 'lower'} is better`))));
  }
  if (p.kind === 'reporter') return p.format ?? '—';
  if (p.kind === 'formatter') return (p.required_fields ?? []).join(', ') || '—';
  return '—';
}
