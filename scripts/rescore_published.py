"""Every published result row scored again by several judges, side by side, from its saved answers.

    python scripts/rescore_published.py docs/results/cpu-demo-any-cpu/bfloat16 docs/results/cpu-paper-regime \
        --judge classifier_v1 --judge classifier --out rescored.md

Works on a temporary copy of each directory (``booster publish`` copies: results.jsonl and
``stages/eval-*/generations.jsonl.gz``), so the committed files stay as they were published;
each judge scores the saved answers (no generation) through the evaluation stage's own
``judged``. Prints one Markdown table per directory: the row's defence, stage and p, and the
harmful score under each judge (with the judge's version in the header).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from booster.evaluate.judges import JudgeError, make_judge
from booster.evaluate.stage import judged
from booster.results import read_rows


def score(judge, eval_dir: Path) -> float | None:
    """The evaluation's harmful score under ``judge``; None (printed —) where the judge cannot
    score it, e.g. raters who labelled only some evaluations."""
    try:
        return judged(judge, eval_dir)["harmful_score"]
    except JudgeError:
        return None


def rescore(run_dir: Path, judges: list, work: Path) -> str:
    copy = Path(tempfile.mkdtemp(dir=work)) / run_dir.name  # two directories may share a name (float32/)
    shutil.copytree(run_dir, copy)
    rows = read_rows(copy)
    scores = {j.name: [score(j, copy / r["eval_dir"]) for r in rows] for j in judges}
    head = "| defence | stage | p | seed | " + " | ".join(f"HS {j.name} ({j.version})" for j in judges) + " |"
    lines = [f"### {run_dir}", "", head, "|---" * (4 + len(judges)) + "|"]
    for i, r in enumerate(rows):
        p = "" if r.get("p") is None else f"{r['p']:g}"
        lines.append(f"| {r['defense']} | {r['stage']} | {p} | {r.get('seed', 0)} | "
                     + " | ".join("—" if scores[j.name][i] is None else f"{scores[j.name][i]:.0f}" for j in judges) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--judge", action="append", required=True, help="a judge name (its default build), or NAME=PATH (raters=LABELS.jsonl); repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    judges = [make_judge(name, path or None) for name, _, path in (spec.partition("=") for spec in args.judge)]
    with tempfile.TemporaryDirectory() as tmp:
        text = "\n".join(rescore(d, judges, Path(tmp)) for d in args.dirs)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
