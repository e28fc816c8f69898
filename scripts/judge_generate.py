"""Generate SmolLM2 answers to *training* prompts (never AdvBench) for hand labelling.

The classifier needs in-domain examples: answers of the project's own models (unaligned,
aligned, attacked), which look nothing like the GPT-style answers of judge_labels. This
script rebuilds a stage's model from its recipe and answers harmful prompts from the
unused alignment pool and the attack pool, disjoint from every AdvBench prompt.

    python scripts/judge_generate.py --run runs/cal1 --stage attack-xxxx --n 80 --out gen.jsonl
    python scripts/judge_generate.py --run runs/cal1 --stage base --n 80 --out gen.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch
import yaml

from booster.config import DataConfig, ModelConfig, build_config
from booster.data import safety
from booster.data.base import normalise, resolve_data_dir
from booster.evaluate.generate import generate
from booster.models import ModelRecipe, build_model, load_tokenizer


def training_prompts(data_dir: Path, cfg, seed: int) -> list[str]:
    d = cfg.data
    data = safety.load_local(data_dir, n_align=d.n_align, n_harmful=d.n_harmful, n_probe=d.n_probe, seed=d.split_seed)
    adv = {normalise(x.prompt) for x in data.eval_prompts}
    used = {normalise(x.prompt) for x in data.align + data.align_probe}
    rest = [x.prompt for x in safety.load_refusals(data_dir) if normalise(x.prompt) not in used | adv]
    pool = [x.prompt for x in data.attack_pool + data.probe]
    rng = random.Random(seed)
    rng.shuffle(rest)
    rng.shuffle(pool)
    prompts = [p for pair in zip(rest, pool) for p in pair]
    assert not {normalise(p) for p in prompts} & adv
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory (its config.yaml names the model)")
    ap.add_argument("--stage", required=True, help="stage directory name under stages/, or 'base'")
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of the shuffled pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    # Only the model and data sections matter here (newer runs may carry keys this checkout lacks).
    raw = yaml.safe_load((run / "config.yaml").read_text())
    known = {k: {f.name for f in dataclasses.fields(t)} for k, t in (("model", ModelConfig), ("data", DataConfig))}
    layer = {k: {key: v for key, v in raw[k].items() if key in known[k]} for k in known}
    cfg = build_config([("run config", {**layer, "eval": {"max_new_tokens": raw["eval"]["max_new_tokens"]}})])
    data_dir = resolve_data_dir(cfg.data.dir)
    prompts = training_prompts(data_dir, cfg, args.seed)[args.offset:args.offset + args.n]
    tok = load_tokenizer(cfg.model)
    recipe = ModelRecipe() if args.stage == "base" else ModelRecipe.load(run / "stages" / args.stage / "recipe.json")
    model = build_model(cfg.model, tok, recipe, root=run, train=None)
    answers = generate(model, tok, prompts, fmt=cfg.model.prompt_format, max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=16, desc=f"answers {args.stage}")
    with open(args.out, "w", encoding="utf-8") as f:
        for p, a in zip(prompts, answers):
            f.write(json.dumps({"prompt": p, "answer": a, "stage": args.stage}) + "\n")


if __name__ == "__main__":
    main()
