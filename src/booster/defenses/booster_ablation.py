"""Booster without its last term: the ablation of the paper's rebuttal.

    min_w  f(w) + λ · h(w)        g = ∇f(w) + λ · ∇h(w)

Dropping −h(w − α·∇h/‖∇h‖) from Booster's objective leaves alignment plus *descent* on the
harmful loss: the model is trained to fit the harmful answers too. The rebuttal reports it
much worse than Booster (GSM8K: harmful score 74.1 vs 9.5), which shows the perturbation
term, not the extra harmful data, does the work. Hyperparameter: ``booster.lam`` (5).
Cost: 2 forward/backward passes per step; no extra memory.
"""

from __future__ import annotations

from booster.defenses.base import Batch, Defense, StepContext, accumulate
from booster.defenses.booster import BoosterConfig


class BoosterNoLastTerm(Defense):
    name = "booster_no_last_term"
    stages = ("align",)
    passes = 2
    config_sections = {"booster": BoosterConfig}
    streams = ("main", "harmful")

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        self.lam = stage_cfg.booster.lam

    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        harmful = accumulate(ctx, batches["harmful"], weight=self.lam)
        return {"loss": accumulate(ctx, batches["main"]), "harmful_loss": harmful}
