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
from pathlib import Path

from booster.compare import collect, paired_table
from booster.data.base import DataError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--a", default="sft", help="the reference defence (default sft)")
    ap.add_argument("--b", default="booster", help="the defence compared with it (default booster)")
    ap.add_argument("--where", action="append", default=[], help="KEY=VALUE a result row must have")
    args = ap.parse_args()
    try:
        found = collect(args.run_dirs, [x.split("=", 1) for x in args.where])
        print(paired_table(found, args.a, args.b))
    except DataError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
