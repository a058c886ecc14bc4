// Unit tests of the dashboard's pure modules (word diff, input parsing), run with `node --test`.
// web/ has no package.json (it is served as-is), so each module is loaded from its source as a
// data: URL; they import nothing, which keeps that possible.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';

const load = (rel) => import(`data:text/javascript;base64,${readFileSync(new URL(`../../web/${rel}`, import.meta.url)).toString('base64')}`);
const { wordDiff, diffStats, tokenize } = await load('lib/diff.js');
const { num, signed } = await load('lib/format.js');
const { parsePredictions, parseSettings, parseNumber, parseList, parseConfigLines, configLines } = await load('lib/parse.js');

// Rebuild one side of a diff: `same` + `ins` runs spell `after`, `same` + `del` runs `before`.
const side = (runs, keep) => runs.filter((r) => r.op === 'same' || r.op === keep).map((r) => r.space + r.text).join('');
const words = (s) => tokenize(s).map((t) => t.word).join(' ');

describe('wordDiff', () => {
  function check(before, after, expect) {
    const runs = wordDiff(before, after);
    assert.deepEqual(runs.map((r) => [r.op, r.text]), expect);
    assert.equal(words(side(runs, 'ins')), words(after), 'same + ins should spell the new text');
    assert.equal(words(side(runs, 'del')), words(before), 'same + del should spell the old text');
  }

  it('marks nothing for equal texts', () => check('The cat sat.', 'The cat sat.', [['same', 'The cat sat.']]));
  it('marks a replaced word as a deletion then an insertion', () => check('The cat sat.', 'The dog sat.', [
    ['same', 'The'], ['del', 'cat'], ['ins', 'dog'], ['same', 'sat.'],
  ]));
  it('treats punctuation as its own token', () => check('He left.', 'He left!', [['same', 'He left'], ['del', '.'], ['ins', '!']]));
  it('handles an empty side', () => {
    check('', 'new words', [['ins', 'new words']]);
    check('old words', '', [['del', 'old words']]);
    assert.deepEqual(wordDiff('', ''), []);
  });
  it('finds the longest common subsequence, not just a common prefix', () => check(
    'Person2 must finish a report but will try to come',
    'Person1 invites Person2 to come',
    [['ins', 'Person1 invites'], ['same', 'Person2'], ['del', 'must finish a report but will try'], ['same', 'to come']],
  ));
  it('ignores differences in whitespace alone', () => check('a  b\tc', 'a b c', [['same', 'a b c']]));
  it('keeps apostrophes inside words and handles non-ASCII letters', () => {
    assert.deepEqual(tokenize("Person2’s café isn't open").map((t) => t.word), ['Person2’s', 'café', "isn't", 'open']);
  });
  it('counts added and removed words', () => {
    assert.deepEqual(diffStats(wordDiff('a b c d', 'a x c')), { ins: 1, del: 2 });
  });
  it('stays fast on long texts', () => {
    const a = Array.from({ length: 3000 }, (_, i) => `w${i % 97}`).join(' ');
    const b = Array.from({ length: 3000 }, (_, i) => `w${(i * 7) % 101}`).join(' ');
    const t = Date.now();
    const runs = wordDiff(a, b);
    assert.ok(Date.now() - t < 2000, 'diffing 3000 words took too long');
    assert.equal(words(side(runs, 'ins')), words(b));
  });
});

describe('parsePredictions', () => {
  const enc = (s) => new TextEncoder().encode(s);
  function check(bytes, expectErrors) {
    const { rows, errors } = parsePredictions(typeof bytes === 'string' ? enc(bytes) : bytes);
    assert.deepEqual(errors.map((e) => [e.line, e.message.slice(0, expectErrors.find(([l]) => l === e.line)?.[1].length ?? 0)]),
      expectErrors.map(([l, m]) => [l, m]));
    return rows;
  }

  it('reads good rows, skipping blank lines, CRLF endings and a BOM', () => {
    const rows = check('\uFEFF{"id":"a","prediction":"p","reference":"r"}\n\n{"id":7,"prediction":"","reference":"r","source":"s"}\r\n', []);
    assert.deepEqual(rows, [
      { id: 'a', prediction: 'p', reference: 'r' },
      { id: '7', prediction: '', reference: 'r', source: 's' },
    ]);
  });
  it('reports each bad line with its number, as the server does', () => {
    const bytes = new Uint8Array([...enc('{"id":"a","prediction":"x","reference":"y"}\n{oops\n{"id":"b","reference":"y"}\n'), 0xff, 0x0a]);
    check(bytes, [[2, 'invalid JSON'], [3, 'missing field `prediction`'], [4, 'not valid UTF-8']]);
  });
  it('rejects wrong types, empty ids and duplicate ids', () => {
    check([
      '[1,2]',
      '{"id":"","prediction":"p","reference":"r"}',
      '{"id":true,"prediction":"p","reference":"r"}',
      '{"id":"a","prediction":3,"reference":"r"}',
      '{"id":"a","prediction":"p","reference":"r","source":1}',
      '{"id":"a","prediction":"p","reference":"r"}',
      '{"id":"a","prediction":"p","reference":"r"}',
    ].join('\n'), [
      [1, 'expected a JSON object'],
      [2, 'field `id` is empty'],
      [3, 'field `id` must be a string or number, not a boolean'],
      [4, 'field `prediction` must be a string, not a number'],
      [5, 'field `source` must be a string, not a number'],
      [7, 'duplicate id "a" (first on line 6)'],
    ]);
  });
  it('accepts a null source', () => {
    assert.deepEqual(check('{"id":"a","prediction":"p","reference":"r","source":null}', []), [{ id: 'a', prediction: 'p', reference: 'r' }]);
  });
  it('reads several references as the server does, and one as `reference`', () => {
    assert.deepEqual(check([
      '{"id":"a","prediction":"p","references":["r1","r2"]}',
      '{"id":"b","prediction":"p","references":["r"]}',
    ].join('\n'), []), [
      { id: 'a', prediction: 'p', references: ['r1', 'r2'] },
      { id: 'b', prediction: 'p', reference: 'r' },
    ]);
    check([
      '{"id":"a","prediction":"p","reference":"r","references":["r"]}',
      '{"id":"b","prediction":"p","references":[]}',
      '{"id":"c","prediction":"p","references":["r",2]}',
      '{"id":"d","prediction":"p","references":"r"}',
      '{"id":"e","prediction":"p"}',
    ].join('\n'), [
      [1, 'both `reference` and `references`: give one'],
      [2, 'field `references` is an empty list; give at least one'],
      [3, 'field `references`, item 2: must be a string, not a number'],
      [4, 'field `references` must be a list of strings, not a string'],
      [5, 'missing field `reference` (or `references`)'],
    ]);
  });
  it('says when the file holds no samples', () => check('\n\n', [[0, 'the file holds no samples']]));
});

describe('parseSettings', () => {
  it('reads key=value lines and comma-separated pairs', () => {
    assert.deepEqual(parseSettings('use_stemmer=false\n# a comment\n\nn = 4, mode=fast'), {
      settings: { use_stemmer: 'false', n: '4', mode: 'fast' }, errors: [],
    });
  });
  it('reports lines without a key or set twice', () => {
    const { errors } = parseSettings('novalue\n=x\na=1\na=2');
    assert.deepEqual(errors.map((e) => e.line), [1, 2, 4]);
  });
});

describe('parseNumber and parseList', () => {
  it('reads scientific notation and checks ranges', () => {
    assert.deepEqual(parseNumber('2e-4', { min: 0, minExclusive: true }), { value: 0.0002 });
    assert.deepEqual(parseNumber(''), { value: null });
    assert.match(parseNumber('abc').error, /number/);
    assert.match(parseNumber('1.5', { integer: true }).error, /whole/);
    assert.match(parseNumber('1', { min: 0, max: 1, maxExclusive: true }).error, /less than 1/);
  });
  it('splits module lists on commas and spaces', () => {
    assert.deepEqual(parseList(' q_proj, v_proj  o_proj,'), ['q_proj', 'v_proj', 'o_proj']);
  });
});

const { sseParser } = await load('lib/sse.js');

describe('sseParser', () => {
  const parse = (chunks, opts) => {
    const out = [];
    const p = sseParser((e) => out.push(e), opts);
    for (const c of chunks) p.push(c);
    return { out, p };
  };

  it('reads id, event and data, and dispatches on a blank line', () => {
    const { out, p } = parse(['id: 3\nevent: log\ndata: {"a":1}\n\n']);
    assert.deepEqual(out, [{ type: 'log', data: '{"a":1}', lastEventId: '3' }]);
    assert.equal(p.lastEventId(), '3');
  });
  it('joins data lines, defaults the type to message and skips comments', () => {
    const { out } = parse([': ping\n\ndata: a\ndata:b\n\n']);
    assert.deepEqual(out, [{ type: 'message', data: 'a\nb', lastEventId: '' }]);
  });
  it('handles events split across chunks anywhere, CRLF included', () => {
    const text = 'id: 1\r\nevent: status\r\ndata: {"status":"running"}\r\n\r\nid: 2\r\ndata: x\r\n\r\n';
    for (let cut = 1; cut < text.length; cut++) {
      const { out } = parse([text.slice(0, cut), text.slice(cut)]);
      assert.deepEqual(out.map((e) => [e.type, e.data, e.lastEventId]), [['status', '{"status":"running"}', '1'], ['message', 'x', '2']], `cut at ${cut}`);
    }
  });
  it('keeps the last id across events and starts from the one given', () => {
    const { out } = parse(['data: a\n\nid: 9\ndata: b\n\ndata: c\n\n'], { lastEventId: '4' });
    assert.deepEqual(out.map((e) => e.lastEventId), ['4', '9', '9']);
  });
  it('does not dispatch an event without data or an unfinished one', () => {
    const { out } = parse(['event: x\n\ndata: half']);
    assert.deepEqual(out, []);
  });
});

describe('num and signed', () => {
  it('writes small differences in plain decimals with two significant digits', () => {
    assert.equal(signed(-9.31e-4), '−0.00093');
    assert.equal(signed(0.0123), '+0.012');
    assert.equal(signed(1.2e-7), '+0.00000012');
    assert.equal(signed(0), '±0');
    assert.equal(num(0.5), '0.500');
  });
});

describe('parseConfigLines and configLines', () => {
  it('reads JSON values, text otherwise, nested by the dots', () => {
    const { config, errors } = parseConfigLines('eval_strategy=epoch\nquantization.load_in_4bit=false\n# a note\n\nweight_decay=1e-3\ngeneration_eval.metrics=["rouge","bleu"]\nrun_name="5"\nformatter=a,b');
    assert.deepEqual(errors, []);
    assert.deepEqual(config, {
      eval_strategy: 'epoch', quantization: { load_in_4bit: false }, weight_decay: 0.001,
      generation_eval: { metrics: ['rouge', 'bleu'] }, run_name: '5', formatter: 'a,b',
    });
  });
  it('names the line of a bad or repeated key', () => {
    const { errors } = parseConfigLines('ok=1\nno equals sign\nok=2\n=3');
    assert.deepEqual(errors.map((e) => e.line), [2, 3, 4]);
  });
  it('writes what differs from the defaults, skipping the form\'s keys, and reads back the same', () => {
    const defaults = { eval_strategy: 'steps', save_steps: 20, lora: { r: 16, bias: 'none' }, quantization: { load_in_4bit: true } };
    const config = { eval_strategy: 'epoch', save_steps: 20, run_name: 'true', logging_dir: ' x', lora: { r: 8, bias: 'none' }, quantization: { load_in_4bit: false }, report_to: ['tensorboard'] };
    const text = configLines(config, defaults, new Set(['lora.r']));
    assert.equal(text, 'eval_strategy=epoch\nrun_name="true"\nlogging_dir=" x"\nquantization.load_in_4bit=false\nreport_to=["tensorboard"]');
    assert.deepEqual(parseConfigLines(text).config, {
      eval_strategy: 'epoch', run_name: 'true', logging_dir: ' x', quantization: { load_in_4bit: false }, report_to: ['tensorboard'],
    });
  });
});
