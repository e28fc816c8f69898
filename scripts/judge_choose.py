"""Choose among built classifier judges on held-out SmolLM2 answers they all held out.

    python scripts/judge_choose.py DIR_A DIR_B ... [--threads 2] [--out choose.json]

Each build holds out a different set of prompts (its split depends on what it trained on), so
the candidates are compared on the SmolLM2 rows (hand labels and the two-rater corpus) that are
on the held-out side of every build's ``split.jsonl``: no candidate has seen any of them.
``--baseline DIR`` adds a build that never trained on these rows (the first judge, built before
the corpus existed): it is scored on the same rows and can be chosen, so whether a new judge
replaces the old one is decided here too, not on the validation set. Each judge scores them at
its own threshold; the table gives accuracy, precision, recall and
F1 with Wilson 95% intervals, and the choice is the highest accuracy (ties: F1). The fresh
validation set is not read here: it is for the chosen judge's report only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from booster.evaluate import judge_data
from booster.evaluate.classifier import ClassifierJudge
from booster.evaluate.judge_metrics import binary_metrics, kind_of


def common_heldout(dirs: list[Path]) -> list[judge_data.Pair]:
    sides = []
    for d in dirs:
        _, test = judge_data.read_split(d / "split.jsonl")
        sides.append({(p.prompt, p.answer): p for p in test if kind_of(p.source) == "smollm2"})
    keys = set.intersection(*(set(s) for s in sides))
    return [sides[0][k] for k in sorted(keys)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--baseline", action="append", type=Path, default=[],
                    help="a build that never saw the corpus, scored on the same rows (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = common_heldout(args.dirs)
    if not rows:
        raise SystemExit("the builds share no held-out SmolLM2 answers; build them with the same seed and data")
    labels = [p.label for p in rows]
    print(f"{len(rows)} held-out SmolLM2 answers common to all {len(args.dirs)} builds ({sum(labels)} harmful)\n")
    print("| build | threshold | accuracy | precision | recall | F1 | fp | fn |\n|---|---|---|---|---|---|---|---|")
    results = {}
    for d in args.dirs + args.baseline:
        judge = ClassifierJudge(str(d))
        m = binary_metrics(labels, judge.probs([p.prompt for p in rows], [p.answer for p in rows]), judge.threshold)
        results[str(d)] = {"version": judge.version, "threshold": judge.threshold, "metrics": m,
                           "settings": judge.meta["settings"]}
        ci = m["ci95"]
        print(f"| {d.name} | {judge.threshold} | {m['accuracy']:.3f} [{ci['accuracy'][0]:.2f}, {ci['accuracy'][1]:.2f}] | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['confusion']['fp']} | {m['confusion']['fn']} |")
    best = max(results, key=lambda k: (results[k]["metrics"]["accuracy"], results[k]["metrics"]["f1"]))
    print(f"\nchosen: {best}")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": len(rows), "positives": sum(labels), "builds": results,
                                              "chosen": best}, indent=1))


if __name__ == "__main__":
    main()
