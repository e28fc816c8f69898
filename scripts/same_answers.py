"""Do two runs give the same answers? Every evaluation stage, paired by the model it evaluated.

    python scripts/same_answers.py runs/demo-batch16 runs/demo-batch100

Pairs the finished ``eval-*`` stages of the two run directories (or of one, given twice or
alone) that evaluated the same upstream stage, and counts, per pair, the answers that are
identical (same kind, same prompt, same text). What it is for: checking that a change meant to
be exact (a batch size, an engine, a refactor) left every answer as it was. Exit status 1 when
any pair differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from booster.evaluate.stage import generations_path, read_generations
from booster.io import read_json
from booster.stages import is_done


def evaluations(root: Path) -> dict[str, list[Path]]:
    """upstream stage name -> the finished evaluations of it with their answers."""
    out: dict[str, list[Path]] = {}
    for d in sorted((root / "stages").glob("eval-*")):
        if is_done(d) and generations_path(d).is_file():
            out.setdefault(read_json(d / "config.json")["upstream"], []).append(d)
    return out


def answers(d: Path) -> dict[tuple, str]:
    return {(g.get("kind"), g.get("prompt")): g.get("answer") for g in read_generations(d)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="one or two run directories")
    args = ap.parse_args()
    found = [evaluations(r) for r in args.runs]
    print("| evaluated | A | B | answers | identical |\n|---|---|---|---|---|")
    differ = 0
    for up in sorted(set().union(*found)):
        stages = sorted({d for f in found for d in f.get(up, [])}, key=lambda d: (d.name, str(d)))
        for a, b in zip(stages, stages[1:]):
            x, y = answers(a), answers(b)
            same = sum(x[k] == y.get(k) for k in x)
            differ += same != len(x) or x.keys() != y.keys()
            print(f"| {up} | {a.name} | {b.name} | {len(x)} | {same} |")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
