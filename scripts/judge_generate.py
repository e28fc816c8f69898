"""Generate SmolLM2 answers to *training* prompts (never AdvBench) for hand labelling.

The classifier needs in-domain examples: answers of the project's own models (unaligned,
aligned, attacked), which look nothing like the GPT-style answers of judge_labels. This
script rebuilds a stage's model from its recipe and answers harmful prompts from the
unused alignment pool and the attack pool, disjoint from every AdvBench prompt.

    python scripts/judge_generate.py --run runs/cal1 --stage attack-xxxx --n 80 --out gen.jsonl
    python scripts/judge_generate.py --run runs/cal1 --stage base --n 80 --out gen.jsonl

For the labelled corpus (issue 37): ``--stage all`` answers with the base model and every
finished alignment and attack of the run, each on its own slice of the shuffled pool (stage i
takes prompts [offset + i·n, offset + (i+1)·n)), every row naming the model kind it came from
(``kind``: unaligned, or the defence and for attacks p and lr). ``--blind DIR`` then also
writes what raters see: ``DIR/blind.jsonl`` (id, prompt, answer; shuffled, no model or stage)
and ``DIR/key.jsonl`` (id -> the full row), so labels are given blind and joined afterwards.

    python scripts/judge_generate.py --run runs/demo --stage all --n 40 --out corpus.jsonl --blind corpus/

The pool (~820 prompts) is smaller than a 2,000-answer corpus: slices wrap around it, so a
prompt is answered by several models (the classifier's split is by prompt, so no prompt is
on both sides). ``--skip FILE`` leaves out the stages an earlier corpus file already answered
(a second part, once more models have finished; give it ``--offset`` = the rows made so far).
``--merge FILE ...`` makes one blind set from several corpus files without generating (an
answer two models gave to the same prompt is kept once, with the first file's provenance);
``--evals`` takes the answers the evaluation stages already gave to AdvBench prompts
(``--n`` per stage, the fresh validation set) instead of generating new ones.

    python scripts/judge_generate.py --run runs/b --stage all --skip part1.jsonl --offset 880 --out part2.jsonl
    python scripts/judge_generate.py --merge part1.jsonl part2.jsonl --blind corpus/
    python scripts/judge_generate.py --run runs/b --evals --n 15 --out valid.jsonl --blind valid/
    python scripts/judge_generate.py --run runs/b --evals --n 0 --where stage=attacked --where seed=1 --out s1.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch
import yaml

from booster.config import AttackConfig, DataConfig, ModelConfig, build_config
from booster.data import safety
from booster.data.base import normalise, resolve_data_dir
from booster.evaluate.generate import generate
from booster.evaluate.stage import read_generations
from booster.models import ModelRecipe, build_model, load_tokenizer
from booster.results import read_rows as result_rows
from booster.results import selected


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


def stage_kind(run: Path, stage: str) -> str:
    """What kind of model a stage holds, for the corpus: unaligned, the alignment defence, or the
    attack's p and lr on top of the defence it started from."""
    if stage == "base" or stage.startswith("base-"):  # evaluation stages name the base by its hash
        return "unaligned"
    cfg = json.loads((run / "stages" / stage / "config.json").read_text())
    if stage.startswith("align"):
        return cfg.get("align", {}).get("defense", "sft")
    upstream = stage_kind(run, cfg["upstream"]) if (run / "stages" / cfg["upstream"]).is_dir() else cfg["upstream"]
    attack, default = cfg.get("attack", {}), AttackConfig()  # a stage's config.json omits defaults
    return (f"{upstream}+attack(p={attack.get('p', default.p)},"
            f"lr={attack.get('optim', {}).get('lr', default.optim.lr)})")


def finished_stages(run: Path) -> list[str]:
    return ["base"] + sorted(d.name for d in (run / "stages").iterdir()
                             if d.name.split("-")[0] in ("align", "attack") and (d / "DONE.json").is_file())


def eval_rows(run: Path, n: int, seed: int, skip: set, only: set[str] | None = None) -> list[dict]:
    """n harmful answers of each evaluation stage (AdvBench prompts, already generated), drawn at
    random (n <= 0: all of them), every row naming the model kind of the stage that was
    evaluated; ``only``: the evaluation stages' names to take (default every finished one)."""
    rows = []
    for d in sorted((run / "stages").glob("eval-*")):
        if not (d / "DONE.json").is_file() or (only is not None and d.name not in only):
            continue
        upstream = json.loads((d / "config.json").read_text())["upstream"]
        if (str(run), upstream) in skip:
            continue
        answers = [r for r in read_generations(d) if r.get("kind") == "harmful"]
        for r in answers if n <= 0 else random.Random(f"{seed}-{d.name}").sample(answers, min(n, len(answers))):
            rows.append({"prompt": r["prompt"], "answer": r["answer"], "stage": upstream,
                         "kind": stage_kind(run, upstream), "run": str(run), "eval": d.name})
    return rows


def read_rows(paths) -> list[dict]:
    return [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()]


def write_blind(rows: list[dict], out: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    with open(out / "blind.jsonl", "w", encoding="utf-8") as blind, open(out / "key.jsonl", "w", encoding="utf-8") as key:
        for new_id, i in enumerate(order):
            blind.write(json.dumps({"id": new_id, "prompt": rows[i]["prompt"], "answer": rows[i]["answer"]}) + "\n")
            key.write(json.dumps({"id": new_id, **rows[i]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory (its config.yaml names the model)")
    ap.add_argument("--stage", help="stage directory name under stages/, 'base', or 'all'")
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of the shuffled pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="answers decoded together; larger is faster, and in bf16 may change some answers (still "
                         "the model's own: fine for a corpus)")
    ap.add_argument("--out", help="the corpus file to write (JSON lines)")
    ap.add_argument("--skip", nargs="*", default=[], help="corpus files whose (run, stage) pairs are left out")
    ap.add_argument("--evals", action="store_true",
                    help="sample the evaluation stages' AdvBench answers instead (--n 0: every answer)")
    ap.add_argument("--where", action="append", default=[],
                    help="with --evals: only the evaluations of result rows with KEY=VALUE (e.g. stage=attacked)")
    ap.add_argument("--merge", nargs="*", help="only merge these corpus files into --blind")
    ap.add_argument("--blind", help="also write DIR/blind.jsonl (shuffled, anonymous) and DIR/key.jsonl")
    args = ap.parse_args()
    if args.merge:
        if not args.blind:
            raise SystemExit("--merge writes a blind set: give --blind DIR")
        rows, seen = [], set()
        for row in read_rows(args.merge):  # one reading per (prompt, answer): two models may say the same
            if (row["prompt"], row["answer"]) not in seen:
                seen.add((row["prompt"], row["answer"]))
                rows.append(row)
        print(f"{len(rows)} answers to label ({len(seen)} distinct of the files' rows)")
        write_blind(rows, Path(args.blind), args.seed)
        return
    if not (args.run and args.out and (args.stage or args.evals)):
        raise SystemExit("give --run, --out and --stage (or --evals), or --merge FILE ... --blind DIR")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    skip = {(r["run"], r["stage"]) for r in read_rows(args.skip)}
    if args.evals:
        where = [x.split("=", 1) for x in args.where]
        only = {Path(r["eval_dir"]).name for r in result_rows(run) if selected(r, run, where)} if where else None
        rows = eval_rows(run, args.n, args.seed, skip, only)
    else:
        rows = answer_rows(run, args, skip)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if args.blind:
        write_blind(rows, Path(args.blind), args.seed)


def answer_rows(run: Path, args, skip: set) -> list[dict]:
    # Only the model and data sections matter here (newer runs may carry keys this checkout lacks).
    raw = yaml.safe_load((run / "config.yaml").read_text())
    known = {k: {f.name for f in dataclasses.fields(t)} for k, t in (("model", ModelConfig), ("data", DataConfig))}
    layer = {k: {key: v for key, v in raw[k].items() if key in known[k]} for k in known}
    cfg = build_config([("run config", {**layer, "eval": {"max_new_tokens": raw["eval"]["max_new_tokens"]}})])
    data_dir = resolve_data_dir(cfg.data.dir)
    pool = training_prompts(data_dir, cfg, args.seed)
    tok = load_tokenizer(cfg.model)
    stages = finished_stages(run) if args.stage == "all" else [args.stage]
    stages = [s for s in stages if (str(run), s) not in skip]
    if args.n > len(pool):
        raise SystemExit(f"the pool holds {len(pool)} training-side prompts; --n {args.n} is more: lower --n")
    rows = []
    for i, stage in enumerate(stages):
        start = args.offset + i * args.n
        prompts = [pool[(start + j) % len(pool)] for j in range(args.n)]  # wraps: see the docstring
        recipe = ModelRecipe() if stage == "base" else ModelRecipe.load(run / "stages" / stage / "recipe.json")
        model = build_model(cfg.model, tok, recipe, root=run, train=None)
        answers = generate(model, tok, prompts, fmt=cfg.model.prompt_format, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=args.batch_size, desc=f"answers {stage}")
        kind = stage_kind(run, stage)
        rows += [{"prompt": p, "answer": a, "stage": stage, "kind": kind, "run": str(run)}
                 for p, a in zip(prompts, answers)]
    return rows


if __name__ == "__main__":
    main()
