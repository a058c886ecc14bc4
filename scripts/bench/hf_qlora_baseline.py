"""Reference QLoRA baseline on a GPU: HF transformers + PEFT + bitsandbytes.

A copy of ../shared/bench/hf_qlora_baseline.py (the workplace's reference script), committed so
scripts/bench/gpu_qlora.sh is self-contained; the only change is --make-ckpt-only.

The same recipe as the reference notebook (NF4, double quantization, LoRA r=16,
alpha=32, dropout 0.1 on query_key_value/dense/dense_h_to_4h/dense_4h_to_h),
on a Falcon-7B-shaped checkpoint with random weights (no hub access needed).

Prints one JSON line per measurement. Usage on the GPU machine:
  python3 hf_qlora_baseline.py --ckpt /tmp/falcon7b-rand [--make-ckpt] \
      [--layers 32] [--batch 8] [--seq 512] [--steps 10] [--gen]
--make-ckpt writes a random bf16 safetensors checkpoint (config.json included)
that any other implementation can load, so both sides run on identical weights.
"""
import argparse, json, os, time

import torch


def falcon7b_config(layers):
    from transformers import FalconConfig
    return FalconConfig(
        vocab_size=65024, hidden_size=4544, num_hidden_layers=layers,
        num_attention_heads=71, multi_query=True, parallel_attn=True,
        bias=False, alibi=False, new_decoder_architecture=False,
        layer_norm_epsilon=1e-5, bos_token_id=11, eos_token_id=11,
        torch_dtype="bfloat16")


def make_ckpt(path, layers):
    from transformers import FalconForCausalLM
    torch.manual_seed(0)
    t = time.time()
    with torch.device("cuda"):
        model = FalconForCausalLM(falcon7b_config(layers)).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="4GB")
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(json.dumps({"what": "make_ckpt", "params": n, "s": round(time.time() - t, 1)}), flush=True)


def quantize_linears_nf4(model):
    """Swap every nn.Linear but lm_head for a bitsandbytes NF4 Linear4bit (double quant).

    transformers 5.17's BitsAndBytesConfig path finds no nn.Linear in Falcon
    ("no linear modules were found") and silently loads full precision, so this
    does what replace_with_bnb_linear is meant to do.
    """
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to("cuda")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, cname, q)
    torch.cuda.empty_cache()
    return model


def load_qlora(path):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"}, dtype=torch.bfloat16)
    model = quantize_linears_nf4(model).to("cuda")
    n4 = sum(1 for m in model.modules() if "Linear4bit" in type(m).__name__)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                     target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"what": "load", "s": round(time.time() - t, 1), "trainable": trainable,
                      "linear4bit": n4, "attn": getattr(model.config, "_attn_implementation", None),
                      "mem_gib": round(torch.cuda.memory_allocated() / 2**30, 2)}), flush=True)
    return model


def bench_train(model, batch, seq, steps, warmup=3):
    import bitsandbytes as bnbmod
    opt = bnbmod.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, 65024, (batch, seq), device="cuda", generator=g)
        torch.cuda.synchronize(); t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.time() - t)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"what": "train_step", "batch": batch, "seq": seq, "median_s": round(med, 4),
                      "tokens_per_s": round(batch * seq / med, 1), "loss": round(loss.item(), 4),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


@torch.no_grad()
def bench_generate(model, batch, prompt_len=200, new=50):
    # The 2026-12-06 run printed no generate line before its timeout: if a generate stalls
    # again, its stack goes to stderr after 120 s instead of nothing.
    import faulthandler, sys
    faulthandler.dump_traceback_later(120, repeat=True, file=sys.stderr)
    print(f"generate batch {batch}: start", file=sys.stderr, flush=True)
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(0, 65024, (batch, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=11)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=11)
    torch.cuda.synchronize(); t = time.time()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    torch.cuda.synchronize(); s = time.time() - t
    n = (out.shape[1] - prompt_len) * batch
    faulthandler.cancel_dump_traceback_later()
    # The model is the PEFT model bench_train trained: its adapter decodes unmerged.
    print(json.dumps({"what": "generate", "batch": batch, "prompt": prompt_len, "new": new,
                      "adapter": True, "merged": False,
                      "s": round(s, 3), "tokens_per_s": round(n / s, 1)}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/falcon7b-rand")
    ap.add_argument("--make-ckpt", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gen", action="store_true")
    ap.add_argument("--make-ckpt-only", action="store_true")
    a = ap.parse_args()
    print(json.dumps({"what": "env", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    if a.make_ckpt or not os.path.exists(os.path.join(a.ckpt, "config.json")):
        make_ckpt(a.ckpt, a.layers)
    if a.make_ckpt_only:
        return
    model = load_qlora(a.ckpt)
    bench_train(model, a.batch, a.seq, a.steps)
    if a.gen:
        for b in (1, 16):
            bench_generate(model, b)


if __name__ == "__main__":
    main()
