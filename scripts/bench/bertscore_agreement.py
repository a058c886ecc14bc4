#!/usr/bin/env python3
"""BERTScore agreement: adapterlab's `bertscore` plugin against the reference `bert-score`
package (0.3.13), same encoder weights, same layer, same pairs.

Two halves, because the reference needs torch (on the GPU machine) and the encoder is too big
to carry as f32:

  prepare ENCODER_DIR OUT_DIR    (here) write OUT_DIR/carry/ (the encoder in f16 + tokenizer),
                                 OUT_DIR/encoder-f32/ (the same f16-rounded weights as f32, for
                                 adapterlab) and OUT_DIR/pairs.jsonl (project-written pairs)
  reference CARRY_DIR PAIRS OUT  (GPU machine) widen the f16 weights to f32 and run
                                 bert_score.score(..., num_layers=6) with idf off and on
  compare REF.json OURS_NOIDF.json OURS_IDF.json   print the largest differences

Both sides use bit-identical f32 weights (the f16-rounded ones), so any difference is the
implementations'.
"""
import json
import os
import shutil
import sys


def prepare(encoder_dir, out):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(encoder_dir, "model.safetensors"))
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    widened = {k: v.astype(np.float32) for k, v in half.items()}
    for sub, ts in (("carry", half), ("encoder-f32", widened)):
        d = os.path.join(out, sub)
        os.makedirs(d, exist_ok=True)
        save_file(ts, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        for f in ("config.json", "tokenizer.json"):
            shutil.copy(os.path.join(encoder_dir, f), d)
    here = os.path.dirname(os.path.abspath(__file__))
    fixture = os.path.join(here, "..", "..", "plugins", "rouge", "tests", "fixtures", "rouge.jsonl")
    seen = set()
    with open(fixture) as f, open(os.path.join(out, "pairs.jsonl"), "w") as o:
        for line in f:
            row = json.loads(line)
            if not row["use_stemmer"] or row["id"] in seen:
                continue
            seen.add(row["id"])
            if not row["prediction"].strip() or not row["target"].strip():
                continue
            o.write(json.dumps({"id": row["id"], "prediction": row["prediction"], "reference": row["target"]}) + "\n")
    print(f"prepared {len(seen)} pairs under {out}")


def reference(carry, pairs, out):
    import torch
    from safetensors.torch import load_file, save_file
    from bert_score import score

    d = "/tmp/minilm-f32"
    os.makedirs(d, exist_ok=True)
    ts = {k: v.float() for k, v in load_file(os.path.join(carry, "model.safetensors")).items()}
    save_file(ts, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(carry, f), d)
    # Without it transformers takes model_max_length as 1e30, which bert-score passes on as
    # max_length; adapterlab truncates at max_position_embeddings (512) too.
    json.dump({"model_max_length": 512, "tokenizer_class": "BertTokenizer", "do_lower_case": True},
              open(os.path.join(d, "tokenizer_config.json"), "w"))
    rows = [json.loads(l) for l in open(pairs)]
    cands = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    result = {"ids": [r["id"] for r in rows]}
    for idf in (False, True):
        p, r, f = score(cands, refs, model_type=d, num_layers=6, idf=idf, batch_size=64,
                        device="cuda" if torch.cuda.is_available() else "cpu", lang="en")
        result["idf" if idf else "noidf"] = {"P": p.tolist(), "R": r.tolist(), "F": f.tolist()}
    json.dump(result, open(out, "w"))
    print(f"reference scores for {len(rows)} pairs written to {out}")


def compare(ref_path, ours_noidf, ours_idf):
    ref = json.load(open(ref_path))
    print("| setting | pairs | max abs diff P | max abs diff R | max abs diff F1 | mean abs diff F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, path in (("noidf", ours_noidf), ("idf", ours_idf)):
        ours = {s["id"]: s["scores"] for s in json.load(open(path))["samples"]}
        diffs = {"P": [], "R": [], "F": []}
        for i, sid in enumerate(ref["ids"]):
            o = ours[sid]
            for k, name in (("P", "bertscore_precision"), ("R", "bertscore_recall"), ("F", "bertscore_f1")):
                diffs[k].append(abs(o[name] - ref[key][k][i]))
        n = len(diffs["F"])
        print(f"| idf={'on' if key == 'idf' else 'off'} | {n} | {max(diffs['P']):.2e} | {max(diffs['R']):.2e} "
              f"| {max(diffs['F']):.2e} | {sum(diffs['F']) / n:.2e} |")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"prepare": prepare, "reference": reference, "compare": compare}[cmd](*args)
