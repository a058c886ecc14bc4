// Word-level differences between two texts, by longest common subsequence.
//
// Texts are split into words, punctuation marks and the whitespace between them; only words and
// punctuation take part in the comparison, and each keeps the whitespace that preceded it so the
// result can be laid out exactly as the texts were written. Pure functions, no DOM: the unit
// tests import this module directly.

const TOKEN = /(\s*)([\p{L}\p{N}_]+(?:['’][\p{L}\p{N}_]+)*|[^\s\p{L}\p{N}_])/gu;

/** Split `text` into `{ space, word }` tokens; trailing whitespace is dropped. */
export function tokenize(text) {
  const tokens = [];
  for (const m of String(text ?? '').matchAll(TOKEN)) tokens.push({ space: m[1], word: m[2] });
  return tokens;
}

// Past this many table cells the quadratic LCS is replaced by a prefix/suffix diff, so a pair of
// very long texts cannot freeze the page.
const MAX_CELLS = 4_000_000;

/**
 * Diff `before` against `after`. Returns runs of `{ op: 'same' | 'del' | 'ins', space, text }` in reading
 * order, where `same` and `ins` runs spell out `after` and `same` and `del` runs spell out `before`
 * (`space` is the whitespace to write before the run, outside any highlight).
 * Words compare case-sensitively; whitespace differences alone are not reported.
 */
export function wordDiff(before, after) {
  const a = tokenize(before);
  const b = tokenize(after);
  let start = 0;
  while (start < a.length && start < b.length && a[start].word === b[start].word) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1].word === b[endB - 1].word) {
    endA--;
    endB--;
  }
  const ops = [];
  for (let i = 0; i < start; i++) ops.push({ op: 'same', token: b[i] });
  const midA = a.slice(start, endA);
  const midB = b.slice(start, endB);
  if (midA.length * midB.length > MAX_CELLS) {
    for (const t of midA) ops.push({ op: 'del', token: t });
    for (const t of midB) ops.push({ op: 'ins', token: t });
  } else {
    ops.push(...lcsOps(midA, midB));
  }
  for (let i = endB; i < b.length; i++) ops.push({ op: 'same', token: b[i] });
  return mergeRuns(ops);
}

function lcsOps(a, b) {
  const n = a.length;
  const m = b.length;
  // suffix[i][j] = LCS length of a[i..] and b[j..], in one flat typed array.
  const w = m + 1;
  const suffix = new Uint32Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      suffix[i * w + j] = a[i].word === b[j].word
        ? suffix[(i + 1) * w + j + 1] + 1
        : Math.max(suffix[(i + 1) * w + j], suffix[i * w + j + 1]);
    }
  }
  const ops = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i].word === b[j].word) {
      ops.push({ op: 'same', token: b[j] });
      i++;
      j++;
    } else if (suffix[(i + 1) * w + j] >= suffix[i * w + j + 1]) {
      ops.push({ op: 'del', token: a[i++] });
    } else {
      ops.push({ op: 'ins', token: b[j++] });
    }
  }
  while (i < n) ops.push({ op: 'del', token: a[i++] });
  while (j < m) ops.push({ op: 'ins', token: b[j++] });
  return ops;
}

// Adjacent tokens with the same op become one run. A run's leading whitespace is kept apart in
// `space`, so a highlighted run starts at its first word rather than at a blank.
function mergeRuns(ops) {
  const runs = [];
  for (const { op, token } of ops) {
    const last = runs[runs.length - 1];
    const space = runs.length === 0 ? '' : normaliseSpace(token.space);
    if (last && last.op === op) last.text += space + token.word;
    else runs.push({ op, space, text: token.word });
  }
  return runs;
}

function normaliseSpace(space) {
  if (space === '') return '';
  return space.includes('\n') ? '\n' : ' ';
}

/** Counts of inserted and deleted words, for summaries such as "+3 −2 words". */
export function diffStats(runs) {
  let ins = 0;
  let del = 0;
  for (const r of runs) {
    const words = tokenize(r.text).length;
    if (r.op === 'ins') ins += words;
    if (r.op === 'del') del += words;
  }
  return { ins, del };
}
