// The launch page: a training form and an evaluation form. Everything is checked in the browser
// first, with the message next to the field; what the server still rejects (4xx with
// {"error": ...}) is shown above the submit button. On 201 the page moves to the new run.
//
// Payloads (POST /api/runs; the server's OpenAPI document at /api/openapi.json has them all):
//   train:    {"kind":"train","name"?,"config":{model_name_or_path,dataset,formatter,
//              num_train_epochs,max_steps?,learning_rate,per_device_train_batch_size,
//              gradient_accumulation_steps,lr_scheduler_type,warmup_ratio,max_seq_length,
//              lora:{r,lora_alpha,lora_dropout,target_modules?}}}   (HF key names)
//   eval:     {"kind":"eval","name","predictions":[{id,prediction,reference,source?}],
//              "metrics":[...],"settings":{metric:{key:value}},"score_references":bool}
//   generate: {"kind":"generate","name","model","adapter"?,"dataset",
//              "metrics":[...],"settings":{...},"score_references":bool}
//             (the dataset's test split, the reference notebook's decoding)

import { api, ApiError } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { parseList, parseNumber, parsePredictions, parseSettings } from '../lib/parse.js';
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
  const [plugins, adapters] = await Promise.all([
    api.plugins().catch((e) => e),
    api.adapters({ signal: ctx.signal }).catch((e) => e),
  ]);
  if (ctx.signal.aborted) return;
  evalForm.replaceChildren(buildEvalForm(ctx, plugins, adapters));
  trainForm.replaceChildren(buildTrainForm(ctx, plugins));
}

// --- Shared helpers -------------------------------------------------------------------------

function input(props) {
  return h('input', { type: 'text', ...props });
}

/** Validate fields: `checks` is `[input, () => message | null]`; focuses the first bad one. */
function validate(checks, form) {
  let first = null;
  let bad = 0;
  for (const [el, check] of checks) {
    const message = check();
    setFieldError(el, message);
    if (message) {
      bad += 1;
      first ??= el;
    }
  }
  if (first) {
    first.focus();
    form.error(`Fix ${bad === 1 ? 'the field' : `the ${bad} fields`} marked in red, then launch again.`);
  }
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

function buildEvalForm(ctx, plugins, adapters) {
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
      hint: 'JSON Lines: one object per line with "id", "prediction", "reference" and optionally "source". Checked here before anything is sent.' }),
    fileStatus,
  );

  const genModel = input({ name: 'model', value: 'smollm2', autocomplete: 'off' });
  const adapterList = Array.isArray(adapters) ? adapters : [];
  const genAdapter = h('select', { name: 'adapter' },
    h('option', { value: '' }, 'None (base model)'),
    adapterList.map((a) => h('option', { value: a.name }, `${a.name}${a.base_model ? ` (${a.base_model})` : ''}`)),
  );
  const genDataset = input({ name: 'dataset', value: 'bundled', autocomplete: 'off' });
  const generateFields = h('div', { hidden: true },
    field({ id: 'gen-model', label: 'Model', input: genModel }),
    field({ id: 'gen-adapter', label: 'Adapter', input: genAdapter,
      hint: adapterList.length ? 'Trained adapters known to the server.' : 'No adapters yet: train one, or evaluate the base model.' }),
    listMessage('adapters', adapters),
    field({ id: 'gen-dataset', label: 'Dataset', input: genDataset, hint: '"bundled" is the small dataset shipped with adapterlab.' }),
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
    const ok = validate(checks, box);
    if (!ok || noMetric) {
      if (ok) {
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
    };
    const body = fileRadio.checked
      ? { kind: 'eval', ...common, predictions: parsed.rows }
      : {
        kind: 'generate',
        ...common,
        model: genModel.value.trim(),
        dataset: genDataset.value.trim(),
        ...(genAdapter.value ? { adapter: genAdapter.value } : {}),
      };
    submit(body, button, box, ctx);
  });
  return form;
}

// --- Training -------------------------------------------------------------------------------

function buildTrainForm(ctx, plugins) {
  const formatters = Array.isArray(plugins) ? plugins.filter((p) => p.kind === 'formatter') : [];
  const box = messageBox();
  box.el.tabIndex = -1;
  const list = h('datalist', { id: 'formatter-list' }, formatters.map((p) => h('option', { value: p.name }, p.description ?? '')));

  const f = {
    name: input({ name: 'name', autocomplete: 'off', placeholder: 'optional' }),
    model: input({ name: 'model', value: 'smollm2', required: true, autocomplete: 'off' }),
    dataset: input({ name: 'dataset', value: 'bundled', required: true, autocomplete: 'off' }),
    formatter: input({ name: 'formatter', value: 'summarize', required: true, list: 'formatter-list', autocomplete: 'off' }),
    num_train_epochs: input({ name: 'num_train_epochs', value: '5', inputmode: 'decimal' }),
    max_steps: input({ name: 'max_steps', value: '', inputmode: 'numeric', placeholder: 'none' }),
    learning_rate: input({ name: 'learning_rate', value: '2e-4', inputmode: 'decimal' }),
    per_device_train_batch_size: input({ name: 'per_device_train_batch_size', value: '4', inputmode: 'numeric' }),
    gradient_accumulation_steps: input({ name: 'gradient_accumulation_steps', value: '4', inputmode: 'numeric' }),
    lr_scheduler_type: h('select', { name: 'lr_scheduler_type' },
      ['cosine', 'linear', 'constant'].map((v) => h('option', { value: v }, v))),
    warmup_ratio: input({ name: 'warmup_ratio', value: '0.01', inputmode: 'decimal' }),
    max_seq_length: input({ name: 'max_seq_length', value: '512', inputmode: 'numeric' }),
    r: input({ name: 'r', value: '16', inputmode: 'numeric' }),
    lora_alpha: input({ name: 'lora_alpha', value: '32', inputmode: 'decimal' }),
    lora_dropout: input({ name: 'lora_dropout', value: '0.1', inputmode: 'decimal' }),
    target_modules: input({ name: 'target_modules', value: '', placeholder: 'model default', autocomplete: 'off', class: 'mono' }),
  };
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
  };
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
    ),
    h('fieldset', { class: 'grid' },
      h('legend', {}, 'LoRA'),
      F('r', 'Rank (r)'),
      F('lora_alpha', 'Alpha', 'The update is scaled by alpha / r.'),
      F('lora_dropout', 'Dropout'),
      F('target_modules', 'Target modules', 'Comma-separated, such as q_proj, v_proj; empty for the model’s default.'),
    ),
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
      lora: {
        r: values.r,
        lora_alpha: values.lora_alpha,
        lora_dropout: values.lora_dropout,
        ...(targets.length ? { target_modules: targets } : {}),
      },
    };
    const body = { kind: 'train', config };
    if (f.name.value.trim()) body.name = f.name.value.trim();
    submit(body, button, box, ctx);
  });
  return form;
}
