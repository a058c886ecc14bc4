"""Per-kernel GPU time from Nsight Compute's CSV (`ncu --csv --print-units base --metrics
gpu__time_duration.sum`), as the ncu stage of gpu_qlora.sh collects it: every kernel timed
alone, no synchronisation or host time in it, so small launches weigh what they cost the device.

Usage: python3 ncu_kernels.py CSV [--cycle REGEX] [--top N]

Without --cycle: each kernel name's launches and total time over the whole run.
With --cycle REGEX: the run cut into cycles, each starting at a launch whose name matches REGEX
(e.g. the first NF4 product of a decoding step) and ending before the next cycle's start; the
cycles of the most common length (the steady state: a prefill or a warm-up changes a cycle's
length) are averaged, and each kernel name's share of one cycle is printed, with the cycle's
total kernel time and launch count. Prints JSON lines (what: ncu_kernel, ncu_cycle)."""
import csv, json, re, sys
from collections import Counter, defaultdict


def launches(path):
    """(id, name, ns) per launch, in launch order."""
    out = {}
    with open(path, newline="") as f:
        # ncu writes its own log lines (==PROF==) before the CSV header in some modes.
        rows = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(rows):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6,
                 "second": 1e9, "s": 1e9}.get(unit)
        if scale is None:
            raise SystemExit(f"{path}: unknown unit {unit!r} for launch {r.get('ID')}")
        out[int(r["ID"])] = (r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * scale)
    return [(i, *out[i]) for i in sorted(out)]


def short(name):
    return name.split("(")[0][:90]


def main():
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    path, cycle, top = args[0], None, 40
    if "--cycle" in args:
        cycle = re.compile(args[args.index("--cycle") + 1])
    if "--top" in args:
        top = int(args[args.index("--top") + 1])
    ls = launches(path)
    if not ls:
        raise SystemExit(f"{path}: no gpu__time_duration.sum rows")
    if cycle is None:
        total, count = defaultdict(float), Counter()
        for _, name, ns in ls:
            total[short(name)] += ns
            count[short(name)] += 1
        all_ns = sum(total.values())
        print(json.dumps({"what": "ncu_total", "launches": len(ls), "us": round(all_ns / 1e3, 1)}))
        for name, ns in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
            print(json.dumps({"what": "ncu_kernel", "kernel": name, "launches": count[name],
                              "us": round(ns / 1e3, 1), "share": round(ns / all_ns, 4)}))
        return
    starts = [k for k, (_, name, _) in enumerate(ls) if cycle.search(name)]
    cycles = [ls[a:b] for a, b in zip(starts, starts[1:])]
    if not cycles:
        raise SystemExit(f"{path}: fewer than two launches match {cycle.pattern!r}")
    # A cycle's signature is its sequence of names; the steady state is the most common one.
    sig = Counter(tuple(short(n) for _, n, _ in c) for c in cycles)
    steady, n_steady = sig.most_common(1)[0]
    chosen = [c for c in cycles if tuple(short(n) for _, n, _ in c) == steady]
    per = defaultdict(float)
    count = Counter(steady)
    for c in chosen:
        for _, name, ns in c:
            per[short(name)] += ns / len(chosen)
    cyc_ns = sum(per.values())
    print(json.dumps({"what": "ncu_cycle", "pattern": cycle.pattern, "cycles": len(cycles),
                      "steady_cycles": n_steady, "launches_per_cycle": len(steady),
                      "kernel_us_per_cycle": round(cyc_ns / 1e3, 1)}))
    for name, ns in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(json.dumps({"what": "ncu_kernel", "kernel": name, "launches": count[name],
                          "us": round(ns / 1e3, 2), "share": round(ns / cyc_ns, 4)}))


if __name__ == "__main__":
    main()
