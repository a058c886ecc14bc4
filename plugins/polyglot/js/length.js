// `length-js`: the `length` metric (plugins/length) written in JavaScript.
//
// Built into a WebAssembly component by componentize-js (see ../build.sh):
//
//   componentize-js length.js --wit ../../../sdk/wit/since_v0.1.0 \
//       --world-name metric-plugin --disable http fetch-event -o length-js.wasm
//
// It must give bit-identical results to the Rust and Python versions for the same input;
// the rules below are written so that all three can follow them exactly.
//
// - A word is a maximal run of characters other than the six ASCII whitespace characters
//   space, \t, \n, \r, \v (\x0b) and \f (\x0c), after deleting every U+FEFF. Not /\s/ or
//   String.prototype.trim: those use JavaScript's own Unicode whitespace set, which the other
//   languages do not. U+FEFF is deleted because this runtime drops a leading U+FEFF from every
//   string it receives from the host (a text "\uFEFF" arrives as ""), so the Rust and Python
//   versions ignore it too.
// - length_words = words(prediction); length_ratio = words(prediction) / words(reference),
//   clipped to the `max_ratio` setting when set; a reference without words is the sample
//   error "reference is empty".
// - Corpus: length_words_total = sum of length_words over the scored samples.
// - `max_ratio`, U+FEFF deleted first (also in the error message), must match
//   `+? (DIGITS [. DIGITS?] | . DIGITS) ([eE] [+-]? DIGITS)?` after trimming the separators,
//   and be finite; otherwise the batch fails. Number() alone would also take "", "0x10" and
//   "Infinity".
//
// Bindings: WIT records are objects with camelCase fields, variants are { tag, val },
// enums are strings, tuples are arrays, an absent option is undefined. Throwing a string
// from a function that returns result<_, string> returns err(string) to the host; throwing
// anything else traps, so `score` turns a thrown Error into its message.

import { log } from "adapterlab:plugin/log@0.1.0";
import { get as getSetting } from "adapterlab:plugin/config@0.1.0";

const NAME = "length-js";
const VERSION = "0.1.0";
const DESCRIPTION = "Prediction length in words, and its ratio to the reference length";
const SCORE_MAX = 1e9;

const WORD = /[^ \t\n\r\v\f]+/g;
const EDGE_SEPARATORS = /^[ \t\n\r\v\f]+|[ \t\n\r\v\f]+$/g;
const PLAIN_DECIMAL = /^\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;

/** The number of maximal runs of characters outside the six ASCII separators, U+FEFF deleted first. */
function words(text) {
  const found = text.replaceAll("\uFEFF", "").match(WORD);
  return found === null ? 0 : found.length;
}

function parseMaxRatio(setting) {
  const raw = setting.replaceAll("\uFEFF", "");
  const invalid = 'setting `max_ratio`: expected a non-negative number, got "' + raw + '"';
  const text = raw.replace(EDGE_SEPARATORS, "");
  if (!PLAIN_DECIMAL.test(text)) {
    throw invalid;
  }
  const value = Number(text);
  if (!Number.isFinite(value)) {
    throw invalid;
  }
  return value;
}

function scoreSamples(samples, maxRatio) {
  let total = 0;
  const results = samples.map((sample) => {
    const predictionWords = words(sample.prediction);
    const referenceWords = words(sample.reference);
    if (referenceWords === 0) {
      return { tag: "error", val: "reference is empty" };
    }
    let ratio = predictionWords / referenceWords;
    if (maxRatio !== undefined && ratio > maxRatio) {
      ratio = maxRatio;
    }
    total += predictionWords;
    return {
      tag: "scores",
      val: [
        ["length_words", predictionWords],
        ["length_ratio", ratio],
      ],
    };
  });
  return { samples: results, corpus: [["length_words_total", total]] };
}

export const metric = {
  info() {
    return {
      manifest: {
        name: NAME,
        version: VERSION,
        description: DESCRIPTION,
        capabilities: ["log", "config"],
      },
      scores: [
        {
          name: "length_words",
          description: "Words in the prediction (runs of non-whitespace, ASCII whitespace only)",
          min: 0,
          max: SCORE_MAX,
          higherIsBetter: false,
        },
        {
          name: "length_ratio",
          description: "Words in the prediction / words in the reference, clipped to max_ratio when set",
          min: 0,
          max: SCORE_MAX,
          higherIsBetter: false,
        },
      ],
    };
  },

  score(samples) {
    try {
      const raw = getSetting("max_ratio");
      const maxRatio = raw === undefined ? undefined : parseMaxRatio(raw);
      const result = scoreSamples(samples, maxRatio);
      log("info", "scored " + samples.length + " samples");
      return result;
    } catch (e) {
      // The error case of result<_, string> must be thrown as a string: a thrown Error
      // object (a bug, a RangeError from the engine) would trap the component instead.
      throw e instanceof Error ? e.name + ": " + e.message : String(e);
    }
  },
};
