"""`length-py`: the `length` metric (plugins/length) written in Python.

Built into a WebAssembly component by componentize-py (see ../build.sh):

    componentize-py -d ../../../sdk/wit/since_v0.1.0 -w metric-plugin \
        componentize app -o length-py.wasm

It must give bit-identical results to the Rust and JavaScript versions for the same input;
the rules below are written so that all three can follow them exactly.

- A word is a maximal run of characters other than the six ASCII whitespace characters
  space, \\t, \\n, \\r, \\v (\\x0b) and \\f (\\x0c), after deleting every U+FEFF (the
  JavaScript runtime drops a leading U+FEFF from the strings it receives). Not `str.split()`:
  that splits on all Unicode whitespace (\\xa0, \\u2003, \\x1c...), which the others do not.
- `length_words` = words(prediction); `length_ratio` = words(prediction) / words(reference),
  clipped to the `max_ratio` setting when set; a reference without words is the sample error
  "reference is empty".
- Corpus: `length_words_total` = sum of `length_words` over the scored samples.
- `max_ratio`, U+FEFF deleted first (also in the error message), must match
  `+? (DIGITS [. DIGITS?] | . DIGITS) ([eE] [+-]? DIGITS)?` after trimming the separators,
  and be finite; otherwise the batch fails. Python's float() alone would also take "1_0",
  "inf" and "nan".
"""

import re
from typing import List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.metric import (
    BatchResult,
    MetricInfo,
    Sample,
    SampleResult,
    SampleResult_Error,
    SampleResult_Scores,
    ScoreSpec,
)
from wit_world.imports import config, log
from wit_world.imports.types import Capability, Manifest

NAME = "length-py"
VERSION = "0.1.0"
DESCRIPTION = "Prediction length in words, and its ratio to the reference length"
SCORE_MAX = 1e9

SEPARATORS = " \t\n\r\x0b\x0c"
IGNORED = "\ufeff"
_WORD = re.compile("[^ \t\n\r\x0b\x0c]+")
_PLAIN_DECIMAL = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def words(text: str) -> int:
    """The number of maximal runs of characters outside SEPARATORS, IGNORED deleted first."""
    return len(_WORD.findall(text.replace(IGNORED, "")))


def parse_max_ratio(raw: str) -> float:
    raw = raw.replace(IGNORED, "")
    invalid = 'setting `max_ratio`: expected a non-negative number, got "' + raw + '"'
    text = raw.strip(SEPARATORS)
    # [0-9], not \d: \d also matches other scripts' digits, which float() would accept.
    if _PLAIN_DECIMAL.fullmatch(text) is None:
        raise Err(invalid)
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise Err(invalid)
    return value


def score_samples(samples: List[Sample], max_ratio: Optional[float]) -> BatchResult:
    total = 0.0
    results: List[SampleResult] = []
    for sample in samples:
        prediction_words = words(sample.prediction)
        reference_words = words(sample.reference)
        if reference_words == 0:
            results.append(SampleResult_Error("reference is empty"))
            continue
        ratio = float(prediction_words) / float(reference_words)
        if max_ratio is not None and ratio > max_ratio:
            ratio = max_ratio
        total += float(prediction_words)
        results.append(
            SampleResult_Scores(
                [("length_words", float(prediction_words)), ("length_ratio", ratio)]
            )
        )
    return BatchResult(results, [("length_words_total", total)])


class Metric(exports.Metric):
    def info(self) -> MetricInfo:
        return MetricInfo(
            Manifest(NAME, VERSION, DESCRIPTION, [Capability.LOG, Capability.CONFIG]),
            [
                ScoreSpec(
                    "length_words",
                    "Words in the prediction (runs of non-whitespace, ASCII whitespace only)",
                    0.0,
                    SCORE_MAX,
                    False,
                ),
                ScoreSpec(
                    "length_ratio",
                    "Words in the prediction / words in the reference, clipped to max_ratio when set",
                    0.0,
                    SCORE_MAX,
                    False,
                ),
            ],
        )

    def score(self, samples: List[Sample]) -> BatchResult:
        # Raising componentize_py_types.Err(message) returns `err(message)` to the host: the
        # whole batch fails. Any other exception traps the instance.
        raw = config.get("max_ratio")
        max_ratio = None if raw is None else parse_max_ratio(raw)
        result = score_samples(samples, max_ratio)
        log.log(log.Level.INFO, "scored " + str(len(samples)) + " samples")
        return result
