"""Multi-reference cases for the metric fixtures: (id, prediction, [references]).

Built deterministically from the hand-written pairs and edge cases (no dataset text): each
prediction gets its own reference plus 0-3 others (another pair's reference, a reordered or
cut copy of its own, a near-copy of the prediction, an empty string), so the best reference
is sometimes the first, sometimes not, and brevity and clipping rules are exercised. Shared by
`plugins/{rouge,bleu}/tests/fixtures/make_multi_reference.py`.
"""

import random

from dialogue_pairs import PAIRS
from edge_cases import EDGE_CASES


def multi_reference_cases():
    rng = random.Random(20260314)
    refs = [r for r, _ in PAIRS]
    out = []
    for i, (ref, pred) in enumerate(PAIRS):
        words = ref.split()
        shuffled = words[:]
        rng.shuffle(shuffled)
        variants = [
            refs[(i + 1) % len(refs)],
            " ".join(shuffled),
            " ".join(words[: max(1, len(words) // 2)]),
            " ".join(pred.split()[:-1]),
            ref + " " + ref,
            "",
        ]
        for k in range(4):
            others = rng.sample(variants, k)
            group = [ref] + others
            rng.shuffle(group)
            out.append((f"pair{i}-refs{k + 1}", pred, group))
        # A prediction that equals one of several references.
        out.append((f"pair{i}-exact", ref, [refs[(i + 3) % len(refs)], ref]))
    for j, case in enumerate(EDGE_CASES):
        ref, pred = case[0], case[1]
        out.append((f"edge{j}-refs2", pred, [ref, pred[: len(pred) // 2]]))
    return out


def corpus_batches(cases, rng_seed=20260315):
    """Consecutive runs of cases for corpus BLEU, of sizes 1 to 15."""
    rng = random.Random(rng_seed)
    batches, start = [], 0
    while start < len(cases):
        size = rng.randint(1, 15)
        batches.append(cases[start:start + size])
        start += size
    return batches
