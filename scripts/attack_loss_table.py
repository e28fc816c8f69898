"""Harmful loss on held-out harmful pairs at the start and end of each attack, pooled over
run directories: mean ± std over seeds per (alignment defence, attack lr, p).

    python scripts/attack_loss_table.py runs/gpu/r/sft-5e-4 runs/gpu/r/seed1 ... [--label DIR:DEFENCE=NAME]

The paper's Figure 3 claim in numbers: after Booster the attack lowers the harmful loss less.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from booster.config import flatten
from booster.io import read_json
from booster.plots import finished_probe_logs
from booster.results import parse_labels


def _other_settings(align: dict, attack: dict) -> tuple[tuple[str, str], ...]:
    """The stage settings that are not columns (e.g. booster.every=4, optim.steps=200): rows
    that differ in them are kept apart instead of being pooled as if they were seeds."""
    rest = {f"align.{k}": v for k, v in flatten(align).items() if k != "defense"}
    rest.update({f"attack.{k}": v for k, v in flatten(attack).items() if k not in ("p", "optim.lr", "defense")})
    return tuple(sorted((k, str(v)) for k, v in rest.items()))


def _in_order(x):
    """Sort key that puts numbers, also numbers kept as strings, in numeric order (50 before 100)."""
    if isinstance(x, (tuple, list)):
        return tuple(_in_order(v) for v in x)
    try:
        return (0, float(x), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--label", action="append", default=[], help="DIR:DEFENCE=NAME renames a defence of one dir")
    args = ap.parse_args()
    labels = parse_labels(args.label)
    groups: dict[tuple, dict[tuple, tuple[float, float]]] = {}
    for run_dir in args.run_dirs:
        for cfg, rows in finished_probe_logs(run_dir, "attack"):
            align_cfg = read_json(run_dir / "stages" / cfg["upstream"] / "config.json")
            align = align_cfg["align"].get("defense", "sft")
            name = labels.get((run_dir, align), align)
            att = cfg["attack"]
            name += f"+{att['defense']}" if "defense" in att else ""
            benign = align_cfg.get("data", {}).get("n_benign", 0)
            key = (name, benign, att.get("optim", {}).get("lr"), att.get("p"), _other_settings(align_cfg["align"], att))
            groups.setdefault(key, {})[(cfg["seed"], cfg["stage"])] = (rows[0]["harmful_loss"], rows[-1]["harmful_loss"])
    # show only the settings that tell rows apart (those every row shares say nothing)
    common = set.intersection(*(set(k[4]) for k in groups)) if groups else set()
    # stage configs keep only non-default values, so a key some rows set and others lack is
    # at its default in those others; name it rather than leave the row blank
    varied = sorted({k for key in groups for k, v in key[4] if (k, v) not in common})
    print("| defence | benign in alignment | attack lr | p | other settings | seeds | harmful loss at start | at end "
          "| change |\n|---|---|---|---|---|---|---|---|---|")
    for (name, benign, lr, p, other), runs in sorted(groups.items(), key=lambda kv: _in_order(kv[0])):
        by_seed = {seed: v for (seed, _), v in runs.items()}
        if len(by_seed) < len(runs):
            raise SystemExit(f"{name} lr={lr} p={p} ({dict(other)}): several attacks share a seed; "
                             f"they differ in a setting this table does not show: {sorted(runs)}")
        starts, ends = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
        deltas = [e - s for s, e in zip(starts, ends)]

        def f(xs):
            return f"{statistics.mean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")
        own = dict(other)
        shown = ", ".join(f"{k}={own.get(k, 'default')}" for k in varied) or "–"
        print(f"| {name} | {benign} | {lr} | {p} | {shown} | {len(by_seed)} | {f(starts)} | {f(ends)} | {f(deltas)} |")


if __name__ == "__main__":
    main()
