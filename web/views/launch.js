// The launch page: a training form and an evaluation form. Everything is checked in the browser
// first, with the message next to the field; what the server still rejects (4xx with
// {"error": ...}) is shown above the submit button. On 201 the page moves to the new run.
//
// Payloads (POST /api/runs; the server's OpenAPI document at /api/openapi.json has them all):
//   train:    {"kind":"train","name"?,"config":{model_name_or_path,dataset,formatter,
//              num_train_epochs,max_steps?,learning_rate,per_device_train_batch_size,
//              gradient_accumulation_steps,lr_scheduler_type,warmup_ratio,max_seq_length,
//              lora:{r,lora_alpha,lora_dropout,target_modules?}}}   (HF key names)
//   eval:     {"kind":"eval","name","predictions":[{id,prediction,reference|references,source?}],
//              "metrics":[...],"settings":{metric:{key:value}},"score_references":bool}
//   generate: {"kind":"generate","name","model","adapter"?,"dataset","split","limit"?,
//              "max_new_tokens","temperature","top_k"?,"top_p"?,"repetition_penalty","seed",
//              "metrics":[...],"settings":{...},"score_references":bool}
//             (every decoding setting is sent, never left to a server default; the reference
//             notebook's settings are a named preset)
//
// `#/launch?clone=ID` prefills the form from run ID (its `request` for train and generate runs,
// its metadata for evaluations, whose predictions file must be chosen again).

import { api, ApiError } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { configLines, parseConfigLines, parseList, parseNumber, parsePredictions, parseSettings } from '../lib/parse.js';
import { field, messageBox, setFieldError } from './common.js';

const MAX_ERRORS_SHOWN = 20;

export async function mountLaunch(main, ctx) {
  ctx.setTitle('Launch');
  const which = ctx.params.get('kind') === 'train' ? 'train' : 'eval';
  const evalForm = h('div');
  const trainForm = h('div');
  const pick = (value, label) => {
    const input = h('input', { type: 'radio', name: 'launch-kind', id: `launch-${value}`, value });
    input.checked = value === which;
    input.addEventListener('change', () => show(value));
    return h('div', { class: 'check' }, input, h('label', { for: `launch-${value}` }, label));
  };
  const show = (value) => {
    evalForm.hidden = value !== 'eval';
    trainForm.hidden = value !== 'train';
  };
  replace(main,
    h('h1', {}, 'Launch a run'),
    h('fieldset', { class: 'segmented' },
      h('legend', {}, 'What to launch'),
      pick('eval', 'Evaluation'),
      pick('train', 'Training'),
    ),
    evalForm,
    trainForm,
  );
  show(which);

  // Fill both forms once their lists (metrics, formatters, adapters) are known; a failed list
  // leaves a message in the form rather than a blank page.
  const [plugins, adapters, schemas] = await Promise.all([
    api.plugins().catch((e) => e),
    api.adapters({ signal: ctx.signal }).catch((e) => e),
    api.schemas({ signal: ctx.signal }).catch(() => null),
  ]);
  if (ctx.signal.aborted) return;
  const evalBuilt = buildEvalForm(ctx, plugins, adapters, schemas?.generate ?? null);
  const trainBuilt = buildTrainForm(ctx, plugins, schemas?.train ?? null);
  evalForm.replaceChildren(evalBuilt);
  trainForm.replaceChildren(trainBuilt);

  if (ctx.params.get('kind') === 'generate') {
    const radio = evalBuilt.querySelector('#eval-source-generate');
    radio.checked = true;
    radio.dispatchEvent(new Event('change'));
  }

  // Clone: the form of the run's kind, filled with its settings.
  const cloneId = ctx.params.get('clone');
  if (cloneId) {
    let run;
    try {
      run = await api.run(cloneId, { signal: ctx.signal });
    } catch (e) {
      if (ctx.signal.aborted) return;
      main.insertBefore(h('p', { class: 'message form-error', role: 'alert' }, `Could not load the run to clone: ${e.message}`), main.children[1]);
      return;
    }
    if (ctx.signal.aborted) return;
    const kind = run.kind === 'train' ? 'train' : 'eval';
    document.getElementById(`launch-${kind}`).checked = true;
    show(kind);
    (kind === 'train' ? trainBuilt : evalBuilt).prefill(run);
    main.insertBefore(h('p', { class: 'message form-ok', role: 'status', 'data-testid': 'clone-note' },
      `Settings copied from ${run.name || run.id}. `,
      run.kind === 'eval' ? 'Choose its predictions file again; ' : '',
      'change what you like, then launch.'), main.children[1]);
  }
}

// --- Shared helpers -------------------------------------------------------------------------

function input(props) {
  return h('input', { type: 'text', ...props });
}

/**
 * Validate fields: `checks` is `[input, () => message | null]`; focuses the first bad one.
 * `alsoMarked` counts problems marked outside `checks` (the metrics fieldset), so the summary's
 * number is the number of places marked in red.
 */
function validate(checks, form, alsoMarked = 0) {
  let first = null;
  let bad = alsoMarked;
  for (const [el, check] of checks) {
    const message = check();
    setFieldError(el, message);
    if (message) {
      bad += 1;
      first ??= el;
    }
  }
  if (first) first.focus();
  if (bad) form.error(`Fix ${bad === 1 ? 'the field' : `the ${bad} fields`} marked in red, then launch again.`);
  return bad === 0;
}

async function submit(body, button, box, ctx) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = 'Launching…';
  box.clear();
  try {
    const res = await api.createRun(body);
    if (!res?.id) throw new ApiError(0, 'The server accepted the run but sent no id.');
    ctx.announce('Run launched.');
    window.location.hash = `#/runs/${encodeURIComponent(res.id)}`;
  } catch (e) {
    box.error(e.status ? `The server refused the run (${e.status}): ${e.message}` : e.message);
    box.el.focus();
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// The form-wide message goes once the person has dealt with every marked field.
function clearWhenFixed(form, box) {
  if (!form.querySelector('[aria-invalid="true"]') && !form.querySelector('.field-error:not([hidden])')) box.clear();
}

function sentence(s) {
  const t = String(s ?? '').trim();
  return t && !/[.!?]$/.test(t) ? `${t}.` : t;
}

function listMessage(what, value) {
  return value instanceof Error ? h('p', { class: 'form-error', role: 'alert' }, `Could not load ${what}: ${value.message}`) : null;
}

// --- Evaluation -----------------------------------------------------------------------------

function buildEvalForm(ctx, plugins, adapters, decodingSchema = null) {
  const metrics = Array.isArray(plugins) ? plugins.filter((p) => p.kind === 'metric') : [];
  const box = messageBox();
  box.el.tabIndex = -1;

  const name = input({ name: 'name', autocomplete: 'off', required: true, placeholder: 'e.g. adapter-a' });

  // Where predictions come from.
  const sourceChoice = (value, label) => {
    const el = h('input', { type: 'radio', name: 'eval-source', id: `eval-source-${value}`, value });
    el.checked = value === 'file';
    el.addEventListener('change', () => showSource());
    return [el, h('div', { class: 'check' }, el, h('label', { for: `eval-source-${value}` }, label))];
  };
  const [fileRadio, fileChoice] = sourceChoice('file', 'Upload a predictions file (JSONL)');
  const [, generateChoice] = sourceChoice('generate', 'Generate predictions with a model and adapter');

  const file = h('input', { type: 'file', name: 'predictions', accept: '.jsonl,.json,.ndjson,.txt,application/jsonl,application/x-ndjson' });
  const fileStatus = h('div', { class: 'file-status', 'aria-live': 'polite', 'data-testid': 'predictions-status' });
  let parsed = null; // { rows, errors, fileName }
  file.addEventListener('change', async () => {
    parsed = null;
    setFieldError(file, null);
    fileStatus.replaceChildren();
    const f = file.files?.[0];
    if (!f) return;
    fileStatus.textContent = `Reading ${f.name}…`;
    const result = parsePredictions(new Uint8Array(await f.arrayBuffer()));
    parsed = { ...result, fileName: f.name };
    if (result.errors.length === 0) {
      replace(fileStatus, h('p', { class: 'form-ok' }, `✓ ${result.rows.length} sample${result.rows.length === 1 ? '' : 's'} read from ${f.name}.`));
      return;
    }
    setFieldError(file, `${f.name} has ${result.errors.length} bad line${result.errors.length === 1 ? '' : 's'}; fix the file and choose it again.`);
    replace(fileStatus,
      h('ol', { class: 'line-errors', 'aria-label': `Problems in ${f.name}`, 'data-testid': 'predictions-errors' },
        result.errors.slice(0, MAX_ERRORS_SHOWN).map((e) => h('li', {}, e.line ? `line ${e.line}: ${e.message}` : e.message))),
      result.errors.length > MAX_ERRORS_SHOWN ? h('p', { class: 'muted' }, `… and ${result.errors.length - MAX_ERRORS_SHOWN} more.`) : null,
    );
  });
  const fileFields = h('div', {},
    field({ id: 'eval-file', label: 'Predictions file', input: file,
      hint: 'JSON Lines: one object per line with "id", "prediction", "reference" (or "references", a list: metrics take the best) and optionally "source". Checked here before anything is sent.' }),
    fileStatus,
  );

  const genModel = input({ name: 'model', value: 'smollm2', autocomplete: 'off' });
  const adapterList = Array.isArray(adapters) ? adapters : [];
  const genAdapter = h('select', { name: 'adapter' },
    h('option', { value: '' }, 'None (base model)'),
    adapterList.map((a) => h('option', { value: a.name }, `${a.name}${a.base_model ? ` (${a.base_model})` : ''}`)),
  );
  const genDataset = input({ name: 'dataset', value: 'bundled', autocomplete: 'off' });
  const genSplit = h('select', { name: 'split' }, ['test', 'validation', 'train'].map((v) => h('option', { value: v }, v)));
  const genLimit = input({ name: 'limit', inputmode: 'numeric', placeholder: 'all rows' });
  const decoding = decodingFields(decodingSchema);
  const generateFields = h('div', { hidden: true },
    h('div', { class: 'grid-fields' },
      field({ id: 'gen-model', label: 'Model', input: genModel }),
      field({ id: 'gen-adapter', label: 'Adapter', input: genAdapter,
        hint: adapterList.length ? 'Trained adapters known to the server.' : 'No adapters yet: train one, or evaluate the base model.' }),
      field({ id: 'gen-dataset', label: 'Dataset', input: genDataset, hint: '"bundled" is the small dataset shipped with adapterlab.' }),
      field({ id: 'gen-split', label: 'Split', input: genSplit }),
      field({ id: 'gen-limit', label: 'Sample limit', input: genLimit, hint: 'Only the first this many rows; empty for all.' }),
    ),
    listMessage('adapters', adapters),
    decoding.el,
  );
  const showSource = () => {
    fileFields.hidden = !fileRadio.checked;
    generateFields.hidden = fileRadio.checked;
  };

  // Metrics and their settings.
  const metricsError = h('p', { class: 'field-error', id: 'metrics-error', hidden: true });
  let metricsFieldset = null;
  const metricRows = metrics.map((p) => {
    const box = h('input', { type: 'checkbox', name: 'metrics', value: p.name, id: `metric-${p.name}`, 'aria-describedby': `metric-${p.name}-desc`, 'data-testid': `metric-${p.name}` });
    const settings = h('textarea', { rows: 2, id: `settings-${p.name}`, name: `settings-${p.name}`, class: 'mono', placeholder: 'key=value, one per line', spellcheck: 'false' });
    const settingsField = field({ id: `settings-${p.name}`, label: `Settings for ${p.name}`, input: settings, className: 'metric-settings' });
    settingsField.hidden = true;
    box.addEventListener('change', () => {
      settingsField.hidden = !box.checked;
      if (box.checked) {
        metricsError.hidden = true;
        metricsFieldset.removeAttribute('aria-invalid');
      }
    });
    const scores = (p.scores ?? []).map((s) => s.name).join(', ');
    return {
      name: p.name, box, settings,
      el: h('li', { class: 'metric-choice' },
        h('div', { class: 'check' }, box, h('label', { for: `metric-${p.name}` }, p.name)),
        h('p', { class: 'hint', id: `metric-${p.name}-desc` }, [sentence(p.description), scores && `Scores: ${scores}.`, p.version && `Version ${p.version}.`].filter(Boolean).join(' ')),
        settingsField,
      ),
    };
  });
  metricsFieldset = h('fieldset', { 'aria-describedby': 'metrics-error', 'data-testid': 'metrics' },
    h('legend', {}, 'Metrics'),
    listMessage('the metrics', plugins),
    metrics.length ? h('ul', { class: 'plain metric-list' }, metricRows.map((m) => m.el))
      : Array.isArray(plugins) ? h('p', { class: 'muted' }, 'No metric plugins are installed. ', h('a', { href: '#/plugins' }, 'Upload one'), '.') : null,
    metricsError,
  );
  metricsFieldset.id = 'metrics';

  const scoreRefs = h('input', { type: 'checkbox', id: 'score-references', name: 'score_references' });
  // The endpoint the metrics' `chat` talks to for this run (the LLM judge's). The key stays on
  // the server, which sends it only to the endpoint it was configured for.
  const llmUrl = h('input', { type: 'url', id: 'eval-llm-base-url', name: 'llm_base_url', autocomplete: 'off', placeholder: 'the server\'s OPENAI_BASE_URL', class: 'mono' });
  const button = h('button', { type: 'submit', class: 'primary' }, 'Launch evaluation');
  const form = h('form', { novalidate: true, class: 'panel', 'aria-labelledby': 'eval-h', 'data-testid': 'eval-form' },
    h('h2', { id: 'eval-h' }, 'Evaluate predictions'),
    field({ id: 'eval-name', label: 'Name', input: name, hint: 'Shown in the runs list and in comparisons.' }),
    h('fieldset', {},
      h('legend', {}, 'Predictions'),
      fileChoice, generateChoice,
      fileFields, generateFields,
    ),
    metricsFieldset,
    h('div', { class: 'check' }, scoreRefs, h('label', { for: 'score-references' }, 'Also score the references against themselves (a ceiling for each metric)')),
    field({ id: 'eval-llm-base-url', label: 'LLM endpoint (for the judge)', input: llmUrl,
      hint: 'An OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1. Empty: the server’s own. The judge’s model is its setting model=…; the API key never leaves the server, and goes only to the endpoint it was set for.' }),
    box.el,
    h('div', { class: 'actions' }, button),
  );

  form.addEventListener('input', () => clearWhenFixed(form, box));
  form.addEventListener('change', () => clearWhenFixed(form, box));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    box.clear();
    const chosen = metricRows.filter((m) => m.box.checked);
    const settings = {};
    const checks = [
      [name, () => (name.value.trim() ? null : 'Give the run a name.')],
    ];
    if (fileRadio.checked) {
      checks.push([file, () => {
        if (!file.files?.length) return 'Choose a predictions file.';
        if (!parsed) return 'The file is still being read; try again in a moment.';
        if (parsed.errors.length) return `${parsed.fileName} has ${parsed.errors.length} bad line${parsed.errors.length === 1 ? '' : 's'} (listed below).`;
        return null;
      }]);
    } else {
      checks.push([genModel, () => (genModel.value.trim() ? null : 'Name a model, such as smollm2.')]);
      checks.push([genDataset, () => (genDataset.value.trim() ? null : 'Name a dataset, such as bundled.')]);
      checks.push([genLimit, () => parseNumber(genLimit.value, { integer: true, min: 1 }).error ?? null]);
      checks.push(...decoding.checks());
    }
    for (const m of chosen) {
      checks.push([m.settings, () => {
        const r = parseSettings(m.settings.value);
        if (r.errors.length) return r.errors.map((x) => `line ${x.line}: ${x.message}`).join('; ');
        if (Object.keys(r.settings).length) settings[m.name] = r.settings;
        return null;
      }]);
    }
    // The metric checkboxes share one message, on their fieldset.
    const noMetric = chosen.length === 0;
    metricsError.hidden = !noMetric;
    metricsError.textContent = noMetric ? 'Choose at least one metric.' : '';
    if (noMetric) metricsFieldset.setAttribute('aria-invalid', 'true');
    else metricsFieldset.removeAttribute('aria-invalid');
    checks.push([llmUrl, () => {
      const v = llmUrl.value.trim();
      if (!v) return null;
      try {
        const u = new URL(v);
        return ['http:', 'https:'].includes(u.protocol) ? null : 'Give an http(s) URL.';
      } catch {
        return 'Give a URL, such as http://127.0.0.1:8000/v1.';
      }
    }]);
    const ok = validate(checks, box, noMetric ? 1 : 0);
    if (!ok) {
      if (noMetric && !form.querySelector('[aria-invalid="true"]:not(fieldset)')) {
        box.error('Choose at least one metric before launching.');
        (metricRows[0]?.box ?? metricsFieldset).focus();
      }
      return;
    }
    const common = {
      name: name.value.trim(),
      metrics: chosen.map((m) => m.name),
      settings,
      score_references: scoreRefs.checked,
      ...(llmUrl.value.trim() ? { llm_base_url: llmUrl.value.trim() } : {}),
    };
    const body = fileRadio.checked
      ? { kind: 'eval', ...common, predictions: parsed.rows }
      : {
        kind: 'generate',
        ...common,
        model: genModel.value.trim(),
        dataset: genDataset.value.trim(),
        split: genSplit.value,
        ...(genLimit.value.trim() ? { limit: Number(genLimit.value) } : {}),
        ...(genAdapter.value ? { adapter: genAdapter.value } : {}),
        ...decoding.values(),
      };
    submit(body, button, box, ctx);
  });
  form.prefill = (run) => {
    const md = run.metadata ?? {};
    const req = run.request ?? {};
    name.value = `${run.name} (copy)`;
    const chosen = new Set(String(req.metrics ?? md.metrics ?? '').split(',').concat(req.metrics ?? []).map((m) => String(m).trim()).filter(Boolean));
    for (const m of metricRows) {
      m.box.checked = chosen.has(m.name);
      m.box.dispatchEvent(new Event('change'));
      const st = req.settings?.[m.name];
      if (st) m.settings.value = Object.entries(st).map(([k, v]) => `${k}=${v}`).join('\n');
    }
    scoreRefs.checked = Boolean(req.score_references);
    if (run.kind === 'generate') {
      form.querySelector('#eval-source-generate').checked = true;
      showSource();
      genModel.value = req.model ?? md.model ?? genModel.value;
      genAdapter.value = req.adapter ?? md.adapter ?? '';
      genDataset.value = req.dataset ?? md.dataset ?? genDataset.value;
      genSplit.value = req.split ?? md.split ?? 'test';
      genLimit.value = req.limit ?? md.limit ?? '';
      decoding.set({ ...md, ...req });
    }
  };
  return form;
}

// --- Decoding settings ----------------------------------------------------------------------

// Named presets: nothing about decoding is a hidden default. The reference notebook decodes
// with temperature 0.1 and top-k 1 (greedy in effect) and a repetition penalty of 30, which
// mangles a small model's summaries; the greedy preset turns the penalty off.
export const DECODING_PRESETS = {
  reference: { label: 'Reference notebook (temperature 0.1, top-k 1, repetition penalty 30, 50 new tokens)', mode: 'sample', max_new_tokens: 50, temperature: 0.1, top_k: 1, top_p: '', repetition_penalty: 30, seed: 0 },
  greedy: { label: 'Greedy, no repetition penalty (128 new tokens)', mode: 'greedy', max_new_tokens: 128, temperature: '', top_k: '', top_p: '', repetition_penalty: 1, seed: 0 },
  sample: { label: 'Sampling (temperature 0.7, top-p 0.9)', mode: 'sample', max_new_tokens: 128, temperature: 0.7, top_k: '', top_p: 0.9, repetition_penalty: 1.1, seed: 0 },
};

function decodingFields(schema = null) {
  const preset = h('select', { name: 'preset', class: 'wide' },
    Object.entries(DECODING_PRESETS).map(([k, p]) => h('option', { value: k }, p.label)),
    h('option', { value: 'custom' }, 'Custom'));
  const f = {
    max_new_tokens: input({ name: 'max_new_tokens', inputmode: 'numeric' }),
    temperature: input({ name: 'temperature', inputmode: 'decimal' }),
    top_k: input({ name: 'top_k', inputmode: 'numeric', placeholder: 'off' }),
    top_p: input({ name: 'top_p', inputmode: 'decimal', placeholder: 'off' }),
    repetition_penalty: input({ name: 'repetition_penalty', inputmode: 'decimal' }),
    seed: input({ name: 'seed', inputmode: 'numeric' }),
  };
  const bounds = {
    max_new_tokens: { integer: true, min: 1, max: 4096 },
    temperature: { min: 0, max: 2, minExclusive: true },
    top_k: { integer: true, min: 1, optional: true },
    top_p: { min: 0, max: 1, minExclusive: true, optional: true },
    repetition_penalty: { min: 0, minExclusive: true, max: 100 },
    seed: { integer: true, min: 0 },
  };
  // The server's maxima (one source: its decoding settings' table); the minima here are the
  // form's own, stricter by mode (sampling needs a temperature above 0, top-k empty is off).
  for (const key of Object.keys(bounds)) {
    const server = boundsOf(schema, key, bounds[key]);
    bounds[key] = { ...bounds[key], max: server.max, maxExclusive: false };
  }
  const modeRadio = (value, label) => {
    const el = h('input', { type: 'radio', name: 'decoding-mode', id: `decoding-${value}`, value });
    return [el, h('div', { class: 'check' }, el, h('label', { for: `decoding-${value}` }, label))];
  };
  const [greedy, greedyChoice] = modeRadio('greedy', 'Greedy (always the most likely token)');
  const [sample, sampleChoice] = modeRadio('sample', 'Sampling (temperature, top-k, top-p)');
  const samplingOnly = [f.temperature, f.top_k, f.top_p];
  const syncMode = () => {
    for (const el of samplingOnly) {
      el.disabled = greedy.checked;
      el.closest('.field')?.classList.toggle('disabled', greedy.checked);
    }
  };
  const apply = (p) => {
    greedy.checked = p.mode === 'greedy';
    sample.checked = p.mode !== 'greedy';
    for (const k of Object.keys(f)) f[k].value = p[k] ?? '';
    syncMode();
  };
  preset.addEventListener('change', () => {
    if (preset.value !== 'custom') apply(DECODING_PRESETS[preset.value]);
  });
  // Any edit makes the settings custom: the preset's name must never claim what is not sent.
  const toCustom = () => {
    preset.value = 'custom';
  };
  for (const el of [...Object.values(f), greedy, sample]) el.addEventListener('input', toCustom);
  for (const el of [greedy, sample]) el.addEventListener('change', () => {
    toCustom();
    syncMode();
  });
  preset.value = 'reference';
  apply(DECODING_PRESETS.reference);
  const F = (key, label, hint) => field({ id: `gen-${key}`, label, input: f[key], hint });
  const el = h('fieldset', { 'data-testid': 'decoding' },
    h('legend', {}, 'Decoding'),
    field({ id: 'gen-preset', label: 'Preset', input: preset, hint: 'Fills the settings below; changing any of them makes them custom. Every setting is sent and kept with the run.' }),
    h('fieldset', { class: 'segmented' }, h('legend', {}, 'Mode'), greedyChoice, sampleChoice),
    h('div', { class: 'grid-fields' },
      F('max_new_tokens', 'Max new tokens'),
      F('repetition_penalty', 'Repetition penalty', '1 is off; above 1 discourages repeating tokens.'),
      F('seed', 'Seed'),
      F('temperature', 'Temperature', 'Sampling only; above 0, at most 2.'),
      F('top_k', 'Top-k', 'Sampling only; empty for off.'),
      F('top_p', 'Top-p', 'Sampling only; in (0, 1], empty for off.'),
    ),
  );
  return {
    el,
    checks() {
      return Object.entries(bounds)
        .filter(([k]) => !(greedy.checked && samplingOnly.includes(f[k])))
        .map(([k, b]) => [f[k], () => {
          const r = parseNumber(f[k].value, b);
          if (r.error) return r.error;
          if (r.value === null && !b.optional) return 'Required.';
          return null;
        }]);
    },
    values() {
      const n = (k) => (f[k].value.trim() === '' ? undefined : Number(f[k].value));
      const out = {
        max_new_tokens: n('max_new_tokens'),
        repetition_penalty: n('repetition_penalty'),
        seed: n('seed'),
        temperature: greedy.checked ? 0 : n('temperature'),
      };
      if (!greedy.checked) {
        if (n('top_k') !== undefined) out.top_k = n('top_k');
        if (n('top_p') !== undefined) out.top_p = n('top_p');
      }
      return out;
    },
    /** Set from a run's request or metadata (numbers or their text). */
    set(src) {
      const t = Number(src.temperature ?? 0);
      apply({
        mode: t === 0 ? 'greedy' : 'sample',
        max_new_tokens: src.max_new_tokens ?? 50,
        temperature: t === 0 ? '' : t,
        top_k: src.top_k ?? '',
        top_p: src.top_p ?? '',
        repetition_penalty: src.repetition_penalty ?? 30,
        seed: src.seed ?? 0,
      });
      const match = Object.entries(DECODING_PRESETS).find(([, p]) => Object.keys(f).every((k) => String(p[k]) === f[k].value) && (p.mode === 'greedy') === greedy.checked);
      preset.value = match ? match[0] : 'custom';
    },
  };
}

// --- Training -------------------------------------------------------------------------------

/** A training setting's entry in the server's schema (`lora.r` looks in `lora`). */
function schemaOf(schema, key) {
  return key.split('.').reduce((node, k) => node?.properties?.[k], schema) ?? null;
}

/** The form's default for `key`: the server's (from its config type) when it published one. */
function defaultOf(schema, key, fallback) {
  const d = schemaOf(schema, key)?.default;
  return d === undefined || d === null ? fallback : String(d);
}

/** A number field's checks from the server's ranges, over the form's own where it has none. */
function boundsOf(schema, key, own) {
  const s = schemaOf(schema, key);
  if (!s) return own;
  const out = { ...own };
  if (s.type === 'integer') out.integer = true;
  if (s.minimum !== undefined) { out.min = s.minimum; out.minExclusive = false; }
  if (s.exclusiveMinimum !== undefined) { out.min = s.exclusiveMinimum; out.minExclusive = true; }
  if (s.maximum !== undefined) { out.max = s.maximum; out.maxExclusive = false; }
  return out;
}

/** The defaults of a config schema (the server's, from its config type), nested as the config. */
function defaultsOf(schema) {
  const out = {};
  for (const [k, node] of Object.entries(schema?.properties ?? {})) {
    if (node?.properties) out[k] = defaultsOf(node);
    else if (node?.default !== undefined) out[k] = node.default;
  }
  return out;
}

// The training keys the form has fields for; "More settings" takes every other one.
const TRAIN_FORM_KEYS = new Set([
  'model_name_or_path', 'dataset', 'formatter', 'num_train_epochs', 'max_steps', 'learning_rate',
  'per_device_train_batch_size', 'gradient_accumulation_steps', 'lr_scheduler_type', 'warmup_ratio',
  'max_seq_length', 'packing', 'packing_strategy', 'eval_packing', 'attn_implementation',
  'logging_steps', 'seed', 'lora.r', 'lora.lora_alpha', 'lora.lora_dropout', 'lora.target_modules',
  'eval_after_train',
]);

/** `extra` written over `config`, table by table. */
function mergeConfig(config, extra) {
  for (const [k, v] of Object.entries(extra)) {
    if (v && typeof v === 'object' && !Array.isArray(v) && config[k] && typeof config[k] === 'object' && !Array.isArray(config[k])) mergeConfig(config[k], v);
    else config[k] = v;
  }
  return config;
}

function buildTrainForm(ctx, plugins, schema = null) {
  const formatters = Array.isArray(plugins) ? plugins.filter((p) => p.kind === 'formatter') : [];
  const metrics = Array.isArray(plugins) ? plugins.filter((p) => p.kind === 'metric') : [];
  // Queued with the training: generate for the validation (else test) split with the new
  // adapter and score it with these metrics (the config's eval_after_train).
  const afterBoxes = metrics.map((p) => h('input', { type: 'checkbox', name: 'eval_after_train', value: p.name, id: `after-${p.name}` }));
  const box = messageBox();
  box.el.tabIndex = -1;
  const list = h('datalist', { id: 'formatter-list' }, formatters.map((p) => h('option', { value: p.name }, p.description ?? '')));

  const f = {
    name: input({ name: 'name', autocomplete: 'off', placeholder: 'optional' }),
    model: input({ name: 'model', value: 'smollm2', required: true, autocomplete: 'off' }),
    dataset: input({ name: 'dataset', value: 'bundled', required: true, autocomplete: 'off' }),
    formatter: input({ name: 'formatter', value: 'summarize', required: true, list: 'formatter-list', autocomplete: 'off' }),
    num_train_epochs: input({ name: 'num_train_epochs', value: defaultOf(schema, 'num_train_epochs', '5'), inputmode: 'decimal' }),
    max_steps: input({ name: 'max_steps', value: '', inputmode: 'numeric', placeholder: 'none' }),
    learning_rate: input({ name: 'learning_rate', value: defaultOf(schema, 'learning_rate', '2e-4'), inputmode: 'decimal' }),
    per_device_train_batch_size: input({ name: 'per_device_train_batch_size', value: defaultOf(schema, 'per_device_train_batch_size', '8'), inputmode: 'numeric' }),
    gradient_accumulation_steps: input({ name: 'gradient_accumulation_steps', value: defaultOf(schema, 'gradient_accumulation_steps', '4'), inputmode: 'numeric' }),
    lr_scheduler_type: h('select', { name: 'lr_scheduler_type' },
      ['cosine', 'linear', 'constant'].map((v) => h('option', { value: v }, v))),
    warmup_ratio: input({ name: 'warmup_ratio', value: defaultOf(schema, 'warmup_ratio', '0.01'), inputmode: 'decimal' }),
    max_seq_length: input({ name: 'max_seq_length', value: defaultOf(schema, 'max_seq_length', '512'), inputmode: 'numeric' }),
    r: input({ name: 'r', value: defaultOf(schema, 'lora.r', '16'), inputmode: 'numeric' }),
    lora_alpha: input({ name: 'lora_alpha', value: defaultOf(schema, 'lora.lora_alpha', '32'), inputmode: 'decimal' }),
    lora_dropout: input({ name: 'lora_dropout', value: defaultOf(schema, 'lora.lora_dropout', '0.1'), inputmode: 'decimal' }),
    target_modules: input({ name: 'target_modules', value: '', placeholder: 'model default', autocomplete: 'off', class: 'mono' }),
    logging_steps: input({ name: 'logging_steps', value: defaultOf(schema, 'logging_steps', '20'), inputmode: 'numeric' }),
    seed: input({ name: 'seed', value: defaultOf(schema, 'seed', '42'), inputmode: 'numeric' }),
    packing: h('input', { type: 'checkbox', name: 'packing', id: 'train-packing' }),
    packing_strategy: h('select', { name: 'packing_strategy' },
      ['bfd', 'bfd_split', 'wrapped'].map((v) => h('option', { value: v }, v))),
    // transformers' `attn_implementation`.
    attn_implementation: h('select', { name: 'attn_implementation' },
      ['eager', 'flash_attention_2'].map((v) => h('option', { value: v }, v))),
    // TRL's `eval_packing`: unset follows `packing`.
    eval_packing: h('select', { name: 'eval_packing' },
      h('option', { value: '' }, 'as training'),
      h('option', { value: 'true' }, 'packed'),
      h('option', { value: 'false' }, 'not packed')),
    // Every training key the fields above do not show, so none is out of reach or lost on a clone.
    more: h('textarea', { name: 'more', rows: 3, class: 'mono', spellcheck: 'false', placeholder: 'eval_strategy=epoch\nquantization.load_in_4bit=false' }),
  };
  // TRL's `packing`: several examples a row, each attending only to itself.
  f.packing.checked = schemaOf(schema, 'packing')?.default === true;
  const strategies = schemaOf(schema, 'packing_strategy')?.enum;
  // The server's names, less the old spellings it also reads (TRL's `bfd-requeue`).
  if (Array.isArray(strategies)) f.packing_strategy.replaceChildren(...strategies.filter((v) => !v.includes('-')).map((v) => h('option', { value: v }, v)));
  f.packing_strategy.value = defaultOf(schema, 'packing_strategy', 'bfd');
  const attentions = schemaOf(schema, 'attn_implementation')?.enum;
  // The server's names, less `sdpa`, which it reads as `eager`.
  if (Array.isArray(attentions)) f.attn_implementation.replaceChildren(...attentions.filter((v) => v !== 'sdpa').map((v) => h('option', { value: v }, v)));
  f.attn_implementation.value = defaultOf(schema, 'attn_implementation', 'eager');
  const packingShown = () => { f.packing_strategy.disabled = !f.packing.checked && f.eval_packing.value !== 'true'; };
  f.packing.addEventListener('change', packingShown);
  f.eval_packing.addEventListener('change', packingShown);
  packingShown();
  const numbers = {
    num_train_epochs: { min: 0, minExclusive: true, label: 'Epochs' },
    max_steps: { integer: true, min: 1, optional: true },
    learning_rate: { min: 0, minExclusive: true, max: 1 },
    per_device_train_batch_size: { integer: true, min: 1 },
    gradient_accumulation_steps: { integer: true, min: 1 },
    warmup_ratio: { min: 0, max: 1, maxExclusive: true },
    max_seq_length: { integer: true, min: 8, max: 1 << 20 },
    r: { integer: true, min: 1, max: 4096 },
    lora_alpha: { min: 0, minExclusive: true },
    lora_dropout: { min: 0, max: 1, maxExclusive: true },
    logging_steps: { integer: true, min: 1 },
    seed: { integer: true, min: 0 },
  };
  // The server's ranges win over the form's own (one source: the config type's table).
  const schemaKey = { r: 'lora.r', lora_alpha: 'lora.lora_alpha', lora_dropout: 'lora.lora_dropout' };
  for (const key of Object.keys(numbers)) numbers[key] = boundsOf(schema, schemaKey[key] ?? key, numbers[key]);
  if (schema) {
    const schedules = schemaOf(schema, 'lr_scheduler_type')?.enum;
    if (Array.isArray(schedules)) f.lr_scheduler_type.replaceChildren(...schedules.map((v) => h('option', { value: v }, v)));
    f.lr_scheduler_type.value = defaultOf(schema, 'lr_scheduler_type', 'cosine');
  }
  const F = (key, label, hint) => field({ id: `train-${key}`, label, input: f[key], hint });
  const button = h('button', { type: 'submit', class: 'primary' }, 'Launch training');
  const form = h('form', { novalidate: true, class: 'panel', 'aria-labelledby': 'train-h', 'data-testid': 'train-form' },
    h('h2', { id: 'train-h' }, 'Train a LoRA adapter'),
    list,
    F('name', 'Name', 'Also the adapter’s name; a default is chosen when empty.'),
    h('fieldset', { class: 'grid' },
      h('legend', {}, 'Data and model'),
      F('model', 'Model'),
      F('dataset', 'Dataset', '"bundled" is the small dataset shipped with adapterlab.'),
      F('formatter', 'Formatter', formatters.length ? `Installed: ${formatters.map((p) => p.name).join(', ')}.` : 'The formatter plugin that turns a row into a prompt.'),
      F('max_seq_length', 'Max sequence length', 'Tokens; longer examples are truncated.'),
      h('div', { class: 'check' }, f.packing,
        h('label', { for: 'train-packing' }, 'Pack examples into rows of the max sequence length (TRL’s packing)')),
      F('packing_strategy', 'Packing strategy', 'bfd: best fit, long examples cut; bfd_split: long examples split into pieces; wrapped: examples run on, cut every max-length tokens.'),
      F('eval_packing', 'Validation rows', 'Whether the validation loss is computed on packed rows (TRL’s eval_packing).'),
      F('attn_implementation', 'Attention', 'eager: the scores are materialised (transformers’ eager and sdpa); flash_attention_2: never stored, packed examples kept apart, less memory; on a GPU its kernels are right but slower than eager (BENCHMARKS.md).'),
    ),
    h('fieldset', { class: 'grid' },
      h('legend', {}, 'Schedule'),
      F('num_train_epochs', 'Epochs'),
      F('max_steps', 'Max steps', 'Optional; when set, it overrides the epochs.'),
      F('learning_rate', 'Learning rate'),
      F('lr_scheduler_type', 'Learning-rate schedule'),
      F('warmup_ratio', 'Warm-up ratio', 'Fraction of the steps spent warming up.'),
      F('per_device_train_batch_size', 'Batch size per device'),
      F('gradient_accumulation_steps', 'Gradient accumulation steps'),
      F('logging_steps', 'Logging steps', 'Loss and learning rate are logged every this many steps.'),
      F('seed', 'Seed', 'Batch order and dropout masks follow it.'),
    ),
    h('fieldset', { class: 'grid' },
      h('legend', {}, 'LoRA'),
      F('r', 'Rank (r)'),
      F('lora_alpha', 'Alpha', 'The update is scaled by alpha / r.'),
      F('lora_dropout', 'Dropout'),
      F('target_modules', 'Target modules', 'Comma-separated, such as q_proj, v_proj; empty for the model’s default.'),
    ),
    h('fieldset', {},
      h('legend', {}, 'More settings'),
      F('more', 'Other training keys', 'Any other key by HF’s name, key=value one per line (lora.bias=none for a table’s key); values are JSON where they parse (1e-3, true, ["rouge"]), text otherwise, and override the fields above. A cloned run lists here what it set apart from the defaults.'),
    ),
    metrics.length ? h('fieldset', { class: 'grid', 'data-testid': 'eval-after-train' },
      h('legend', {}, 'Then evaluate'),
      h('p', { class: 'muted' }, 'When training ends, generate for the validation split (else the test split) with the new adapter and score the generations with:'),
      afterBoxes.map((b) => h('div', { class: 'check' }, b, h('label', { for: b.id }, b.value)))) : null,
    box.el,
    h('div', { class: 'actions' }, button),
  );

  form.addEventListener('input', () => clearWhenFixed(form, box));
  form.addEventListener('change', () => clearWhenFixed(form, box));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    box.clear();
    const values = {};
    const checks = [
      [f.model, () => (f.model.value.trim() ? null : 'Name a model, such as smollm2.')],
      [f.dataset, () => (f.dataset.value.trim() ? null : 'Name a dataset, such as bundled.')],
      [f.formatter, () => (f.formatter.value.trim() ? null : 'Name a formatter, such as summarize.')],
    ];
    for (const [key, opts] of Object.entries(numbers)) {
      checks.push([f[key], () => {
        const r = parseNumber(f[key].value, opts);
        if (r.error) return r.error;
        if (r.value === null && !opts.optional) return 'Required.';
        values[key] = r.value;
        return null;
      }]);
    }
    checks.push([f.target_modules, () => {
      const bad = parseList(f.target_modules.value).find((m) => !/^[A-Za-z_][\w.]*$/.test(m));
      return bad ? `"${bad}" is not a module name.` : null;
    }]);
    const more = parseConfigLines(f.more.value);
    checks.push([f.more, () => (more.errors.length ? more.errors.map((e) => `Line ${e.line}: ${e.message}.`).join(' ') : null)]);
    if (!validate(checks, box)) return;
    const targets = parseList(f.target_modules.value);
    const config = {
      model_name_or_path: f.model.value.trim(),
      dataset: f.dataset.value.trim(),
      formatter: f.formatter.value.trim(),
      num_train_epochs: values.num_train_epochs,
      ...(values.max_steps !== null ? { max_steps: values.max_steps } : {}),
      learning_rate: values.learning_rate,
      per_device_train_batch_size: values.per_device_train_batch_size,
      gradient_accumulation_steps: values.gradient_accumulation_steps,
      lr_scheduler_type: f.lr_scheduler_type.value,
      warmup_ratio: values.warmup_ratio,
      max_seq_length: values.max_seq_length,
      packing: f.packing.checked,
      packing_strategy: f.packing_strategy.value,
      ...(f.eval_packing.value ? { eval_packing: f.eval_packing.value === 'true' } : {}),
      attn_implementation: f.attn_implementation.value,
      logging_steps: values.logging_steps,
      seed: values.seed,
      lora: {
        r: values.r,
        lora_alpha: values.lora_alpha,
        lora_dropout: values.lora_dropout,
        ...(targets.length ? { target_modules: targets } : {}),
      },
    };
    const after = afterBoxes.filter((b) => b.checked).map((b) => b.value);
    if (after.length) config.eval_after_train = after;
    // The server names any key it does not know, or a bad value, in its answer.
    mergeConfig(config, more.config);
    const body = { kind: 'train', config };
    if (f.name.value.trim()) body.name = f.name.value.trim();
    submit(body, button, box, ctx);
  });
  form.prefill = (run) => {
    const c = run.request ?? {};
    const md = run.metadata ?? {};
    f.name.value = `${run.name} (copy)`;
    f.model.value = c.model_name_or_path ?? md.model ?? f.model.value;
    f.dataset.value = c.dataset ?? md.dataset ?? f.dataset.value;
    if (c.formatter) f.formatter.value = c.formatter;
    for (const key of ['num_train_epochs', 'learning_rate', 'per_device_train_batch_size', 'gradient_accumulation_steps', 'warmup_ratio', 'max_seq_length', 'logging_steps', 'seed']) {
      if (c[key] !== undefined && c[key] !== null) f[key].value = String(c[key]);
    }
    f.max_steps.value = c.max_steps > 0 ? String(c.max_steps) : '';
    f.packing.checked = c.packing === true;
    if (c.packing_strategy && [...f.packing_strategy.options].some((o) => o.value === c.packing_strategy)) f.packing_strategy.value = c.packing_strategy;
    f.eval_packing.value = c.eval_packing === true ? 'true' : c.eval_packing === false ? 'false' : '';
    if (c.attn_implementation && [...f.attn_implementation.options].some((o) => o.value === c.attn_implementation)) f.attn_implementation.value = c.attn_implementation;
    f.packing.dispatchEvent(new Event('change'));
    if (c.lr_scheduler_type && [...f.lr_scheduler_type.options].some((o) => o.value === c.lr_scheduler_type)) f.lr_scheduler_type.value = c.lr_scheduler_type;
    const lora = c.lora ?? {};
    for (const key of ['r', 'lora_alpha', 'lora_dropout']) if (lora[key] !== undefined) f[key].value = String(lora[key]);
    f.target_modules.value = (lora.target_modules ?? []).join(', ');
    for (const b of afterBoxes) b.checked = (c.eval_after_train ?? []).includes(b.value);
    // output_dir is the cloned run's own folder: the clone gets a new one.
    f.more.value = configLines(c, defaultsOf(schema), new Set([...TRAIN_FORM_KEYS, 'output_dir']));
  };
  return form;
}
