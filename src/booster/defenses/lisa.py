"""Lisa (Huang et al., NeurIPS 2024): lazy safety alignment at fine-tuning time.

Bi-state optimisation: cycles of A steps on alignment data, then F steps on the user's
data, each step with a proximal term that ties the weights to the switching point:

    alignment state:   min_w  f(w) + (ρ/2)·‖w − w_switch‖²
    fine-tuning state: min_w  g(w) + (ρ/2)·‖w − w_switch‖²

w_switch is the weight at the most recent switch between states (the last iterate of the
other state), as in the official code (its README swaps the two anchors). As in the
official code, the proximal term is off during the first ``lisa.proximal_warmup`` (10%) of
the steps, and the user's batch of an alignment step is skipped, so the user's data gets
F/(A+F) of the steps. Hyperparameters: ρ = ``lisa.rho`` (Booster paper's comparison 0.01;
Lisa paper 1), A = ``lisa.align_steps`` (100), F = ``lisa.finetune_steps`` (900).

Cost: 1 forward/backward pass per step plus an O(#trainable) proximal gradient. Extra
memory: one copy of the trainable weights (the anchor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from booster.checks import check
from booster.defenses.base import Batch, Defense, StepContext, accumulate


@dataclass
class LisaConfig:
    rho: float = 0.01
    """Weight of the proximal term (rho/2)*||w - w_switch||^2 (Booster paper's comparison: 0.01;
    Lisa paper: 1)."""
    align_steps: int = 100
    """Steps on alignment data per cycle (paper: 100)."""
    finetune_steps: int = 900
    """Steps on the user's data per cycle (paper: 900)."""
    proximal_warmup: float = 0.1
    """Fraction of the steps before the proximal term switches on (the official code's 10%)."""

    def __post_init__(self) -> None:
        check(self.rho >= 0, f"lisa.rho must be >= 0, got {self.rho}")
        check(self.align_steps >= 0, f"lisa.align_steps must be >= 0, got {self.align_steps}")
        check(self.finetune_steps >= 1, f"lisa.finetune_steps must be >= 1, got {self.finetune_steps}")
        check(0 <= self.proximal_warmup <= 1, f"lisa.proximal_warmup must be in [0, 1], got {self.proximal_warmup}")


class Lisa(Defense):
    name = "lisa"
    stages = ("attack",)
    passes = 1
    config_sections = {"lisa": LisaConfig}
    streams = ("main", "align")

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        cfg = stage_cfg.lisa
        self.rho, self.a, self.f = cfg.rho, cfg.align_steps, cfg.finetune_steps
        self.warmup = cfg.proximal_warmup
        self._anchor: list[torch.Tensor] = []

    @classmethod
    def length_problem(cls, stage_cfg, steps: int) -> str | None:
        if steps and steps <= stage_cfg.lisa.align_steps:
            return (f"attack.lisa.align_steps={stage_cfg.lisa.align_steps} leaves none of the {steps} attack steps "
                    "to the user's data; scale lisa.align_steps and lisa.finetune_steps to the attack (e.g. 10% / 90%)")
        return None

    def setup(self, ctx: StepContext) -> None:
        problem = self.length_problem(self.stage_cfg, ctx.total_steps)
        if problem:
            raise ValueError(problem)
        self._anchor = [p.detach().clone() for p in ctx.params]

    def phase(self, step: int) -> str:
        return "align" if step % (self.a + self.f) < self.a else "main"

    def streams_at(self, step: int) -> tuple[str, ...]:
        return (self.phase(step),)

    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        phase = self.phase(ctx.step)
        if ctx.step > 0 and phase != self.phase(ctx.step - 1):
            with torch.no_grad():
                for a, p in zip(self._anchor, ctx.params):
                    a.copy_(p)
        loss = accumulate(ctx, batches[phase])
        proximal = 0.0
        if self.rho > 0 and ctx.step >= self.warmup * ctx.total_steps:
            with torch.no_grad():
                for p, a in zip(ctx.params, self._anchor):
                    diff = p - a
                    proximal += 0.5 * self.rho * diff.float().pow(2).sum().item()
                    p.grad = diff.mul_(self.rho) if p.grad is None else p.grad.add_(diff, alpha=self.rho)
        return {"loss": loss, "alignment_phase": float(phase == "align"), "proximal": proximal}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"anchor.{i}": a for i, a in enumerate(self._anchor)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, a in enumerate(self._anchor):
            if f"anchor.{i}" in state:
                a.copy_(state[f"anchor.{i}"])
