"""Answers per second of the evaluation's generation, on this machine.

    python benchmarks/generation_speed.py --model smollm2 --prompts 48 --max-new-tokens 64

Greedy answers to held-out harmful prompts (the evaluation's own workload), three ways in
one run: one prompt at a time (the reference implementation's way), batched in the given
order, and batched after sorting by length (what ``booster.evaluate.generate`` does; less
padding). All use the KV cache. The answers of the batched runs are checked equal to the
one-at-a-time answers (left padding must not change greedy output).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from booster.config import load_config
from booster.data import safety
from booster.data.base import resolve_data_dir
from booster.evaluate.generate import generate
from booster.models import ModelRecipe, build_model, load_tokenizer
from booster.text import format_prompt, pad_batch


def unsorted(model, tok, prompts, max_new, batch_size):
    """Batched in the given order: what generate() would do without its length sort."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok(format_prompt(tok, p, "chat"), add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        batch = pad_batch([{"input_ids": x} for x in ids], tok.pad_token_id, left=True)
        with torch.no_grad():
            res = model.generate(**batch, generation_config=gen)
        out += [t.strip() for t in tok.batch_decode(res[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"model.name={args.model}", f"model.dtype={args.dtype}"])
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, ModelRecipe(), Path("."), train=None)
    data = safety.load_local(resolve_data_dir(None), n_align=10, n_harmful=10, n_probe=10)
    prompts = [p.prompt for p in data.eval_prompts[:args.prompts]]

    results = {}
    t = time.perf_counter()
    one = [generate(model, tok, [p], fmt="chat", max_new_tokens=args.max_new_tokens, batch_size=1, desc="one")[0]
           for p in prompts]
    results["one at a time"] = time.perf_counter() - t
    t = time.perf_counter()
    plain = unsorted(model, tok, prompts, args.max_new_tokens, args.batch_size)
    results[f"batch {args.batch_size}, given order"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = generate(model, tok, prompts, fmt="chat", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results[f"batch {args.batch_size}, sorted by length"] = time.perf_counter() - t

    print(f"\n{args.model} {args.dtype}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads\n")
    print("| generation | seconds | answers/s | × one at a time |")
    print("|---|---|---|---|")
    for name, sec in results.items():
        print(f"| {name} | {sec:.1f} | {len(prompts) / sec:.2f} | {results['one at a time'] / sec:.2f} |")
    same = sum(a == b for a, b in zip(one, ours))
    print(f"\nbatched (sorted) answers equal to one-at-a-time answers: {same}/{len(prompts)}; "
          f"given-order batch: {sum(a == b for a, b in zip(one, plain))}/{len(prompts)}")


if __name__ == "__main__":
    main()
