"""`{{name}}`: an adapterlab metric plugin written in Python (componentize-py).

Score `{{score}}_overlap`: the share of the reference's distinct words that also occur in the
prediction (unigram recall, exact match, case-sensitive). A word is a maximal run of
characters other than the six ASCII whitespace characters.

Build: ./build.sh (componentize-py -d wit -w metric-plugin componentize app -o {{name}}.wasm)
"""

import re
from typing import List

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
from wit_world.imports import log
from wit_world.imports.types import Capability, Manifest

NAME = "{{name}}"
OVERLAP = "{{score}}_overlap"

# Not str.split(): that splits on every Unicode space; the host's other languages use ASCII.
_WORD = re.compile("[^ \t\n\r\x0b\x0c]+")


def overlap(prediction: str, reference: str) -> float:
    """The share of the reference's distinct words found in the prediction, in [0, 1]."""
    reference_words = set(_WORD.findall(reference))
    if not reference_words:
        raise ValueError("reference has no words")
    prediction_words = set(_WORD.findall(prediction))
    return len(reference_words & prediction_words) / len(reference_words)


def score_sample(sample: Sample) -> SampleResult:
    # A problem with one sample is that sample's error; the rest of the batch goes on.
    try:
        return SampleResult_Scores([(OVERLAP, overlap(sample.prediction, sample.reference))])
    except ValueError as e:
        return SampleResult_Error(str(e))


class Metric(exports.Metric):
    def info(self) -> MetricInfo:
        return MetricInfo(
            # Declare every capability you call (Capability.EMBED, Capability.CHAT too).
            Manifest(
                NAME,
                "0.1.0",
                "Word overlap: share of the reference's distinct words found in the prediction",
                [Capability.LOG, Capability.CONFIG],
            ),
            [
                ScoreSpec(
                    OVERLAP,
                    "Distinct reference words that occur in the prediction / distinct reference words",
                    0.0,
                    1.0,
                    True,
                )
            ],
        )

    def score(self, samples: List[Sample]) -> BatchResult:
        # `raise Err("message")` fails the whole batch with that message (for problems that
        # concern every sample, such as a bad setting); any other uncaught exception traps.
        try:
            results = [score_sample(s) for s in samples]
        except Exception as e:  # a bug: report it as the batch's error rather than trap
            raise Err(f"{type(e).__name__}: {e}")
        log.log(log.Level.DEBUG, f"scored {len(samples)} samples")
        return BatchResult(results, [])
