"""Where the Python reference's training step spends GPU time: torch.profiler over one step of
hf_qlora_baseline.py's workload (NF4 + double quant, LoRA r16 on the four linear kinds, bf16
autocast), on a checkpoint made with its --make-ckpt-only (a few layers are enough to rank
kernels). Prints the step time and the kernels by total GPU time, to set beside
`ADAPTERLAB_PROFILE=1 adapterlab bench train` on the same checkpoint.

    python3 scripts/bench/hf_qlora_profile.py --ckpt /tmp/falcon7b-8l [--batch 8 --seq 512]
"""
import argparse, json, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hf_qlora_baseline import load_qlora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=35)
    args = ap.parse_args()
    import bitsandbytes as bnbmod
    from torch.profiler import profile, ProfilerActivity

    model = load_qlora(args.ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnbmod.optim.PagedAdamW32bit(params, lr=2e-4)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(1)

    def step():
        ids = torch.randint(0, 65024, (args.batch, args.seq), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(5):
        torch.cuda.synchronize(); t = time.time()
        step()
        torch.cuda.synchronize(); times.append(time.time() - t)
    print(json.dumps({"what": "step_s", "times": [round(x, 4) for x in times]}), flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
