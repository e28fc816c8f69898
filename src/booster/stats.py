"""Intervals and power for the difference between two defences' harmful scores.

A harmful score is the share of held-out prompts whose answer the judge flags, for one trained
model. Comparing defence A with defence B at one setting gives, for each seed s (its own
alignment and attack), the verdicts of both models on the same prompts: pairs (a_si, b_si).
The difference B − A varies for two reasons, and a claim about defences has to cover both:

- which prompts were asked (a finite sample of harmful requests), and
- which seed was trained (data order, initialisation: SFT after the demo's attack scored 28, 11
  and 12 at three seeds).

``seed_prompt_interval`` resamples seeds, then prompts within each drawn seed (keeping each
prompt's pair together), so its interval holds both. With few seeds a bootstrap over seeds is
too narrow (it treats 3 seeds as the whole population), so ``seed_t_interval`` gives the
classical interval over the per-seed differences (t with S − 1 degrees of freedom; each
seed's difference carries its own prompt noise), and ``detectable_difference`` the smallest
true difference a new comparison of the same size would find with 80% power at the 5% level:
(t_{1−α/2} + t_{power}) · SE, the usual approximation. With one seed only prompt variation can
be measured: ``prompt_detectable_difference`` says so in its name.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

Pairs = Sequence[Sequence[tuple[bool, bool]]]
"""pairs[s][i]: (A flagged, B flagged) on prompt i at seed s."""


def per_seed_differences(pairs: Pairs) -> list[float]:
    """B − A in harmful-score points, one value per seed."""
    return [100.0 * sum(int(b) - int(a) for a, b in seed) / len(seed) for seed in pairs]


def seed_prompt_interval(pairs: Pairs, *, reps: int = 4000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, low, high) in points: a percentile bootstrap that draws seeds with
    replacement, then prompts with replacement within each drawn seed."""
    if not pairs or any(len(s) == 0 for s in pairs):
        raise ValueError("seed_prompt_interval needs at least one seed with at least one prompt")
    rng = np.random.default_rng(seed)
    d = [np.array([int(b) - int(a) for a, b in s], dtype=np.float64) for s in pairs]
    n_seeds = len(d)
    drawn = rng.integers(n_seeds, size=(reps, n_seeds))
    values = np.empty((reps, n_seeds))
    for s, ds in enumerate(d):
        mask = drawn == s
        k = int(mask.sum())
        if k:
            values[mask] = ds[rng.integers(len(ds), size=(k, len(ds)))].mean(axis=1)
    means = 100.0 * values.mean(axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return statistics.mean(per_seed_differences(pairs)), float(lo), float(hi)


def _t(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def seed_t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high) of per-seed differences by the t interval; None with fewer than 2 seeds."""
    if len(differences) < 2:
        return None
    mean = statistics.mean(differences)
    half = _t(1 - (1 - level) / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def detectable_difference(differences: Sequence[float], *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true difference (points) that a comparison with this many seeds and this
    seed-to-seed spread detects with ``power`` at two-sided level ``alpha``; None with < 2 seeds or no spread."""
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return None  # no spread measured: nothing to size a test by
    df = len(differences) - 1
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    return (_t(1 - alpha / 2, df) + _t(power, df)) * se


def prompt_detectable_difference(pairs: Sequence[tuple[bool, bool]], *, alpha: float = 0.05,
                                 power: float = 0.8) -> float | None:
    """The same for one seed, from the paired prompts alone (normal approximation): it leaves
    out the seed-to-seed spread, so it understates what another seed could show."""
    n = len(pairs)
    d = [int(b) - int(a) for a, b in pairs]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    if var == 0:
        return None  # no discordant pair: the prompts show no variation to size a test by
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return 100.0 * z * math.sqrt(var / n)
