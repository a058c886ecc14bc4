"""The table of scripts/bench/gpu_qlora.sh: both sides' numbers and the ratios, as Markdown.
Usage: python3 gpu_table.py results.jsonl gpu.csv date.txt"""
import json, sys


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
    gpu = open(sys.argv[2]).read().strip().splitlines()[-1]
    date = open(sys.argv[3]).read().strip()

    def find(side, what, **kw):
        for r in rows:
            if r.get("side") == side and r.get("what") == what and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    print(f"GPU: {gpu}  \nDate: {date}\n")
    print("| workload | Python (transformers + PEFT + bitsandbytes) | adapterlab | ratio |")
    print("| --- | --- | --- | --- |")
    p, o = find("python", "train_step"), find("adapterlab", "train_step", gradient_checkpointing=False)
    ckpts = [r for r in rows if r.get("side") == "adapterlab" and r.get("what") == "train_step"
             and r.get("gradient_checkpointing")]
    if o:
        pv = p and p["tokens_per_s"]; ov = o and o["tokens_per_s"]
        print(f"| train step, batch 8 x 512, tokens/s | {pv} | {ov} | {round(ov / pv, 2) if pv and ov else '-'}x |")
        pm = find("python", "nvidia_smi_peak"); om = find("adapterlab-train", "nvidia_smi_peak")
        pt = p and p.get("peak_gib")
        pmg = pm and round(pm["mib"] / 1024, 1); omg = om and round(om["mib"] / 1024, 1)
        print(f"| train peak GPU memory, GiB (nvidia-smi) | {pmg} (torch allocated: {pt}) | {omg} | "
              f"{round(omg / pmg, 2) if pmg and omg else '-'}x |")
    for oc in ckpts:
        every = oc.get("checkpoint_every", 1)
        pv = p and p["tokens_per_s"]
        pm = find("python", "nvidia_smi_peak")
        om = find(f"adapterlab-train-ckpt-{every}", "nvidia_smi_peak") or find("adapterlab-train-ckpt", "nvidia_smi_peak")
        which = "every layer" if every == 1 else f"every {every} layers"
        print(f"| train step, gradient checkpointing of {which} (Python: none), tokens/s | {pv} | {oc['tokens_per_s']} | "
              f"{round(oc['tokens_per_s'] / pv, 2) if pv else '-'}x |")
        if om:
            pmg = pm and round(pm["mib"] / 1024, 1); omg = round(om["mib"] / 1024, 1)
            print(f"| its peak GPU memory, GiB (nvidia-smi) | {pmg} | {omg} | {round(omg / pmg, 2) if pmg else '-'}x |")
    for b in (1, 16):
        p = find("python", "generate", batch=b)
        for merged in (False, True):
            o = find("adapterlab", "generate", batch=b, merged=merged)
            if not o:
                continue
            pv = p and p["tokens_per_s"]; ov = o and o["tokens_per_s"]
            label = "merged" if merged else "unmerged"
            print(f"| generate batch {b}, 200 + 50 tokens, adapter {label}, tokens/s | {pv} | {ov} | "
                  f"{round(ov / pv, 2) if pv and ov else '-'}x |")
    sft = [r for r in rows if r.get("side") == "adapterlab-sft" and "loss" in r]
    if sft:
        print("\nadapterlab train, 50 steps at batch 8 x 512 (loss by logged step): " +
              ", ".join(f"{r['step']}: {r['loss']}" for r in sft))
    ev = [r for r in rows if r.get("side") == "adapterlab-sft" and "eval_loss" in r]
    if ev:
        print("eval_loss: " + ", ".join(f"step {r['step']}: {r['eval_loss']}" for r in ev))
    m = find("adapterlab-sft", "nvidia_smi_peak")
    if m:
        print(f"adapterlab train peak GPU memory (nvidia-smi): {round(m['mib'] / 1024, 1)} GiB")
    pl = find("python-peft", "peft_load")
    if pl:
        print(f"HF PEFT load of that adapter: {json.dumps(pl)}")


if __name__ == "__main__":
    main()
