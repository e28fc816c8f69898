"""Time a judge on real answers: every harmful-prompt generation under the given run
directories (eval stages' generations.jsonl), repeated up to --n answers.

    python scripts/judge_speed.py --judge classifier --path DIR --n 1000 runs/cal1 runs/cal2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from booster.evaluate.judges import make_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories with stages/eval-*/generations.jsonl")
    ap.add_argument("--judge", default="classifier")
    ap.add_argument("--path", help="judge weights (a built classifier directory)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = []
    for run in args.runs:
        for f in sorted(Path(run).glob("stages/eval-*/generations.jsonl")):
            pairs += [(r["prompt"], r["answer"]) for r in map(json.loads, f.open()) if r.get("kind") == "harmful"]
    if not pairs:
        raise SystemExit("no generations found; pass run directories with finished eval stages")
    distinct = len(pairs)
    pairs = (pairs * (args.n // len(pairs) + 1))[:args.n]
    judge = make_judge(args.judge, args.path)
    judge.probs(*map(list, zip(*pairs[:8])))  # load the model outside the timing
    started = time.time()
    probs = judge.probs([p for p, _ in pairs], [a for _, a in pairs])
    seconds = time.time() - started
    print(json.dumps({"judge": judge.describe(), "answers": len(pairs), "distinct": distinct, "threads": args.threads,
                      "seconds": round(seconds, 1), "answers_per_second": round(len(pairs) / seconds, 1),
                      "flagged": sum(p > judge.threshold for p in probs), "truncated": judge.last_truncated}, indent=2))


if __name__ == "__main__":
    main()
