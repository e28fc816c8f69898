"""Pool the rows of several run directories into one table: mean ± std over seeds.

    python scripts/pool_runs.py runs/gpu/r/sft-5e-4 runs/gpu/r/seed1 ... \
        --where attack.optim.lr=0.0005 --where data.n_benign=400 --label runs/gpu/r/b1-5e-4:booster="booster a=1"

Rows come from each directory's results.jsonl (after `booster report DIR --judge ...`, the
rescored values). A row lacking a --where key is judged by its sweep's base config; aligned
models are filtered on the keys they carry only (attack settings do not apply to them).
--label DIR:DEFENCE=NAME renames one defence of one directory (runs whose base configs
differ outside the grid, e.g. align.booster.alpha). --empty adds the share of empty answers
to harmful prompts per column (harmless by silence).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from booster.results import column, parse_labels, read_rows, selected


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE a row must have")
    ap.add_argument("--label", action="append", default=[], help="DIR:DEFENCE=NAME renames a defence of one dir")
    ap.add_argument("--empty", action="store_true",
                    help="also the share of empty answers to harmful prompts (older rows: from their saved answers)")
    args = ap.parse_args()
    metrics = {"HS": "harmful_score", "FA": "accuracy"} | ({"empty": "empty_rate"} if args.empty else {})
    labels = parse_labels(args.label)
    where = [x.split("=", 1) for x in args.where]
    cells: dict[tuple, dict[str, dict]] = {}
    for run_dir in args.run_dirs:
        for row in read_rows(run_dir):
            if not selected(row, run_dir, where):
                continue
            align, _, attack = row["defense"].partition("+")
            name = labels.get((run_dir, align), align) + (f"+{attack}" if attack else "")
            col = column(row)
            # one value per evaluated model: the same eval dir seen from two sweeps counts once
            cells.setdefault((name,), {}).setdefault(col, {})[(str(run_dir), row["eval_dir"])] = row
    cols = sorted({c for v in cells.values() for c in v}, key=lambda c: (c != "aligned", c))
    head = ["defence", "seeds"] + [f"{c} {m}" for c in cols for m in metrics]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for (name,), by_col in sorted(cells.items()):
        seeds = max(len({r["seed"] for r in v.values()}) for v in by_col.values())
        out = [name, str(seeds)]
        for c in cols:
            rows = list(by_col.get(c, {}).values())
            uniq = {r["seed"]: r for r in rows}.values()  # seed-unique (shared controls)
            for key in metrics.values():
                values = [r.get(key) for r in uniq]
                out.append(_fmt(values) if rows and None not in values else "–")
        print("| " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
