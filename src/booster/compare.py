"""Two defences compared prompt by prompt, over the seeds they share: the table behind
``scripts/paired_hs.py`` and the report's paired section.

Every evaluation of a run answers the same held-out harmful prompts in the same order, so the
answers of defence A and defence B at one seed and one setting form pairs. Per setting: both
scores per seed; the discordant pairs (answers only A's model, or only B's, gets flagged for);
B − A with a 95% interval over seeds and prompts together and the t interval over seeds
(``booster.stats``); the exact McNemar p on the pooled discordant pairs (conditional on these
trained models); the per-seed differences; and the smallest difference a comparison of this
many seeds detects with 80% power. Verdicts come from each evaluation's metrics.json
(harm_probs > the judge's threshold), i.e. the judge the run was last reported with.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from booster.data.base import DataError
from booster.evaluate.stage import read_generations, verdict_flags
from booster.io import read_json
from booster.results import column, read_rows, selected
from booster.stats import detectable_difference, prompt_detectable_difference, seed_prompt_interval, seed_t_interval


def verdicts(eval_dir: Path) -> tuple[list[str], list[bool], str]:
    """Prompts, the judge's verdict per prompt, and the judge's version, for one evaluation."""
    metrics = read_json(eval_dir / "metrics.json")
    judge = metrics["judge"]
    prompts = [g["prompt"] for g in read_generations(eval_dir) if g["kind"] == "harmful"]
    flags = verdict_flags(metrics)
    if len(flags) != len(prompts):
        raise DataError(f"{eval_dir}: {len(flags)} verdicts for {len(prompts)} answers; rerun `booster report`")
    return prompts, flags, f"{judge['name']} {judge.get('version', '')}".strip()


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the discordant pairs as a binomial(n, 1/2)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def collect(run_dirs: list[Path], where: list[list[str]],
            names: dict[int, str] | None = None) -> dict[tuple[str, str, int], Path]:
    """{(defence, setting, seed): evaluation directory} over the run directories' result rows;
    ``names[i]``, where given, is what every defence of run_dirs[i] is called (two directories
    of one defence, e.g. exact Booster and Booster every 8 steps, compared as two)."""
    found: dict[tuple[str, str, int], Path] = {}
    for i, run_dir in enumerate(run_dirs):
        rows = [row for row in read_rows(run_dir) if selected(row, run_dir, where)]
        for (defence, setting, seed), eval_dir in found_in_rows(run_dir, rows).items():
            _add(found, ((names or {}).get(i, defence), setting, seed), eval_dir)
    return found


def _add(found: dict[tuple[str, str, int], Path], key: tuple[str, str, int], eval_dir: Path) -> None:
    if key in found and found[key].resolve() != eval_dir.resolve():
        raise DataError(f"two evaluations of {key[0]} at {key[1]}, seed {key[2]} ({found[key]}, "
                        f"{eval_dir}): they differ in a setting; pick one with --where KEY=VALUE")
    found[key] = eval_dir


def paired_table(found: dict[tuple[str, str, int], Path], a: str, b: str) -> str:
    settings = sorted({s for d, s, _ in found if d in (a, b)}, key=lambda s: (s != "aligned", s))
    head = ["setting", "seeds", f"HS {a} per seed", f"HS {b} per seed", f"only {a} flagged", f"only {b} flagged",
            f"{b} − {a} [95% CI, seeds and prompts]", "[95% t over seeds]", "McNemar p",
            "per-seed difference, mean ± std", "detectable at 80% power"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    judges = set()
    for setting in settings:
        seeds = sorted({s for d, st, s in found if st == setting and d == a} &
                       {s for d, st, s in found if st == setting and d == b})
        if not seeds:
            continue
        by_seed: list[list[tuple[bool, bool]]] = []
        hs_a, hs_b, per_seed = [], [], []
        only_a = only_b = 0
        prompts: list[str] = []
        for seed in seeds:
            pa, fa, ja = verdicts(found[(a, setting, seed)])
            pb, fb, jb = verdicts(found[(b, setting, seed)])
            if pa != pb or (prompts and pa != prompts):
                raise DataError(f"{setting}, seed {seed}: the evaluations answered different prompts")
            prompts = pa
            judges |= {ja, jb}
            by_seed.append(list(zip(fa, fb)))
            hs_a.append(100.0 * sum(fa) / len(fa))
            hs_b.append(100.0 * sum(fb) / len(fb))
            per_seed.append(hs_b[-1] - hs_a[-1])
            only_a += sum(x and not y for x, y in zip(fa, fb))
            only_b += sum(y and not x for x, y in zip(fa, fb))
        mean, lo, hi = seed_prompt_interval(by_seed)
        t = seed_t_interval(per_seed)
        if len(per_seed) > 1:
            spread = f"{statistics.mean(per_seed):+.1f} ± {statistics.stdev(per_seed):.1f}"
            size = detectable_difference(per_seed)
            detectable = "–" if size is None else f"{size:.1f}"
        else:
            spread, size = f"{per_seed[0]:+.0f}", prompt_detectable_difference(by_seed[0])
            detectable = "–" if size is None else f"{size:.1f} (prompts only)"
        lines.append("| " + " | ".join([
            setting, str(len(seeds)), ", ".join(f"{v:.0f}" for v in hs_a), ", ".join(f"{v:.0f}" for v in hs_b),
            str(only_a), str(only_b), f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]",
            "–" if t is None else f"[{t[1]:+.1f}, {t[2]:+.1f}]", _p(mcnemar_p(only_a, only_b)), spread,
            detectable]) + " |")
    if len(judges) > 1:
        lines.append(f"\nWarning: the verdicts come from more than one judge build: {', '.join(sorted(judges))}")
    else:
        lines.append(f"\nJudge: {', '.join(judges) or 'none'}.")
    return "\n".join(lines)


def found_in_rows(root: Path, rows: list[dict[str, Any]], labels: tuple[str, ...] = ()) -> dict[tuple[str, str, int], Path]:
    """{(defence, setting, seed): evaluation directory} of one run's rows; the setting names the
    column (aligned, p=...) and the values of ``labels`` (other varied keys)."""
    found: dict[tuple[str, str, int], Path] = {}
    for row in rows:
        if row.get("stage") == "unaligned" or "seed" not in row:
            continue
        setting = ", ".join([column(row), *(f"{k}={row[k]}" for k in labels if k in row)])
        _add(found, (row["defense"], setting, row["seed"]), Path(root) / row["eval_dir"])
    return found
