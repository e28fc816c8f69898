"""Harmful loss on held-out harmful pairs at the start and end of each attack, pooled over
run directories: mean ± std over seeds per (alignment defence, attack lr, p).

    python scripts/attack_loss_table.py runs/gpu/r/sft-5e-4 runs/gpu/r/seed1 ... [--label DIR:DEFENCE=NAME]

The paper's Figure 3 claim in numbers: after Booster the attack lowers the harmful loss less.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from booster.io import read_json, read_jsonl
from pool_runs import parse_labels  # the sibling script (scripts/ is on sys.path when run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--label", action="append", default=[], help="DIR:DEFENCE=NAME renames a defence of one dir")
    args = ap.parse_args()
    labels = parse_labels(args.label)
    groups: dict[tuple, dict[tuple, tuple[float, float]]] = {}
    for run_dir in args.run_dirs:
        for d in sorted((run_dir / "stages").glob("attack-*")):
            if not (d / "DONE.json").is_file():
                continue
            cfg = read_json(d / "config.json")
            align_cfg = read_json(run_dir / "stages" / cfg["upstream"] / "config.json")
            align = align_cfg["align"].get("defense", "sft")
            name = labels.get((run_dir, align), align)
            att = cfg["attack"]
            name += f"+{att['defense']}" if "defense" in att else ""
            rows = read_jsonl(d / "probe_log.jsonl")
            benign = align_cfg.get("data", {}).get("n_benign", 0)
            key = (name, benign, att.get("optim", {}).get("lr"), att.get("p"))
            groups.setdefault(key, {})[(cfg["seed"], d.name)] = (rows[0]["harmful_loss"], rows[-1]["harmful_loss"])
    print("| defence | benign in alignment | attack lr | p | seeds | harmful loss at start | at end | change |\n"
          "|---|---|---|---|---|---|---|---|")
    for (name, benign, lr, p), runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        by_seed = {seed: v for (seed, _), v in runs.items()}
        starts, ends = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
        deltas = [e - s for s, e in zip(starts, ends)]

        def f(xs):
            return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")
        print(f"| {name} | {benign} | {lr} | {p} | {len(by_seed)} | {f(starts)} | {f(ends)} | {f(deltas)} |")


if __name__ == "__main__":
    main()
