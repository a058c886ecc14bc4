// `{{name}}`: an adapterlab metric plugin written in JavaScript (componentize-js).
//
// Score `{{score}}_overlap`: the share of the reference's distinct words that also occur in
// the prediction (unigram recall, exact match, case-sensitive). A word is a maximal run of
// characters other than the six ASCII whitespace characters.
//
// Bindings: WIT records are objects with camelCase fields, variants are { tag, val }, enums
// are strings, tuples are arrays, an absent option is undefined. A function returning
// result<T, string> returns T, and the error case is a thrown *string*: anything else thrown
// (an Error object) traps the component, so `score` turns thrown Errors into their message.

import { log } from "adapterlab:plugin/log@0.1.0";

const NAME = "{{name}}";
const OVERLAP = "{{score}}_overlap";

// Not /\s/: that is JavaScript's Unicode whitespace set; the host's other languages use ASCII.
const WORD = /[^ \t\n\r\v\f]+/g;

function words(text) {
  return new Set(text.match(WORD) ?? []);
}

/** The share of the reference's distinct words found in the prediction, in [0, 1]. */
export function overlap(prediction, reference) {
  const ref = words(reference);
  if (ref.size === 0) {
    throw new Error("reference has no words");
  }
  const pred = words(prediction);
  let shared = 0;
  for (const w of ref) {
    if (pred.has(w)) shared += 1;
  }
  return shared / ref.size;
}

/** An exception's message, whatever was thrown. */
function message(e) {
  return e instanceof Error ? e.message : String(e);
}

export const metric = {
  info() {
    return {
      // Declare every capability you call ("embed", "chat" too).
      manifest: {
        name: NAME,
        version: "0.1.0",
        description: "Word overlap: share of the reference's distinct words found in the prediction",
        capabilities: ["log", "config"],
      },
      scores: [
        {
          name: OVERLAP,
          description: "Distinct reference words that occur in the prediction / distinct reference words",
          min: 0,
          max: 1,
          higherIsBetter: true,
        },
      ],
    };
  },

  score(samples) {
    try {
      // A problem with one sample is that sample's error; the rest of the batch goes on.
      const results = samples.map((sample) => {
        try {
          return { tag: "scores", val: [[OVERLAP, overlap(sample.prediction, sample.reference)]] };
        } catch (e) {
          return { tag: "error", val: message(e) };
        }
      });
      log("debug", "scored " + samples.length + " samples");
      return { samples: results, corpus: [] };
    } catch (e) {
      // The batch's error must be thrown as a string: a thrown Error object would trap.
      throw message(e);
    }
  },
};
