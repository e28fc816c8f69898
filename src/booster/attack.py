"""The simulated harmful fine-tuning attack: the user's data with a fraction p of harmful pairs.

The fine-tuning set has n samples; round(p·n) of them are harmful pairs drawn from the
attacker's pool (disjoint from the alignment, probe and evaluation sets), the rest are task
samples. For a benign control (attack.mix=TASK) the mixed-in samples come from another
task's pool instead: same mixing, benign content. The attack itself is an ordinary run of
the training loop on that set.
"""

from __future__ import annotations

import random

from booster.data.base import DataError, Example


def poisoned_set(task_pool: list[Example], harmful_pool: list[Example], *, n: int, p: float, seed: int) -> list[Example]:
    """n fine-tuning samples, round(p·n) of them harmful, shuffled together."""
    n_harmful = round(n * p)
    n_task = n - n_harmful
    if n_task > len(task_pool):
        raise DataError(f"attack.n={n} needs {n_task} task samples but the task pool has {len(task_pool)}; "
                        "lower attack.n")
    if n_harmful > len(harmful_pool):
        raise DataError(f"attack.n·p = {n_harmful} mixed-in samples but their pool (attack.mix) has {len(harmful_pool)}; "
                        "lower attack.p or attack.n, or data.n_harmful / data.n_probe to leave more")
    rng = random.Random(seed)
    mix = rng.sample(task_pool, n_task) + rng.sample(harmful_pool, n_harmful)
    rng.shuffle(mix)
    return mix
