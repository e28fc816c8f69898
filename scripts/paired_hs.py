"""Two defences' harmful scores compared prompt by prompt, over the seeds they share.

    python scripts/paired_hs.py runs/demo-bf16-seeds --a sft --b booster [--where KEY=VALUE ...]

Every evaluation answers the same held-out harmful prompts in the same order, so the answers of
defence A and defence B at one seed and one setting (aligned; attacked at each p) form pairs.
For each setting the table gives both scores per seed, the answers only A's model gets flagged
for and those only B's model gets flagged for (the discordant pairs: the rest are flagged by
both or by neither and say nothing about the difference), and:

- the difference B − A in harmful-score points (mean over seeds) with a 95% interval that
  covers seeds and prompts together: a bootstrap that draws seeds, then prompts within each
  drawn seed (``booster.stats.seed_prompt_interval``);
- the t interval over the per-seed differences (wider with few seeds: a bootstrap over 3
  seeds treats them as the whole population);
- the exact two-sided McNemar p-value on the pooled discordant pairs: it conditions on the
  trained models (is the difference between *these* models beyond the choice of prompts?),
  not on whether another seed would give it;
- the per-seed differences, mean ± std, and the smallest true difference a comparison of
  this many seeds would detect with 80% power at the 5% level (t-based, from the seed
  spread; with one seed, from the prompts alone, marked "prompts only").

Verdicts are read from each evaluation's metrics.json (harm_probs > the judge's threshold),
i.e. under the judge the run directory was last reported with (`booster report DIR --judge`);
with ``--judge NAME`` (repeatable; ``NAME=PATH`` for a judge that reads a file, e.g. the raters'
labels) the saved answers are judged again by each named judge on a temporary copy (the
directories stay as they are) and one table is printed per judge:

    python scripts/paired_hs.py docs/results/cpu-demo-3seeds --judge classifier_v1 --judge classifier \
        --judge raters=src/booster/judge_data/smollm2_demo_seeds_labels.jsonl

Two runs of one defence (exact Booster against Booster every 8 steps, in its own directory) are
compared by naming one directory's defence: ``--name DIR=NAME`` calls every defence of DIR's
rows NAME:

    python scripts/paired_hs.py docs/results/paper-regime docs/results/paper-regime-k8 \
        --name docs/results/paper-regime-k8=booster-k8 --a booster --b booster-k8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from booster.compare import collect, paired_table
from booster.data.base import DataError
from booster.evaluate.judges import JudgeError, make_judge
from booster.evaluate.stage import judged
from booster.io import rewrite_jsonl
from booster.results import read_rows


def rejudged(run_dirs: list[Path], spec: str, work: Path) -> list[Path]:
    """Copies of the run directories whose evaluations' metrics.json are the judge's of ``spec``
    (NAME, or NAME=PATH for a judge that reads a file: raters=LABELS.jsonl)."""
    name, _, path = spec.partition("=")
    judge = make_judge(name, path or None)
    copies = []
    for i, run_dir in enumerate(run_dirs):
        copy = work / f"{i}-{run_dir.name}"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint*"))
        kept, left = [], []
        for row in read_rows(copy):
            try:
                judged(judge, copy / row["eval_dir"])
                kept.append(row)
            except JudgeError as e:  # e.g. raters who labelled only the attacked models' answers
                left.append(f"{row['eval_dir']} ({e})")
        if left:  # never compared under another judge's verdicts: those rows leave the copy
            print(f"{run_dir}: {len(left)} evaluations not judged by {name}, left out: {'; '.join(left[:2])}"
                  + (" ..." if len(left) > 2 else ""))
            rewrite_jsonl(copy / "results.jsonl", kept)
        copies.append(copy)
    return copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--a", default="sft", help="the reference defence (default sft)")
    ap.add_argument("--b", default="booster", help="the defence compared with it (default booster)")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE a result row must have")
    ap.add_argument("--name", action="append", default=[],
                    help="DIR=NAME: call every defence of DIR's rows NAME (DIR one of run_dirs); repeatable")
    ap.add_argument("--judge", action="append", default=[],
                    help="judge the saved answers again with this judge, NAME or NAME=PATH (on a copy); repeatable")
    args = ap.parse_args()
    where = [x.split("=", 1) for x in args.where]
    names = {}
    for spec in args.name:
        d, _, name = spec.rpartition("=")
        at = [i for i, r in enumerate(args.run_dirs) if r.resolve() == Path(d).resolve()]
        if not at or not name:
            raise SystemExit(f"--name {spec}: give DIR=NAME with DIR one of the run directories")
        names[at[0]] = name
    try:
        if not args.judge:
            print(paired_table(collect(args.run_dirs, where, names), args.a, args.b))
        for name in args.judge:
            with tempfile.TemporaryDirectory() as tmp:
                copies = rejudged(args.run_dirs, name, Path(tmp))
                print(f"### judge {name}\n\n{paired_table(collect(copies, where, names), args.a, args.b)}")
    except (DataError, JudgeError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
