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
i.e. under the judge the run directory was last reported with (`booster report DIR --judge`).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from booster.evaluate.stage import read_generations
from booster.io import read_json
from booster.results import column, read_rows, selected
from booster.stats import detectable_difference, prompt_detectable_difference, seed_prompt_interval, seed_t_interval


def verdicts(eval_dir: Path) -> tuple[list[str], list[bool], str]:
    """Prompts, the judge's verdict per prompt, and the judge's version, for one evaluation."""
    metrics = read_json(eval_dir / "metrics.json")
    judge = metrics["judge"]
    prompts = [g["prompt"] for g in read_generations(eval_dir) if g["kind"] == "harmful"]
    flags = [p > judge["threshold"] for p in metrics["harm_probs"]]
    if len(flags) != len(prompts):
        raise SystemExit(f"{eval_dir}: {len(flags)} verdicts for {len(prompts)} answers; rerun `booster report`")
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


def collect(run_dirs: list[Path], where: list[list[str]]) -> dict[tuple[str, str, int], Path]:
    """{(defence, setting, seed): evaluation directory} over the run directories' result rows."""
    found: dict[tuple[str, str, int], Path] = {}
    for run_dir in run_dirs:
        for row in read_rows(run_dir):
            if not selected(row, run_dir, where):
                continue
            key, eval_dir = (row["defense"], column(row), row["seed"]), run_dir / row["eval_dir"]
            if key in found and found[key].resolve() != eval_dir.resolve():
                raise SystemExit(f"two evaluations of {key[0]} at {key[1]}, seed {key[2]} ({found[key]}, "
                                 f"{eval_dir}): they differ in a setting; pick one with --where KEY=VALUE")
            found[key] = eval_dir
    return found


def table(found: dict[tuple[str, str, int], Path], a: str, b: str) -> str:
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
                raise SystemExit(f"{setting}, seed {seed}: the evaluations answered different prompts")
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
            detectable = f"{detectable_difference(per_seed):.1f}"
        else:
            spread, detectable = f"{per_seed[0]:+.0f}", f"{prompt_detectable_difference(by_seed[0]):.1f} (prompts only)"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--a", default="sft", help="the reference defence (default sft)")
    ap.add_argument("--b", default="booster", help="the defence compared with it (default booster)")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE a result row must have")
    args = ap.parse_args()
    found = collect(args.run_dirs, [x.split("=", 1) for x in args.where])
    print(table(found, args.a, args.b))


if __name__ == "__main__":
    main()
