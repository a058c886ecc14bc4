// The playground: chat with the served base model or any stored adapter through the server's
// OpenAI-compatible /v1/chat/completions, streamed, with the decoding settings in view (the same
// presets as the generate form, so what is tried here can be launched as a run).

import { api } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';
import { parseNumber } from '../lib/parse.js';
import { field, messageBox, setFieldError } from './common.js';
import { DECODING_PRESETS } from './launch.js';

export async function mountPlayground(main, ctx) {
  ctx.setTitle('Playground');
  const model = h('select', { name: 'model' }, h('option', { value: '' }, 'Loading…'));
  const system = h('textarea', { rows: 2, placeholder: 'optional, e.g. "Summarize the dialogue in one sentence."' });
  const prompt = h('textarea', { rows: 4, required: true, 'data-testid': 'chat-input' });
  const preset = h('select', { class: 'wide' },
    Object.entries(DECODING_PRESETS).map(([k, p]) => h('option', { value: k }, p.label)),
    h('option', { value: 'custom' }, 'Custom'));
  const f = {
    max_tokens: h('input', { type: 'text', inputmode: 'numeric' }),
    temperature: h('input', { type: 'text', inputmode: 'decimal' }),
    top_k: h('input', { type: 'text', inputmode: 'numeric', placeholder: 'off' }),
    top_p: h('input', { type: 'text', inputmode: 'decimal', placeholder: 'off' }),
    repetition_penalty: h('input', { type: 'text', inputmode: 'decimal' }),
    seed: h('input', { type: 'text', inputmode: 'numeric' }),
  };
  const bounds = {
    max_tokens: { integer: true, min: 1, max: 4096 },
    temperature: { min: 0, max: 2 },
    top_k: { integer: true, min: 1, optional: true },
    top_p: { min: 0, max: 1, minExclusive: true, optional: true },
    repetition_penalty: { min: 0, minExclusive: true, max: 100 },
    seed: { integer: true, min: 0 },
  };
  const apply = (p) => {
    f.max_tokens.value = p.max_new_tokens;
    f.temperature.value = p.mode === 'greedy' ? '0' : p.temperature;
    f.top_k.value = p.mode === 'greedy' ? '' : p.top_k;
    f.top_p.value = p.mode === 'greedy' ? '' : p.top_p;
    f.repetition_penalty.value = p.repetition_penalty;
    f.seed.value = p.seed;
  };
  preset.value = 'greedy';
  apply(DECODING_PRESETS.greedy);
  preset.addEventListener('change', () => {
    if (preset.value !== 'custom') apply(DECODING_PRESETS[preset.value]);
  });
  for (const el of Object.values(f)) el.addEventListener('input', () => { preset.value = 'custom'; });

  const transcript = h('ol', { class: 'plain chat-log', 'aria-live': 'polite', 'data-testid': 'chat-log' });
  const send = h('button', { type: 'submit', class: 'primary' }, 'Send');
  const stop = h('button', { type: 'button', hidden: true }, 'Stop');
  const clear = h('button', { type: 'button' }, 'Clear the conversation');
  const box = messageBox();
  const F = (key, label, hint) => field({ id: `chat-${key}`, label, input: f[key], hint });
  const form = h('form', { class: 'panel', 'aria-labelledby': 'chat-h', novalidate: true, 'data-testid': 'playground' },
    h('h2', { id: 'chat-h' }, 'Chat'),
    h('div', { class: 'grid-fields' },
      field({ id: 'chat-model', label: 'Model', input: model, hint: 'The served base model or a stored adapter on it.' }),
    ),
    field({ id: 'chat-system', label: 'System message', input: system }),
    h('details', {},
      h('summary', {}, 'Decoding settings'),
      field({ id: 'chat-preset', label: 'Preset', input: preset }),
      h('div', { class: 'grid-fields' },
        F('max_tokens', 'Max new tokens'),
        F('temperature', 'Temperature', '0 is greedy.'),
        F('top_k', 'Top-k'),
        F('top_p', 'Top-p'),
        F('repetition_penalty', 'Repetition penalty', '1 is off.'),
        F('seed', 'Seed'),
      )),
    transcript,
    field({ id: 'chat-input', label: 'Your message', input: prompt }),
    box.el,
    h('div', { class: 'actions' }, send, stop, clear),
  );
  replace(main, h('h1', {}, 'Playground'),
    h('p', { class: 'muted' }, 'Try a model or an adapter by hand. Replies stream from the server’s OpenAI-compatible endpoint, ', h('code', {}, '/v1/chat/completions'), ', which any OpenAI client can use with the server’s token as its API key.'),
    form);

  try {
    const list = await api.chatModels({ signal: ctx.signal });
    const ids = (list?.data ?? []).map((m) => m.id);
    replace(model, ids.map((id) => h('option', { value: id }, id)));
    if (!ids.length) replace(model, h('option', { value: '' }, 'No models'));
  } catch (e) {
    if (ctx.signal.aborted) return;
    replace(model, h('option', { value: '' }, 'Unavailable'));
    box.error(`Could not list the models: ${e.message}`);
  }

  const history = [];
  let controller = null;
  const say = (role, text) => {
    const body = h('div', { class: 'chat-text' }, text);
    transcript.append(h('li', { class: `chat-${role}` }, h('span', { class: 'chat-role' }, role === 'user' ? 'You' : 'Model'), body));
    return body;
  };
  clear.addEventListener('click', () => {
    history.length = 0;
    transcript.replaceChildren();
    box.clear();
  });
  stop.addEventListener('click', () => controller?.abort());
  ctx.signal.addEventListener('abort', () => controller?.abort());

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    box.clear();
    const settings = {};
    let bad = 0;
    for (const [k, b] of Object.entries(bounds)) {
      const r = parseNumber(f[k].value, b);
      const message = r.error ?? (r.value === null && !b.optional ? 'Required.' : null);
      setFieldError(f[k], message);
      if (message) bad += 1;
      else if (r.value !== null) settings[k] = r.value;
    }
    const text = prompt.value.trim();
    setFieldError(prompt, text ? null : 'Write a message.');
    if (!text) bad += 1;
    if (!model.value) {
      box.error('No model to chat with.');
      return;
    }
    if (bad) {
      box.error(`Fix ${bad === 1 ? 'the field' : `the ${bad} fields`} marked in red.`);
      form.querySelector('[aria-invalid="true"]')?.closest('details')?.setAttribute('open', '');
      form.querySelector('[aria-invalid="true"]')?.focus();
      return;
    }
    history.push({ role: 'user', content: text });
    say('user', text);
    prompt.value = '';
    const out = say('assistant', '');
    out.setAttribute('aria-busy', 'true');
    send.disabled = true;
    stop.hidden = false;
    controller = new AbortController();
    const messages = [...(system.value.trim() ? [{ role: 'system', content: system.value.trim() }] : []), ...history];
    try {
      const { text: reply, usage } = await api.chat({ model: model.value, messages, ...settings }, {
        signal: controller.signal,
        onDelta: (piece) => out.append(piece),
      });
      history.push({ role: 'assistant', content: reply });
      if (usage) out.after(h('div', { class: 'muted small' }, `${usage.prompt_tokens ?? '?'} prompt + ${usage.completion_tokens ?? '?'} completion tokens`));
    } catch (err) {
      if (err.name === 'AbortError') {
        out.append(h('span', { class: 'muted' }, ' [stopped]'));
      } else {
        history.pop();
        out.closest('li').remove();
        box.error(`The model did not answer: ${err.message}`);
      }
    } finally {
      out.removeAttribute('aria-busy');
      send.disabled = false;
      stop.hidden = true;
      controller = null;
    }
  });
}
