"""Loads the built rouge, bleu and bertscore components in wasmtime and checks them end to end.

The native tests check the Rust code; this checks the `.wasm` components themselves: that
they instantiate against the `adapterlab:plugin@0.1.0` imports, that `info` and `score`
round-trip through the component ABI, that settings are read through `config`, and that the
scores equal the reference packages' (rouge-score, sacrebleu) or, for bertscore, bert-score's
math (the numpy transliteration in bertscore's fixture script) over a fake encoder's
embeddings. It is a developer check, not part of `cargo test`. Run from the repository root:

    cargo build --release --target wasm32-wasip2 \
        -p adapterlab-plugin-rouge -p adapterlab-plugin-bleu -p adapterlab-plugin-bertscore
    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install wasmtime==50.0.1 \
        rouge-score==0.1.2 sacrebleu==2.6.0 nltk numpy
    /tmp/venv/bin/python plugins/testdata/component_smoke.py [WASM_FOLDER]

WASM_FOLDER defaults to `$CARGO_TARGET_DIR` (or `target`) `/wasm32-wasip2/release`.
"""

import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from wasmtime import Engine, Store, WasiConfig
from wasmtime.component import Component, Linker, Record

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins/testdata"))
sys.path.insert(0, str(ROOT / "plugins/bertscore/tests/fixtures"))
from dialogue_pairs import PAIRS  # noqa: E402
from edge_cases import EDGE_CASES  # noqa: E402
from make_fixtures import numpy_functions  # noqa: E402

PKG = "adapterlab:plugin"
VER = "0.1.0"
CLS, SEP, DIM = 101, 102, 8
FAILURES = []


def check(ok, what):
    if not ok:
        FAILURES.append(what)
        print("FAIL", what)


def record(**fields):
    r = Record()
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def fake_embed(text):
    """A fake encoder: [CLS] word... [SEP], a fixed random vector per word id."""
    words = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    ids = [CLS] + [1000 + zlib.crc32(w.encode()) % 5000 for w in words] + [SEP]
    vectors = []
    for i in ids:
        rng = np.random.default_rng(i)
        vectors.extend(float(np.float32(x)) for x in rng.normal(0.5, 1.0, DIM))
    return record(tokens=["[CLS]"] + words + ["[SEP]"], ids=ids, special=[i in (CLS, SEP) for i in ids], vectors=vectors)


class Host:
    """The host side: settings, a log, and the fake encoder."""

    def __init__(self, wasm):
        self.engine = Engine()
        self.component = Component.from_file(self.engine, str(wasm))
        self.settings = {}
        self.logs = []
        self.embed_calls = 0

    def call(self, name, *args):
        store = Store(self.engine)
        store.set_wasi(WasiConfig())
        linker = Linker(self.engine)
        linker.add_wasip2()
        with linker.root() as root:
            with root.add_instance(f"{PKG}/log@{VER}") as log:
                log.add_func("log", lambda _s, level, msg: self.logs.append((level, msg)))
            with root.add_instance(f"{PKG}/config@{VER}") as config:
                config.add_func("get", lambda _s, key: self.settings.get(key))
                config.add_func("all", lambda _s: sorted(self.settings.items()))
            with root.add_instance(f"{PKG}/embed@{VER}") as embed:
                embed.add_func("info", lambda _s, model, layer: record(model=model or "fake-encoder", layer=6 if layer is None else layer, dim=DIM))

                def embed_texts(_s, model, layer, texts):
                    self.embed_calls += 1
                    return [fake_embed(t) for t in texts]

                embed.add_func("embed", embed_texts)
        linker.define_unknown_imports_as_traps(self.component)
        instance = linker.instantiate(store, self.component)
        iface = instance.get_export_index(store, f"{PKG}/metric@{VER}")
        func = instance.get_func(store, instance.get_export_index(store, name, iface))
        return func(store, *args)


def samples(pairs):
    return [record(id=str(i), prediction=p, reference=r, source=None) for i, (r, p) in enumerate(pairs)]


def scores_of(result):
    """Each sample's scores as a dict, or its error string (wasmtime-py gives the
    `sample-result` variant untagged: a list of tuples or a string)."""
    if isinstance(result, str):
        raise AssertionError(f"the batch failed: {result}")
    return [dict(s) if isinstance(s, list) else s for s in result.samples]


def run_rouge(folder, pairs):
    host = Host(folder / "adapterlab_plugin_rouge.wasm")
    info = host.call("info")
    check(info.manifest.name == "rouge" and info.manifest.version == "0.1.0", "rouge manifest")
    check([s.name for s in info.scores] == ["rouge1", "rouge2", "rougeL", "rougeLsum"], "rouge score specs")
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    for setting, stem in [(None, True), ("false", False)]:
        host.settings = {} if setting is None else {"use_stemmer": setting}
        got = scores_of(host.call("score", samples(pairs)))
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=stem)
        worst = 0.0
        for (ref, pred), g in zip(pairs, got):
            want = scorer.score(ref, pred)
            for t in types:
                worst = max(worst, abs(g[t] - want[t].fmeasure))
        check(worst <= 1e-6, f"rouge use_stemmer={stem}: worst difference {worst}")
        print(f"rouge (use_stemmer={stem}): {len(pairs)} samples, worst difference {worst:.1e}")
    host.settings = {"use_stemmer": "perhaps"}
    err = host.call("score", samples(pairs[:1]))
    check(isinstance(err, str) and "use_stemmer" in err, f"rouge bad setting gives a batch error: {err!r}")


def run_bleu(folder, pairs):
    host = Host(folder / "adapterlab_plugin_bleu.wasm")
    info = host.call("info")
    check(info.manifest.name == "bleu" and [s.name for s in info.scores] == ["bleu"], "bleu manifest")
    result = host.call("score", samples(pairs))
    got = scores_of(result)
    worst = max(abs(g["bleu"] - sacrebleu.sentence_bleu(p, [r]).score) for (r, p), g in zip(pairs, got))
    check(worst <= 1e-4, f"bleu sentence: worst difference {worst}")
    corpus = dict(result.corpus)["bleu"]
    want = sacrebleu.corpus_bleu([p for _, p in pairs], [[r for r, _ in pairs]]).score
    check(abs(corpus - want) <= 1e-4, f"bleu corpus {corpus} vs {want}")
    print(f"bleu: {len(pairs)} samples, worst difference {worst:.1e}; corpus {corpus:.6f} vs sacrebleu {want:.6f}")


def run_bertscore(folder, pairs):
    _, score_pair, idf_dict = numpy_functions()
    host = Host(folder / "adapterlab_plugin_bertscore.wasm")
    info = host.call("info")
    check(info.manifest.name == "bertscore", "bertscore manifest")
    check("embed" in [str(c) for c in info.manifest.capabilities], f"bertscore asks for embed: {info.manifest.capabilities}")
    for settings, idf, baseline in [
        ({}, False, None),
        ({"idf": "true"}, True, None),
        ({"baseline": "0.3,0.25,0.28", "layer": "3"}, False, [0.3, 0.25, 0.28]),
    ]:
        host.settings, host.logs = settings, []
        got = scores_of(host.call("score", samples(pairs)))
        emb = {t: fake_embed(t) for r, p in pairs for t in (r, p)}
        if idf:
            weights = idf_dict([emb[r].ids for r, _ in pairs])
        else:
            weights = {CLS: 0.0, SEP: 0.0}
        worst = 0.0
        errors = 0
        for (ref, pred), g in zip(pairs, got):
            def side(t):
                e = emb[t]
                return {"ids": e.ids, "vectors": np.asarray(e.vectors, dtype=np.float32).reshape(-1, DIM)}

            w = lambda t: [float(weights.get(i, math.log(len(pairs) + 1) if idf else 1.0)) for i in emb[t].ids]
            want = score_pair(side(pred), side(ref), w(pred), w(ref))
            if baseline:
                want = [(s - b) / (1 - b) for s, b in zip(want, baseline)]
            if not isinstance(g, dict):
                errors += 1
                check(any(math.isnan(x) for x in want), f"bertscore error where bert-score has a number: {g} vs {want}")
                continue
            worst = max(worst, *(abs(a - b) for a, b in zip([g["bertscore_precision"], g["bertscore_recall"], g["bertscore_f1"]], want)))
        check(worst <= 1e-5, f"bertscore {settings}: worst difference {worst}")
        check(any("fake-encoder" in m for _, m in host.logs), f"bertscore logs the encoder: {host.logs}")
        print(f"bertscore {settings}: {len(pairs)} samples ({errors} undefined), worst difference {worst:.1e}; log: {host.logs[0][1]}")
    host.settings = {"rescale_with_baseline": "true"}
    err = host.call("score", samples(pairs[:2]))
    check(isinstance(err, str) and "rescale_with_baseline" in err, f"bertscore unknown baseline: {err!r}")
    print(f"bertscore rescale_with_baseline=true: {err}")


def main():
    default = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "wasm32-wasip2/release"
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    pairs = PAIRS + EDGE_CASES
    run_rouge(folder, pairs)
    run_bleu(folder, pairs)
    run_bertscore(folder, PAIRS[:40] + EDGE_CASES[:10])
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
