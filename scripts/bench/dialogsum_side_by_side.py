#!/usr/bin/env python3
"""DialogSum side by side (issue 16, part 4): the rows both trainers see, the TRL side, and the
references attached to adapterlab's predictions. One prompt template for everything, so
adapterlab and TRL train and generate on identical text.

  rows DATA_DIR OUT_DIR [--val N] [--gen N]   split/train.jsonl (dev), split/validation.jsonl
                                              (first N test rows, summary1), gen.jsonl (the
                                              first N test rows' inputs and 3 references)
  trl CKPT SPLIT_DIR OUT_DIR --config C.toml  TRL SFTTrainer + PEFT LoRA with C's settings
  attach GEN.jsonl PRED.jsonl                 put each row's three references into predictions

The data stays out of git (benchmarks only): DATA_DIR is ../shared/data/dialogsum.
"""
import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

# The summarize formatter's template (plugins/formatter), verbatim, with its default instruction.
INSTRUCTION = "Write a concise summary of the following dialogue."
TEMPLATE = "### Instruction:\n{instruction}\n\n### Dialogue:\n{dialogue}\n\n### Summary:\n"


def prompt(dialogue):
    return TEMPLATE.format(instruction=INSTRUCTION, dialogue=dialogue)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def cmd_rows(a):
    dev = read_jsonl(Path(a.data_dir) / "dev.jsonl")
    test = read_jsonl(Path(a.data_dir) / "test.jsonl")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [{"prompt": prompt(r["dialogue"]), "completion": r["summary"].strip()} for r in dev]
    val = [
        {"prompt": prompt(r["dialogue"]), "completion": r["summary1"].strip()}
        for r in test[: a.val]
    ]
    gen = []
    for r in test[: a.gen]:
        refs = [r[k].strip() for k in ("summary1", "summary2", "summary3")]
        gen.append(
            {
                "id": r["fname"],
                "prompt": prompt(r["dialogue"]),
                "completion": refs[0],
                "dialogue": r["dialogue"],
                "references": refs,
            }
        )
    # adapterlab reads a folder of train/validation files; TRL gets the same files.
    (out / "split").mkdir(exist_ok=True)
    write_jsonl(out / "split" / "train.jsonl", train)
    write_jsonl(out / "split" / "validation.jsonl", val)
    write_jsonl(out / "gen.jsonl", gen)
    print(f"rows: train {len(train)}, validation {len(val)}, generation {len(gen)} -> {out}")


def cmd_attach(a):
    refs = {r["id"]: r["references"] for r in read_jsonl(a.gen)}
    preds = read_jsonl(a.pred)
    for p in preds:
        if p["id"] not in refs:
            sys.exit(f"{a.pred}: id {p['id']!r} is not in {a.gen}")
        # A predictions file gives `reference` or `references`, not both (host/src/eval/input.rs).
        p.pop("reference", None)
        p["references"] = refs[p["id"]]
    if len(preds) != len(refs):
        sys.exit(f"{a.pred}: {len(preds)} predictions for {len(refs)} rows")
    write_jsonl(a.pred, preds)
    print(f"attached 3 references (in place of `reference`) to {len(preds)} predictions in {a.pred}")


def token_mean_loss(trainer):
    """The eval loss as adapterlab computes it: summed over target tokens, divided by their
    count. transformers' `evaluate` averages per-batch means instead, weighting a short batch's
    tokens more; the two differ by a few percent on the same weights."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = {k: v.to(model.device) for k, v in batch.items() if hasattr(v, "to")}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1)


def cmd_trl(a):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    with open(a.config, "rb") as f:
        c = tomllib.load(f)
    lora = c["lora"]
    out = Path(a.out_dir)
    tok = AutoTokenizer.from_pretrained(a.ckpt)
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.bfloat16 if c["bf16"] else torch.float32)
    files = {"train": str(Path(a.split_dir) / "train.jsonl"), "validation": str(Path(a.split_dir) / "validation.jsonl")}
    ds = load_dataset("json", data_files=files)
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=c["num_train_epochs"],
        per_device_train_batch_size=c["per_device_train_batch_size"],
        per_device_eval_batch_size=c["per_device_eval_batch_size"],
        gradient_accumulation_steps=c["gradient_accumulation_steps"],
        learning_rate=c["learning_rate"],
        lr_scheduler_type=c["lr_scheduler_type"],
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is the ratio.
        warmup_steps=c["warmup_ratio"],
        max_grad_norm=c["max_grad_norm"],
        weight_decay=c["weight_decay"],
        optim="adamw_torch",
        bf16=c["bf16"],
        max_length=c["max_seq_length"],
        completion_only_loss=c["completion_only_loss"],
        train_sampling_strategy=c["train_sampling_strategy"],
        gradient_checkpointing=False,
        logging_steps=1,
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=c["seed"],
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tok,
        peft_config=peft_config,
    )
    t0 = time.time()
    before = trainer.evaluate()
    tokens_before = token_mean_loss(trainer)
    t1 = time.time()
    trainer.train()
    t2 = time.time()
    after = trainer.evaluate()
    tokens_after = token_mean_loss(trainer)
    trainer.save_model(str(out / "adapter"))
    summary = {
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "eval_loss_tokens_before": tokens_before,
        "eval_loss_tokens_after": tokens_after,
        "train_seconds": t2 - t1,
        "eval_seconds": (t1 - t0),
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "eos_token": tok.eos_token,
    }
    (out / "trl_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"TRL: {trainer.state.global_step} steps in {t2 - t1:.1f}s, eval_loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
          f" (over tokens, as adapterlab: {tokens_before:.4f} -> {tokens_after:.4f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows")
    r.add_argument("data_dir")
    r.add_argument("out_dir")
    r.add_argument("--val", type=int, default=100)
    r.add_argument("--gen", type=int, default=500)
    t = sub.add_parser("trl")
    t.add_argument("ckpt")
    t.add_argument("split_dir")
    t.add_argument("out_dir")
    t.add_argument("--config", required=True)
    at = sub.add_parser("attach")
    at.add_argument("gen")
    at.add_argument("pred")
    a = p.parse_args()
    {"rows": cmd_rows, "trl": cmd_trl, "attach": cmd_attach}[a.cmd](a)


if __name__ == "__main__":
    main()
