"""Booster + Vaccine: both regularisers in one alignment step (the reference's perturb-aware Booster).

    g = ∇_w f(w; e + ε*)  +  λ · ( ∇h(w) − ∇h(w̃) ),   ε* = ρ·∇_e f/‖∇_e f‖,  w̃ = w − α·∇h/‖∇h‖

Booster's harmful-perturbation term with the alignment gradient taken Vaccine's way, under
the worst-case perturbation of the attention outputs. Hyperparameters: ``booster.lam``,
``booster.alpha`` (5, 0.1) and ``vaccine.rho`` (5). Cost: 4 forward/backward passes per
step (h at w, h at w̃, f clean to the activations, f perturbed). Extra memory: Booster's
weight copy plus Vaccine's per-layer activation perturbation.
"""

from __future__ import annotations

from booster.defenses.base import Batch, StepContext
from booster.defenses.booster import Booster, BoosterConfig
from booster.defenses.vaccine import VaccineConfig, perturbed_alignment


class BoosterVaccine(Booster):
    name = "booster_vaccine"
    passes = 4
    config_sections = {"booster": BoosterConfig, "vaccine": VaccineConfig}

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        self.rho = stage_cfg.vaccine.rho

    def alignment(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        return perturbed_alignment(ctx, batches["main"], self.rho)
