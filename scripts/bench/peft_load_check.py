"""Does HF PEFT load an adapter that adapterlab wrote, and does it change the model?

Loads the base checkpoint in bf16 on the GPU, computes logits on fixed token ids, applies the
adapter with PeftModel.from_pretrained (strict: unexpected or missing LoRA keys are reported),
and prints one JSON line: how many LoRA modules were matched and how far the logits moved.
Usage: python3 peft_load_check.py --base CKPT --adapter DIR
"""
import argparse, json, os

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    saved = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16, device_map={"": "cuda"})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (2, 64), generator=g).cuda()
    with torch.no_grad():
        before = base(input_ids=ids).logits.float()
    model = PeftModel.from_pretrained(base, a.adapter)
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    state = model.state_dict()
    # Every saved tensor must land on a parameter of the same shape.
    loaded = 0
    for k, v in saved.items():
        key = k.replace(".weight", ".default.weight")
        if key in state and state[key].shape == v.shape and torch.equal(state[key].cpu().to(v.dtype), v):
            loaded += 1
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    print(json.dumps({"what": "peft_load", "r": cfg.get("r"), "target_modules": cfg.get("target_modules"),
                      "lora_modules": lora_modules, "saved_tensors": len(saved), "tensors_equal_after_load": loaded,
                      "max_abs_logit_change": round((after - before).abs().max().item(), 5)}), flush=True)


if __name__ == "__main__":
    main()
