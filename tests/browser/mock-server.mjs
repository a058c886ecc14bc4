#!/usr/bin/env node
// A stand-in for `adapterlab serve`, for developing and testing the dashboard without building
// the Rust server: plain node `http`, serving ../../web/ and the JSON API of the contract with
// in-memory state. Eval runs really score their predictions (simple ROUGE/BLEU look-alikes, a
// bootstrap for intervals) so comparisons have meaningful deltas; train runs stream made-up loss
// curves. It is a development tool, not a reference: the Rust server defines the real behaviour.
//
//   node mock-server.mjs [--port 7861] [--token T] [--speed 1]
//
// Prints "adapterlab mock listening on http://127.0.0.1:PORT/#token=TOKEN" once ready.
// Importable too: `startMockServer({ port, token, speed })` resolves to `{ url, token, close }`.

import { randomBytes, createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WEB = path.resolve(HERE, '../../web');
const MAX_BODY = 16 * 1024 * 1024;
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.md': 'text/markdown; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.json': 'application/json',
};
const TERMINAL = new Set(['done', 'failed', 'interrupted', 'cancelled']);

// --- Scoring ---------------------------------------------------------------------------------

const words = (s) => (String(s).toLowerCase().match(/[\p{L}\p{N}']+/gu) ?? []);
function ngrams(tokens, n) {
  const m = new Map();
  for (let i = 0; i + n <= tokens.length; i++) {
    const k = tokens.slice(i, i + n).join(' ');
    m.set(k, (m.get(k) ?? 0) + 1);
  }
  return m;
}
function overlap(a, b) {
  let o = 0;
  for (const [k, v] of a) o += Math.min(v, b.get(k) ?? 0);
  return o;
}
function f1(o, p, r) {
  if (o === 0 || p === 0 || r === 0) return 0;
  const prec = o / p;
  const rec = o / r;
  return (2 * prec * rec) / (prec + rec);
}
function rougeN(pred, ref, n) {
  const a = ngrams(words(pred), n);
  const b = ngrams(words(ref), n);
  const sum = (m) => [...m.values()].reduce((x, y) => x + y, 0);
  return f1(overlap(a, b), sum(a), sum(b));
}
function rougeL(pred, ref) {
  const a = words(pred);
  const b = words(ref);
  const dp = Array.from({ length: a.length + 1 }, () => new Array(b.length + 1).fill(0));
  for (let i = 1; i <= a.length; i++) for (let j = 1; j <= b.length; j++) {
    dp[i][j] = a[i - 1] === b[j - 1] ? dp[i - 1][j - 1] + 1 : Math.max(dp[i - 1][j], dp[i][j - 1]);
  }
  return f1(dp[a.length][b.length], a.length, b.length);
}
function bleu(pred, ref) {
  const p = words(pred);
  const r = words(ref);
  if (p.length === 0) return 0;
  let logSum = 0;
  for (let n = 1; n <= 4; n++) {
    const a = ngrams(p, n);
    const total = Math.max(0, p.length - n + 1);
    const o = overlap(a, ngrams(r, n));
    logSum += Math.log((o + 1) / (total + 1)); // add-one smoothing
  }
  const bp = p.length >= r.length ? 1 : Math.exp(1 - r.length / p.length);
  return 100 * bp * Math.exp(logSum / 4);
}

const METRICS = {
  rouge: {
    scores: [
      { name: 'rouge1', description: 'Unigram overlap F1', min: 0, max: 1, higher_is_better: true, fn: (p, r) => rougeN(p, r, 1) },
      { name: 'rouge2', description: 'Bigram overlap F1', min: 0, max: 1, higher_is_better: true, fn: (p, r) => rougeN(p, r, 2) },
      { name: 'rougeL', description: 'Longest common subsequence F1', min: 0, max: 1, higher_is_better: true, fn: rougeL },
    ],
  },
  bleu: {
    scores: [{ name: 'bleu', description: 'Sentence BLEU (smoothed), 0–100', min: 0, max: 100, higher_is_better: true, fn: bleu }],
    corpus: true,
  },
  // Fails on every sample, as the judge does without an API key: the run must not read as a
  // plain success.
  judge: {
    scores: [{ name: 'judge_score', description: 'LLM-as-judge rating, 1–5', min: 1, max: 5, higher_is_better: true, fn: () => { throw new Error('chat capability: no API key for https://api.openai.com/v1 (set OPENAI_API_KEY where the server runs)'); } }],
  },
  length_ratio: {
    scores: [{ name: 'length_ratio', description: 'Absolute log ratio of prediction to reference length', min: 0, max: 5, higher_is_better: false, fn: (p, r) => Math.abs(Math.log((words(p).length + 1) / (words(r).length + 1))) }],
  },
};

// Deterministic randomness so intervals do not jump between reloads.
function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
function bootstrap(xs, seed = 7, iters = 400) {
  const m = mean(xs);
  if (xs.length < 2) return { mean: m, low: m, high: m };
  const r = rng(seed);
  const means = [];
  for (let k = 0; k < iters; k++) {
    let s = 0;
    for (let i = 0; i < xs.length; i++) s += xs[Math.floor(r() * xs.length)];
    means.push(s / xs.length);
  }
  means.sort((a, b) => a - b);
  return { mean: m, low: means[Math.floor(0.025 * iters)], high: means[Math.ceil(0.975 * iters) - 1] };
}

// --- State -----------------------------------------------------------------------------------

const now = () => new Date().toISOString();
const newId = () => Date.now().toString(16).padStart(12, '0') + randomBytes(10).toString('hex');

function builtinPlugins() {
  const sha = (s) => createHash('sha256').update(s).digest('hex');
  const metric = (name, version, description, caps) => ({
    name, version, description, kind: 'metric', capabilities: caps, source: { type: 'builtin' }, language: 'Rust',
    contract: '0.1.0', sha256: sha(name), size_bytes: 180_000 + name.length * 1000,
    scores: METRICS[name].scores.map(({ fn, ...s }) => s),
  });
  return [
    metric('rouge', '0.1.0', 'ROUGE-1/2/L F1 between prediction and reference', ['log', 'config']),
    metric('bleu', '0.1.0', 'Sentence BLEU with add-one smoothing; corpus BLEU too', ['log']),
    metric('length_ratio', '0.1.0', 'How far the prediction’s length is from the reference’s', []),
    metric('judge', '0.1.0', 'An LLM rates each summary (needs an API key on the server)', ['chat', 'config']),
    {
      name: 'summarize', version: '0.1.0', description: 'Dialogue → summary prompt', kind: 'formatter', capabilities: ['config'],
      source: { type: 'builtin' }, language: 'Rust', contract: '0.1.0', sha256: sha('summarize'), size_bytes: 95_000,
      required_fields: ['dialogue', 'summary'],
    },
    {
      name: 'markdown', version: '0.1.0', description: 'A Markdown report of a run or a comparison', kind: 'reporter', capabilities: [],
      source: { type: 'builtin' }, language: 'Rust', contract: '0.1.0', sha256: sha('markdown'), size_bytes: 120_000, format: 'md',
    },
  ];
}

const BUNDLED = [
  { id: 'b1', source: '#Person1#: Did you book the train tickets?\n#Person2#: Yes, two seats on the 9 o’clock to Leeds.', reference: 'Person2 has booked two seats on the 9 o’clock train to Leeds.' },
  { id: 'b2', source: '#Person1#: My laptop will not start.\n#Person2#: Try holding the power button for ten seconds.', reference: 'Person2 suggests holding the power button to restart Person1’s laptop.' },
  { id: 'b3', source: '#Person1#: Can we move the meeting to Friday?\n#Person2#: Friday afternoon works for me.', reference: 'They move the meeting to Friday afternoon.' },
];

function createState(speed) {
  return { runs: [], samples: new Map(), events: new Map(), listeners: new Map(), plugins: builtinPlugins(), adapters: [], speed, timers: new Set(), instant: false };
}

function record(state, kind, name, metadata = {}) {
  const run = {
    id: newId(), name, kind, status: 'queued', created: now(), started: null, finished: null, metadata,
    scores: [], aggregates: {}, reference_aggregates: {}, corpus: {}, progress: { done: 0, total: 0, unit: kind === 'train' ? 'steps' : 'samples' },
    usage: { requests: 0, cached: 0, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0 }, error: null,
    tags: [], notes: '',
  };
  state.runs.unshift(run);
  state.events.set(run.id, []);
  state.listeners.set(run.id, new Set());
  return run;
}

function emit(state, run, data) {
  const list = state.events.get(run.id);
  const ev = { id: list.length, type: data.type, data };
  list.push(ev);
  for (const l of state.listeners.get(run.id)) l(ev);
}

function setStatus(state, run, status) {
  run.status = status;
  if (status === 'running') run.started = now();
  if (TERMINAL.has(status)) run.finished = now();
  emit(state, run, { type: 'status', status });
  if (TERMINAL.has(status)) for (const l of state.listeners.get(run.id)) l(null);
}

function later(state, ms, fn) {
  if (state.instant) return fn();
  const t = setTimeout(() => {
    state.timers.delete(t);
    fn();
  }, ms / state.speed);
  state.timers.add(t);
}

// Score rows with the chosen metrics, filling the run's scores, aggregates and samples.
function score(state, run, rows, metrics, scoreReferences) {
  const infos = metrics.flatMap((m) => METRICS[m].scores.map((s) => ({ ...s, metric: m })));
  run.scores = infos.map(({ name, metric, min, max, higher_is_better }) => ({ name, metric, min, max, higher_is_better }));
  // Provenance, as the real server records it per plugin.
  run.plugins = Object.fromEntries(metrics.map((m) => {
    const user = state.plugins.find((p) => p.name === m && p.source?.type === 'file');
    return [m, { version: '0.1.0', source: user ? 'user' : 'built-in', sha256: `${m}`.padEnd(64, '0') }];
  }));
  const samples = rows.map((r, index) => {
    const scores = {};
    const errors = {};
    for (const s of infos) {
      try {
        // Several references: the best score over them, as the real metrics do.
        const refs = r.references ?? [r.reference];
        const each = refs.map((ref) => s.fn(r.prediction, ref));
        scores[s.name] = s.higher_is_better === false ? Math.min(...each) : Math.max(...each);
      } catch (e) {
        errors[s.metric] = `plugin "${s.metric}" 0.1.0: ${e.message}`;
      }
    }
    if (r.prediction.trim() === '') errors.length_ratio = 'empty prediction';
    const out = { index, id: r.id, prediction: r.prediction, reference: r.reference ?? r.references[0], source: r.source ?? null, scores, errors };
    if (r.references?.length > 1) out.references = r.references;
    if (scoreReferences) {
      out.reference_scores = {};
      for (const s of infos) {
        try {
          out.reference_scores[s.name] = s.fn(r.reference, r.reference);
        } catch {
          // As the real pipeline: the error is the sample's, the score is missing.
        }
      }
    }
    return out;
  });
  for (const s of infos) {
    // As the real pipeline: aggregates cover the samples that have the score, if any.
    const values = samples.map((x) => x.scores[s.name]).filter((v) => v !== undefined);
    if (values.length === 0) continue;
    run.aggregates[s.name] = bootstrap(values);
    const refs = samples.map((x) => x.reference_scores?.[s.name]).filter((v) => v !== undefined);
    if (scoreReferences && refs.length) run.reference_aggregates[s.name] = bootstrap(refs);
  }
  if (metrics.includes('bleu')) run.corpus.bleu = mean(samples.map((x) => x.scores.bleu));
  state.samples.set(run.id, samples);
}

function startEval(state, run, rows, metrics, scoreReferences) {
  run.progress = { done: 0, total: rows.length, unit: 'samples' };
  later(state, 300, () => {
    if (run.status !== 'queued') return;
    setStatus(state, run, 'running');
    emit(state, run, { type: 'log', level: 'info', message: `scoring ${rows.length} samples with ${metrics.join(', ')}` });
    const step = Math.max(1, Math.ceil(rows.length / 8));
    let done = 0;
    const tick = () => {
      if (run.status !== 'running') return;
      done = Math.min(rows.length, done + step);
      run.progress = { done, total: rows.length, unit: 'samples' };
      emit(state, run, { type: 'progress', done, total: rows.length, unit: 'samples' });
      if (done < rows.length) return later(state, 250, tick);
      score(state, run, rows, metrics, scoreReferences);
      emit(state, run, { type: 'log', level: 'info', message: `scored ${rows.length} samples` });
      const empty = rows.filter((r) => r.prediction.trim() === '').length;
      if (empty) emit(state, run, { type: 'log', level: 'warn', message: `${empty} empty prediction(s)` });
      setStatus(state, run, 'done');
    };
    later(state, 250, tick);
  });
}

function startTrain(state, run, config, totalSteps = 40) {
  run.progress = { done: 0, total: totalSteps, unit: 'steps' };
  later(state, 300, () => {
    if (run.status !== 'queued') return;
    setStatus(state, run, 'running');
    emit(state, run, { type: 'log', level: 'info', message: `loading ${config.model_name_or_path} and ${config.dataset} (formatter ${config.formatter})` });
    emit(state, run, { type: 'log', level: 'info', message: `LoRA r=${config.lora?.r} alpha=${config.lora?.lora_alpha} on ${config.lora?.target_modules?.join(', ') || 'default modules'}` });
    let step = 0;
    const lr0 = config.learning_rate ?? 2e-4;
    const r = rng(run.id.length + totalSteps);
    const tick = () => {
      if (run.status !== 'running') return;
      step += 1;
      const frac = step / totalSteps;
      const lr = frac < 0.05 ? lr0 * (frac / 0.05) : lr0 * 0.5 * (1 + Math.cos(Math.PI * frac));
      const loss = 2.6 * Math.exp(-2.2 * frac) + 0.55 + (r() - 0.5) * 0.12;
      emit(state, run, {
        type: 'loss', step, epoch: (step / totalSteps) * (config.num_train_epochs ?? 1), loss, eval_loss: null,
        learning_rate: lr, grad_norm: 0.6 + r() * 0.5, tokens_per_second: 1400 + r() * 200, eta_seconds: ((totalSteps - step) * 0.2) / state.speed,
        memory_bytes: Math.round((900 + step * 0.5 + r() * 20) * 1024 * 1024), gpu_memory_bytes: null,
      });
      if (step % 10 === 0) {
        emit(state, run, { type: 'loss', step, epoch: (step / totalSteps) * (config.num_train_epochs ?? 1), loss: null, eval_loss: loss + 0.08, learning_rate: null, grad_norm: null, tokens_per_second: null, eta_seconds: null, memory_bytes: null, gpu_memory_bytes: null });
        emit(state, run, { type: 'log', level: 'info', message: `step ${step}/${totalSteps}: eval_loss ${(loss + 0.08).toFixed(3)}` });
      }
      run.progress = { done: step, total: totalSteps, unit: 'steps' };
      emit(state, run, { type: 'progress', done: step, total: totalSteps, unit: 'steps' });
      if (step < totalSteps) return later(state, 200, tick);
      const name = run.name;
      // As the real trainer: the final losses in `corpus`.
      run.corpus = { train_loss: loss, eval_loss_before: 3.2, eval_loss: loss + 0.08 };
      state.adapters.unshift({ name, path: `adapters/${name}`, base_model: config.model_name_or_path, created: now(), run_id: run.id, metadata: { r: String(config.lora?.r ?? 16) } });
      emit(state, run, { type: 'log', level: 'info', message: `saved adapter ${name}` });
      setStatus(state, run, 'done');
    };
    later(state, 200, tick);
  });
}

// The real server's defaults (host/src/train/config.rs, host/src/infer/predict.rs), so the run
// page can show every setting a run used.
const TRAIN_DEFAULTS = {
  model_name_or_path: 'smollm2', dataset: 'bundled', formatter: 'summarize', num_train_epochs: 5, max_steps: -1,
  per_device_train_batch_size: 8, gradient_accumulation_steps: 4, learning_rate: 2e-4, lr_scheduler_type: 'cosine',
  warmup_ratio: 0.01, max_seq_length: 512, packing: false, packing_strategy: 'bfd', eval_packing: null, attn_implementation: 'eager', logging_steps: 20, save_steps: 20, seed: 42, optim: 'adamw_32bit',
  lora: { r: 16, lora_alpha: 32, lora_dropout: 0.1, target_modules: [], bias: 'none' },
};
const SAMPLING_DEFAULTS = { max_new_tokens: 50, temperature: 0, top_p: null, top_k: null, repetition_penalty: 30, seed: 0, batch_size: 8 };

/** The shape of the server's GET /api/schema (JSON Schema of the train config), from the
 * mock's defaults, with the real server's ranges for the keys the form shows. */
function trainSchema() {
  const ranges = {
    learning_rate: { exclusiveMinimum: 0, maximum: 1 }, per_device_train_batch_size: { minimum: 1, maximum: 4096 },
    gradient_accumulation_steps: { minimum: 1, maximum: 4096 }, max_seq_length: { minimum: 8, maximum: 131072 },
    num_train_epochs: { exclusiveMinimum: 0, maximum: 10000 }, warmup_ratio: { minimum: 0, maximum: 0.999999 },
    logging_steps: { minimum: 0, maximum: 100000000 }, seed: { minimum: 0, maximum: 4294967295 },
    r: { minimum: 1, maximum: 4096 }, lora_alpha: { exclusiveMinimum: 0, maximum: 1e6 }, lora_dropout: { minimum: 0, maximum: 0.999999 },
  };
  const node = (obj) => ({
    type: 'object',
    properties: Object.fromEntries(Object.entries(obj).map(([k, v]) => {
      if (v && typeof v === 'object' && !Array.isArray(v)) return [k, node(v)];
      const type = Array.isArray(v) ? 'array' : Number.isInteger(v) ? 'integer' : typeof v === 'number' ? 'number' : typeof v === 'boolean' ? 'boolean' : 'string';
      return [k, { type, default: v, ...(ranges[k] ?? {}), ...(k === 'lr_scheduler_type' ? { enum: ['cosine', 'linear', 'constant', 'constant_with_warmup'] } : {}), ...(k === 'packing_strategy' ? { enum: ['bfd', 'bfd_split', 'bfd-requeue', 'wrapped'] } : {}), ...(k === 'attn_implementation' ? { enum: ['eager', 'sdpa', 'flash_attention_2'] } : {}) }];
    })),
  });
  return node(TRAIN_DEFAULTS);
}

function trainMetadata(name, c) {
  const lora = { ...TRAIN_DEFAULTS.lora, ...(c.lora ?? {}) };
  return {
    adapter_name: name, model: c.model_name_or_path, dataset: c.dataset, output_dir: `runs/${name}`,
    lora: `r=${lora.r} alpha=${lora.lora_alpha} dropout=${lora.lora_dropout}`,
    learning_rate: String(c.learning_rate ?? TRAIN_DEFAULTS.learning_rate), quantization: 'nf4',
  };
}

function seed(state) {
  // A finished training run whose events replay, and its adapter.
  const seedConfig = { model_name_or_path: 'smollm2', dataset: 'bundled', formatter: 'summarize', learning_rate: 2e-4, num_train_epochs: 5, lora: { r: 16, lora_alpha: 32, target_modules: ['q_proj', 'v_proj'] } };
  const train = record(state, 'train', 'smollm2-dialogsum', trainMetadata('smollm2-dialogsum', seedConfig));
  train.request = { ...TRAIN_DEFAULTS, ...seedConfig, lora: { ...TRAIN_DEFAULTS.lora, ...seedConfig.lora } };
  state.instant = true;
  startTrain(state, train, seedConfig, 60);
  state.instant = false;
  train.created = new Date(Date.now() - 3600_000).toISOString();
  // One a dead server left behind: interrupted, resumable.
  const cut = record(state, 'train', 'smollm2-r8', trainMetadata('smollm2-r8', { ...seedConfig, lora: { r: 8, lora_alpha: 16 } }));
  cut.request = { ...TRAIN_DEFAULTS, ...seedConfig, lora: { ...TRAIN_DEFAULTS.lora, r: 8, lora_alpha: 16 } };
  cut.status = 'interrupted';
  cut.created = new Date(Date.now() - 1800_000).toISOString();
  cut.started = new Date(Date.now() - 1790_000).toISOString();
  cut.finished = new Date(Date.now() - 1700_000).toISOString();
  cut.progress = { done: 23, total: 60, unit: 'steps' };
  emit(state, cut, { type: 'status', status: 'running' });
  emit(state, cut, { type: 'log', level: 'warn', message: 'the server stopped while this run was running; resume it to continue from checkpoint-20' });
  emit(state, cut, { type: 'status', status: 'interrupted' });
  // A failed one, to show errors.
  const failed = record(state, 'eval', 'broken-settings', { metrics: 'rouge' });
  failed.status = 'failed';
  failed.started = failed.created;
  failed.finished = failed.created;
  failed.error = 'from plugin "rouge" 0.1.0: unknown setting "stemmer" (did you mean "use_stemmer"?)';
  emit(state, failed, { type: 'status', status: 'running' });
  emit(state, failed, { type: 'log', level: 'error', message: failed.error });
  emit(state, failed, { type: 'status', status: 'failed' });
}

// --- HTTP ------------------------------------------------------------------------------------

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store', ...headers });
  res.end(text);
}
const fail = (res, status, error) => send(res, status, { error });

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(Object.assign(new Error('too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

// Just enough multipart/form-data parsing for one file field.
function multipartFile(body, contentType, field) {
  const m = /boundary=(?:"([^"]+)"|([^;]+))/i.exec(contentType ?? '');
  if (!m) return null;
  const boundary = Buffer.from(`--${m[1] ?? m[2]}`);
  let pos = body.indexOf(boundary);
  while (pos !== -1) {
    const start = pos + boundary.length + 2; // skip CRLF
    const headerEnd = body.indexOf('\r\n\r\n', start);
    if (headerEnd === -1) return null;
    const headers = body.subarray(start, headerEnd).toString();
    const next = body.indexOf(boundary, headerEnd);
    if (next === -1) return null;
    const name = /name="([^"]*)"/i.exec(headers)?.[1];
    if (name === field) {
      return { filename: /filename="([^"]*)"/i.exec(headers)?.[1] ?? 'upload.wasm', data: body.subarray(headerEnd + 4, next - 2) };
    }
    pos = next;
  }
  return null;
}

function authorised(req, token) {
  return req.headers.authorization === `Bearer ${token}`;
}

function validateRun(state, body) {
  if (!body || typeof body !== 'object') return 'expected a JSON object';
  if (body.kind === 'eval' || body.kind === 'generate') {
    if (typeof body.name !== 'string' || !body.name.trim()) return 'field `name` must be a non-empty string';
    if (!Array.isArray(body.metrics) || body.metrics.length === 0) return 'choose at least one metric';
    for (const m of body.metrics) if (!METRICS[m] && !state.plugins.some((p) => p.name === m && p.kind === 'metric')) return `no metric plugin named "${m}"`;
    for (const [m, s] of Object.entries(body.settings ?? {})) {
      if (!body.metrics.includes(m)) return `settings for "${m}", which is not among the metrics`;
      for (const [k, v] of Object.entries(s)) if (typeof v !== 'string') return `setting ${m}.${k} must be a string`;
      if (m === 'rouge') for (const k of Object.keys(s)) if (k !== 'use_stemmer') return `from plugin "rouge" 0.1.0: unknown setting "${k}"`;
    }
    if (body.kind === 'eval') {
      if (!Array.isArray(body.predictions) || body.predictions.length === 0) return 'field `predictions` must be a non-empty array';
      const seen = new Set();
      for (const [i, r] of body.predictions.entries()) {
        const refsOk = (typeof r?.reference === 'string') !== (Array.isArray(r?.references) && r.references.length > 0 && r.references.every((x) => typeof x === 'string'));
        if (typeof r?.id !== 'string' || typeof r.prediction !== 'string' || !refsOk) return `predictions[${i}]: needs string id, prediction and one of reference or references`;
        if (seen.has(r.id)) return `predictions[${i}]: duplicate id "${r.id}"`;
        seen.add(r.id);
      }
    }
    return null;
  }
  if (body.kind === 'train') {
    const c = body.config;
    if (!c || typeof c !== 'object') return 'field `config` must be an object';
    for (const k of ['model_name_or_path', 'dataset', 'formatter']) if (typeof c[k] !== 'string' || !c[k]) return `config.${k} must be a non-empty string`;
    if (c.model_name_or_path !== 'smollm2') return `config.model_name_or_path: unknown model "${c.model_name_or_path}" (known: smollm2)`;
    if (!(c.learning_rate > 0)) return 'config.learning_rate must be positive';
    return null;
  }
  return `field \`kind\` must be "eval", "train" or "generate", not ${JSON.stringify(body.kind)}`;
}

function compare(state, ids) {
  const runs = ids.map((id) => state.runs.find((r) => r.id === id || r.name === id));
  const missing = ids.filter((id, i) => !runs[i]);
  if (missing.length) return { error: `no run ${missing.join(', ')}`, status: 404 };
  if (runs.length < 2) return { error: 'compare needs at least two runs', status: 400 };
  const notDone = runs.filter((r) => !state.samples.has(r.id));
  if (notDone.length) return { error: `run ${notDone[0].name} has no samples (it is ${notDone[0].status})`, status: 422 };
  const scores = runs[0].scores.filter((s) => runs.slice(1).every((r) => r.scores.some((o) => o.name === s.name)));
  const byId = runs.map((r) => new Map(state.samples.get(r.id).map((s) => [s.id, s])));
  const deltas = [];
  runs.slice(1).forEach((run, j) => {
    for (const s of scores) {
      const diffs = [];
      for (const b of state.samples.get(runs[0].id)) {
        const c = byId[j + 1].get(b.id);
        if (c) diffs.push(c.scores[s.name] - b.scores[s.name]);
      }
      const difference = bootstrap(diffs, 11);
      const significant = difference.low > 0 || difference.high < 0;
      deltas.push({
        run: run.id, score: s.name, difference, significant, higher_is_better: s.higher_is_better,
        verdict: significant ? (difference.mean > 0) === s.higher_is_better : null, paired: diffs.length,
      });
    }
  });
  const samples = [];
  for (const b of state.samples.get(runs[0].id)) {
    const rows = byId.map((m) => m.get(b.id));
    if (rows.some((r) => !r)) continue;
    let disagreement = 0;
    for (const s of scores) {
      const vals = rows.map((r) => r.scores[s.name]);
      disagreement += (Math.max(...vals) - Math.min(...vals)) / (s.max - s.min || 1);
    }
    samples.push({
      id: b.id, source: b.source, reference: b.reference, references: b.references ?? [b.reference], predictions: rows.map((r) => r.prediction),
      scores: rows.map((r) => Object.fromEntries(scores.map((s) => [s.name, r.scores[s.name]]))), disagreement,
    });
  }
  samples.sort((a, b) => b.disagreement - a.disagreement);
  return { body: { runs, scores, deltas, samples } };
}

async function handleApi(state, token, req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean).slice(1); // drop "api"
  const method = req.method;
  // As the real server: every call but the health check needs the bearer token, reads
  // included (so the dashboard must send it on GETs and read the event stream with fetch).
  const open = parts[0] === 'health' && parts.length === 1;
  if (!open && !authorised(req, token)) return fail(res, 401, 'missing or wrong token: send Authorization: Bearer <token> (see the server log or <data dir>/token)');

  if (parts[0] === 'health' && method === 'GET') return send(res, 200, { status: 'ok', version: '0.1.0-mock' });
  if (parts[0] === 'schema' && method === 'GET') {
    return send(res, 200, {
      train: trainSchema(),
      generate: { type: 'object', properties: {
        max_new_tokens: { type: 'integer', default: 50, minimum: 1, maximum: 4096 }, temperature: { type: 'number', default: 0, minimum: 0, maximum: 2 },
        top_p: { type: 'number', default: null, exclusiveMinimum: 0, maximum: 1 }, top_k: { type: 'integer', default: null, minimum: 0, maximum: 1000000 },
        repetition_penalty: { type: 'number', default: 30, exclusiveMinimum: 0, maximum: 100 }, seed: { type: 'integer', default: 0, minimum: 0, maximum: 4294967295 },
        batch_size: { type: 'integer', default: 8, minimum: 1, maximum: 256 } } },
    });
  }
  if (parts[0] === 'plugins' && parts.length === 2 && method === 'DELETE') {
    const name = decodeURIComponent(parts[1]);
    const at = state.plugins.findIndex((p) => p.name === name && p.source?.type === 'file');
    if (at < 0) {
      if (state.plugins.some((p) => p.name === name)) return fail(res, 409, `"${name}" is a built-in plugin: built-in plugins cannot be uninstalled`);
      return fail(res, 404, `no installed plugin named "${name}"`);
    }
    const [gone] = state.plugins.splice(at, 1);
    delete METRICS[name];
    return send(res, 200, { name, files: [gone.source.path], record: true });
  }
  if (parts[0] === 'plugins' && parts.length === 1) {
    if (method === 'GET') return send(res, 200, state.plugins);
    if (method === 'POST') {
      const body = await readBody(req);
      const file = multipartFile(body, req.headers['content-type'], 'file');
      if (!file) return fail(res, 400, 'expected multipart/form-data with a field named "file"');
      const d = file.data;
      if (d.length < 8 || d.readUInt32BE(0) !== 0x0061736d) return fail(res, 422, `${file.filename}: not a valid plugin component: not a component: the file is not WebAssembly in binary form (a text or .wat file?). Build a component: \`cargo build --target wasm32-wasip2\` for Rust, \`componentize-py\` for Python, \`componentize-js\` or \`jco componentize\` for JavaScript; \`adapterlab plugins new\` writes a project that does`);
      if (d[4] === 1 && d[5] === 0 && d[6] === 0 && d[7] === 0) return fail(res, 422, `${file.filename}: not a valid plugin component: not a component: this is a core WebAssembly module. Wrap it into a component with \`wasm-tools component new module.wasm -o plugin.wasm\``);
      const name = file.filename.replace(/\.wasm$/i, '').replace(/[^a-z0-9_-]/gi, '_').toLowerCase();
      if (state.plugins.some((p) => p.name === name)) return fail(res, 400, `a plugin named "${name}" is already installed`);
      const plugin = {
        name, version: '0.1.0', description: 'Uploaded plugin (mock)', kind: 'metric', capabilities: ['log'],
        source: { type: 'file', path: `plugins/${name}.wasm` }, language: 'Rust', contract: '0.1.0',
        sha256: createHash('sha256').update(d).digest('hex'), size_bytes: d.length,
        scores: [{ name: `${name}_score`, description: 'A score from an uploaded plugin', min: 0, max: 1, higher_is_better: true }],
      };
      state.plugins.push(plugin);
      METRICS[name] = { scores: [{ ...plugin.scores[0], fn: (p, r) => rougeN(p, r, 1) }] };
      return send(res, 201, plugin);
    }
  }
  if (parts[0] === 'adapters' && method === 'GET') return send(res, 200, state.adapters);
  if (parts[0] === 'adapters' && parts[2] === 'push' && method === 'POST') {
    const name = decodeURIComponent(parts[1]);
    if (!state.adapters.some((a) => a.name === name)) return fail(res, 422, `\`adapter\`: "${name}" is neither a stored adapter nor a PEFT folder`);
    let body;
    try {
      body = JSON.parse((await readBody(req)).toString());
    } catch (e) {
      return fail(res, 400, `invalid JSON: ${e.message}`);
    }
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/.test(body?.repo ?? '')) return fail(res, 422, `--repo ${JSON.stringify(body?.repo)}: expected OWNER/NAME (letters, digits, '-', '_', '.')`);
    return send(res, 200, { repo: body.repo, revision: body.revision ?? 'main', commit_url: null,
      files: [{ path: 'adapter_config.json', size: 600, lfs: false }, { path: 'adapter_model.safetensors', size: 1 << 20, lfs: true }, { path: 'README.md', size: 900, lfs: false }] });
  }
  if (parts[0] === 'report' && method === 'GET') {
    const ids = (url.searchParams.get('runs') ?? '').split(',').filter(Boolean);
    const format = url.searchParams.get('format') ?? 'md';
    if (format !== 'md') return fail(res, 404, `no reporter for format ${format} (formats: md)`);
    if (ids.length === 0) return fail(res, 400, '`runs` must list one run id, or several to compare, comma-separated');
    const runs = ids.map((id) => state.runs.find((r) => r.id === id));
    if (runs.some((r) => !r)) return fail(res, 404, `no run ${ids[runs.indexOf(undefined)]}`);
    const lines = [`# ${runs.length > 1 ? 'Comparison' : 'Run'}: ${runs.map((r) => r.name).join(' vs ')}`, ''];
    for (const r of runs) for (const [k, e] of Object.entries(r.aggregates)) lines.push(`- ${r.name} ${k}: ${e.mean.toFixed(4)} [${e.low.toFixed(4)}, ${e.high.toFixed(4)}]`);
    res.writeHead(200, { 'Content-Type': 'text/markdown; charset=utf-8', 'Content-Disposition': 'attachment; filename="adapterlab-report.md"' });
    return res.end(`${lines.join('\n')}\n`);
  }
  if (parts[0] === 'compare' && method === 'GET') {
    const ids = (url.searchParams.get('runs') ?? '').split(',').filter(Boolean);
    const out = compare(state, ids);
    return out.error ? fail(res, out.status, out.error) : send(res, 200, out.body);
  }
  if (parts[0] === 'runs') {
    if (parts.length === 1 && method === 'GET') return send(res, 200, state.runs);
    if (parts.length === 1 && method === 'POST') {
      let body;
      try {
        body = JSON.parse((await readBody(req)).toString());
      } catch (e) {
        if (e.status === 413) return fail(res, 413, `request body over ${MAX_BODY} bytes`);
        return fail(res, 400, `invalid JSON: ${e.message}`);
      }
      const problem = validateRun(state, body);
      if (problem) return fail(res, 422, problem);
      if (body.kind === 'train') {
        const name = body.name || `adapter-${state.runs.length + 1}`;
        const c = body.config;
        const run = record(state, 'train', name, trainMetadata(name, c));
        // As GET /api/runs/ID on the real server: the config with every default filled in.
        run.request = { ...TRAIN_DEFAULTS, ...c, lora: { ...TRAIN_DEFAULTS.lora, ...(c.lora ?? {}) } };
        startTrain(state, run, body.config);
        return send(res, 201, { id: run.id });
      }
      const metricsMeta = { metrics: body.metrics.join(','), ...Object.fromEntries(Object.entries(body.settings ?? {}).map(([m, s]) => [`settings.${m}`, Object.entries(s).map(([k, v]) => `${k}=${v}`).join(',')])) };
      if (body.kind === 'generate') {
        const { kind, ...request } = body;
        const sampling = { ...SAMPLING_DEFAULTS, ...Object.fromEntries(Object.keys(SAMPLING_DEFAULTS).filter((k) => body[k] !== undefined).map((k) => [k, body[k]])) };
        const decoding = {
          decoding: sampling.temperature === 0 ? 'greedy' : 'sampling',
          ...Object.fromEntries(Object.entries(sampling).filter(([, v]) => v !== null).map(([k, v]) => [k, String(v)])),
        };
        const run = record(state, 'generate', body.name, {
          model: body.model, ...(body.adapter ? { adapter: body.adapter } : {}), dataset: body.dataset, split: body.split ?? 'test',
          formatter: 'summarize', ...(body.limit ? { limit: String(body.limit) } : {}), ...decoding, ...metricsMeta,
        });
        run.request = { formatter: 'summarize', split: 'test', ...request, ...sampling };
        const rows = BUNDLED.slice(0, body.limit ?? BUNDLED.length).map((b) => ({ ...b, prediction: b.source.split('\n')[1].replace(/^#Person2#: /, 'Person2 says ') }));
        startEval(state, run, rows, body.metrics, body.score_references);
        return send(res, 201, { id: run.id });
      }
      const run = record(state, 'eval', body.name, { predictions: `${body.predictions.length} uploaded rows`, ...metricsMeta, ...(body.llm_base_url ? { llm_base_url: body.llm_base_url } : {}) });
      startEval(state, run, body.predictions, body.metrics, body.score_references);
      return send(res, 201, { id: run.id });
    }
    const run = state.runs.find((r) => r.id === parts[1]);
    if (!run) return fail(res, 404, `no run ${parts[1]}`);
    if (parts.length === 2 && method === 'GET') return send(res, 200, run);
    if (parts.length === 2 && method === 'DELETE') {
      if (!TERMINAL.has(run.status)) return fail(res, 409, `run ${run.id} is ${run.status}: cancel it before deleting it`);
      state.runs.splice(state.runs.indexOf(run), 1);
      state.samples.delete(run.id);
      res.writeHead(204, { 'Cache-Control': 'no-store' });
      return res.end();
    }
    if (parts.length === 2 && method === 'PATCH') {
      let body;
      try {
        body = JSON.parse((await readBody(req)).toString());
      } catch (e) {
        return fail(res, 400, `the body is not valid JSON: ${e.message}`);
      }
      if (!body || typeof body !== 'object' || Array.isArray(body)) return fail(res, 400, 'the body must be a JSON object');
      for (const k of Object.keys(body)) if (k !== 'tags' && k !== 'notes') return fail(res, 422, `unknown field \`${k}\` (expected: tags, notes)`);
      if (body.tags !== undefined && body.tags !== null) {
        if (!Array.isArray(body.tags)) return fail(res, 422, 'field `tags` must be an array of strings');
        const tags = [];
        for (const [i, t] of body.tags.entries()) {
          if (typeof t !== 'string') return fail(res, 422, `tags[${i}] must be a string`);
          const v = t.trim();
          if (!v) return fail(res, 422, `tags[${i}] is empty`);
          if (v.length > 64) return fail(res, 422, `tags[${i}] is longer than 64 characters`);
          if (!tags.includes(v)) tags.push(v);
        }
        if (tags.length > 32) return fail(res, 422, `at most 32 tags, not ${tags.length}`);
        run.tags = tags;
      }
      if (body.notes !== undefined && body.notes !== null) {
        if (typeof body.notes !== 'string') return fail(res, 422, 'field `notes` must be a string');
        if (body.notes.length > 10000) return fail(res, 422, 'field `notes` is longer than 10000 characters');
        run.notes = body.notes;
      }
      return send(res, 200, run);
    }
    if (parts[2] === 'resume' && method === 'POST') {
      if (!['interrupted', 'failed', 'cancelled'].includes(run.status)) return fail(res, 409, `run ${run.id} is ${run.status}; only interrupted, failed or cancelled runs can be resumed`);
      run.status = 'queued';
      run.finished = null;
      run.error = null;
      emit(state, run, { type: 'status', status: 'queued' });
      if (run.kind === 'train') startTrain(state, run, run.request ?? TRAIN_DEFAULTS, 40);
      else {
        later(state, 300, () => {
          setStatus(state, run, 'running');
          later(state, 500, () => setStatus(state, run, 'done'));
        });
      }
      return send(res, 200, { id: run.id, status: run.status });
    }
    if (parts[2] === 'samples' && method === 'GET') return send(res, 200, state.samples.get(run.id) ?? []);
    if (parts[2] === 'cancel' && method === 'POST') {
      if (!TERMINAL.has(run.status)) {
        emit(state, run, { type: 'log', level: 'warn', message: 'cancelled by request' });
        setStatus(state, run, 'cancelled');
      }
      return send(res, 200, { id: run.id, status: run.status });
    }
    if (parts[2] === 'events' && method === 'GET') return streamEvents(state, run, req, res);
  }
  return fail(res, 404, `no route ${method} ${url.pathname}`);
}

// Just enough of the OpenAI-compatible API for the playground: the models, and a streamed
// reply that echoes the last message's words with the settings it was given.
async function handleOpenAi(state, token, req, res, url) {
  const oa = (status, message, param = null) => send(res, status, { error: { message, type: status === 401 ? 'authentication_error' : 'invalid_request_error', param, code: null } });
  if (!authorised(req, token)) return oa(401, 'Incorrect API key provided: send the server token as the API key.');
  if (url.pathname === '/v1/models' && req.method === 'GET') {
    return send(res, 200, { object: 'list', data: [{ id: 'smollm2', object: 'model', owned_by: 'adapterlab' }, ...state.adapters.map((a) => ({ id: a.name, object: 'model', owned_by: 'adapterlab' }))] });
  }
  if (url.pathname === '/v1/chat/completions' && req.method === 'POST') {
    let body;
    try {
      body = JSON.parse((await readBody(req)).toString());
    } catch (e) {
      return oa(400, `We could not parse the JSON body of your request: ${e.message}`);
    }
    if (!body.model) return oa(400, 'you must provide a model parameter', 'model');
    if (body.temperature !== undefined && (body.temperature < 0 || body.temperature > 2)) return oa(400, '`temperature` must be between 0 and 2', 'temperature');
    const last = body.messages?.at(-1)?.content ?? '';
    const reply = `(${body.model}, temperature ${body.temperature ?? 1}, max ${body.max_tokens ?? '∞'}) You said: ${last}`.split(/(?<= )/);
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store' });
    const chunk = (delta, extra = {}) => res.write(`data: ${JSON.stringify({ id: 'chatcmpl-mock', object: 'chat.completion.chunk', model: body.model, choices: [{ index: 0, delta, finish_reason: null }], ...extra })}\n\n`);
    chunk({ role: 'assistant', content: '' });
    for (const piece of reply) {
      chunk({ content: piece });
      await new Promise((r) => setTimeout(r, 15));
    }
    res.write(`data: ${JSON.stringify({ id: 'chatcmpl-mock', object: 'chat.completion.chunk', choices: [], usage: { prompt_tokens: 12, completion_tokens: reply.length, total_tokens: 12 + reply.length } })}\n\n`);
    res.write('data: [DONE]\n\n');
    return res.end();
  }
  return oa(404, `no route ${req.method} ${url.pathname}`);
}

function streamEvents(state, run, req, res) {
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive' });
  const after = Number(req.headers['last-event-id'] ?? -1);
  const write = (ev) => res.write(`id: ${ev.id}\nevent: ${ev.type}\ndata: ${JSON.stringify(ev.data)}\n\n`);
  for (const ev of state.events.get(run.id)) if (ev.id > after) write(ev);
  if (TERMINAL.has(run.status)) return res.end();
  const listener = (ev) => {
    if (ev === null) {
      state.listeners.get(run.id).delete(listener);
      clearInterval(ping);
      res.end();
      return;
    }
    write(ev);
  };
  state.listeners.get(run.id).add(listener);
  const ping = setInterval(() => res.write(': ping\n\n'), 15000);
  req.on('close', () => {
    clearInterval(ping);
    state.listeners.get(run.id).delete(listener);
  });
}

async function serveStatic(req, res, url) {
  let rel = decodeURIComponent(url.pathname);
  if (rel === '/') rel = '/index.html';
  const file = path.resolve(WEB, `.${rel}`);
  if (!file.startsWith(WEB + path.sep)) return fail(res, 404, 'not found');
  try {
    const data = await readFile(file);
    res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'Cache-Control': 'no-cache' });
    res.end(data);
  } catch {
    fail(res, 404, `no file ${rel}`);
  }
}

export function startMockServer({ port = 0, token = randomBytes(16).toString('hex'), speed = 1, quiet = false } = {}) {
  const state = createState(speed);
  seed(state);
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://localhost');
    try {
      if (url.pathname.startsWith('/api/')) await handleApi(state, token, req, res, url);
      else if (url.pathname.startsWith('/v1/')) await handleOpenAi(state, token, req, res, url);
      else await serveStatic(req, res, url);
    } catch (e) {
      if (e.status === 413) return fail(res, 413, `request body over ${MAX_BODY} bytes`);
      if (!quiet) console.error(e);
      if (!res.headersSent) fail(res, 500, 'internal error');
    }
    if (!quiet) console.log(`${req.method} ${req.url} ${res.statusCode}`);
  });
  return new Promise((resolve) => {
    server.listen(port, '127.0.0.1', () => {
      const url = `http://127.0.0.1:${server.address().port}`;
      resolve({
        url,
        token,
        close: () => new Promise((done) => {
          for (const t of state.timers) clearTimeout(t);
          server.closeAllConnections?.();
          server.close(() => done());
        }),
      });
    });
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const arg = (name, fallback) => {
    const i = process.argv.indexOf(`--${name}`);
    return i === -1 ? fallback : process.argv[i + 1];
  };
  const { url, token } = await startMockServer({
    port: Number(arg('port', 7861)),
    token: arg('token', undefined),
    speed: Number(arg('speed', 1)),
    quiet: process.argv.includes('--quiet'),
  });
  console.log(`adapterlab mock listening on ${url}/#token=${token}`);
}
