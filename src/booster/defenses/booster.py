"""Booster (Huang et al., ICLR 2025): attenuate the harmful perturbation during alignment.

Objective (Eq. 2):   min_w  f(w) + λ · ( h(w) − h(w − α · ∇h(w) / ‖∇h(w)‖) )
Update (Eq. 3, first order, the Hessian-vector term dropped as in MAML):

    g = ∇f(w) + λ · ( ∇h(w) − ∇h(w̃) ),    w̃ = w − α · ∇h(w) / ‖∇h(w)‖

f: loss on harmful prompt -> safe answer (alignment data); h: loss on harmful prompt ->
harmful answer (harmful data). ‖·‖ is the L2 norm over all trainable parameters together.
Hyperparameters: λ = ``booster.lam`` (paper 5; GSM8K 25 at batch 10), α = ``booster.alpha``
(paper 0.1). If ∇h(w) = 0 the perturbation is undefined; then w̃ = w and the regulariser's
gradient is exactly 0 (no division by zero).

Cost: 3 forward/backward passes per step (h at w, h at w̃, f at w). Memory: one extra copy
of the trainable weights, allocated once. It holds w during the perturbed pass, so that w is
restored bit-exactly afterwards (subtracting the perturbation again does not restore float
weights, least of all bf16), and then the regulariser's gradient R = λ(∇h(w) − ∇h(w̃)) during
the alignment pass; no gradient copy, no clones per step. During the perturbed pass ``.grad``
still holds λ·∇h(w), so the peak is one buffer plus one gradient above SFT's. With
``booster.low_memory`` the first gradient is dropped before the perturbed pass and recovered
afterwards from the perturbation actually applied, ∇h(w) = (w − w̃)/c with c = α/‖∇h(w)‖: the
peak is one buffer above SFT's. The recovered gradient is exact up to the rounding of w̃,
|error| ≤ ulp(w)/(2c) per entry, which is why only float32/float64 parameters take this path
(bf16 ones keep their gradient).

Amortised Booster (``booster.every = k > 1``, not in the paper): R is computed every k steps
and reused in between from the same buffer, so the mean cost is (k + 2)/k passes per step and
the extra memory stays one copy of the trainable weights. R goes stale as w moves: on the CPU
protocol (docs/results.md, section 6) k <= 8 kept exact Booster's attenuation of the attack's
harmful-loss drop, while at k = 32 the stale R drove the harmful loss up during alignment and
the attack walked it straight back down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from booster.checks import check
from booster.defenses.base import Batch, Defense, StepContext, accumulate, grad_norm


_RECOVERABLE = (torch.float32, torch.float64)


@dataclass
class BoosterConfig:
    lam: float = 5.0
    """lambda, weight of the harmful-perturbation regulariser (paper: 5; GSM8K 25 at batch 10)."""
    alpha: float = 0.1
    """Step length of the simulated harmful perturbation, in trainable-parameter space (paper: 0.1)."""
    every: int = 1
    """Recompute the regulariser's gradient every this many steps and reuse it in between
    (amortised Booster; 1 = exact Booster, the paper's algorithm)."""
    low_memory: bool = False
    """Drop the first harmful gradient during the perturbed pass and recover it from the
    perturbation applied (float32/float64 parameters): peak memory one weight copy above SFT
    instead of one copy plus one gradient, at the price of a rounding error <= ulp(w)/(2c)."""

    def __post_init__(self) -> None:
        check(self.lam >= 0, f"booster.lam must be >= 0, got {self.lam}")
        check(self.alpha > 0, f"booster.alpha must be > 0, got {self.alpha}; it is the perturbation's step length")
        check(self.every >= 1, f"booster.every must be >= 1, got {self.every}")


class Booster(Defense):
    name = "booster"
    stages = ("align",)
    passes = 3
    config_sections = {"booster": BoosterConfig}
    streams = ("main", "harmful")

    @classmethod
    def mean_passes(cls, stage_cfg: Any) -> float:
        k = getattr(stage_cfg.booster, "every", 1)
        return (k + 2) / k  # three passes at each refresh, one in between

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        self.lam = stage_cfg.booster.lam
        self.alpha = stage_cfg.booster.alpha
        self.every = getattr(stage_cfg.booster, "every", 1)
        self.low_memory = getattr(stage_cfg.booster, "low_memory", False)
        self._buffer: list[torch.Tensor] = []
        self._cached = False  # whether _buffer holds a reusable R (amortised mode)

    def setup(self, ctx: StepContext) -> None:
        self._buffer = [torch.empty_like(p) for p in ctx.params]

    def _refresh(self, step: int) -> bool:
        return self.every == 1 or step % self.every == 0 or not self._cached

    def streams_at(self, step: int) -> tuple[str, ...]:
        return self.streams if self._refresh(step) else ("main",)

    def regulariser(self, ctx: StepContext, harmful_batches: list[Batch]) -> dict[str, float]:
        """Leave R = λ(∇h(w) − ∇h(w̃)) in the buffer and ``.grad`` empty (it must be empty on
        entry); the weights end bit-identical to how they started."""
        params = ctx.params
        harmful = accumulate(ctx, harmful_batches)  # .grad = ∇h(w)
        norm = grad_norm(params)
        if not (norm > 0 and math.isfinite(norm)):
            for p, r in zip(params, self._buffer):
                r.zero_()
                p.grad = None
            return {"harmful_loss": harmful, "harmful_loss_perturbed": harmful,
                    "regulariser": 0.0, "harmful_grad_norm": norm}
        c = self.alpha / norm
        recovered = [self.low_memory and p.grad is not None and p.dtype in _RECOVERABLE for p in params]
        with torch.no_grad():
            for p, saved, rec in zip(params, self._buffer, recovered):
                saved.copy_(p)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-c)  # w -> w̃
                    if rec:
                        p.grad = None  # carried by w − w̃ until the perturbed pass is done
                    else:
                        p.grad.mul_(self.lam)  # .grad = λ∇h(w)
        # inside a caller's torch.autocast, the casts of w made by the first pass are cached and
        # would stand in for w̃ (and w̃'s for w after the restore): drop them at each change
        torch.clear_autocast_cache()
        perturbed = accumulate(ctx, harmful_batches, weight=-self.lam)  # .grad -= λ∇h(w̃)
        with torch.no_grad():
            for p, saved, rec in zip(params, self._buffer, recovered):
                if rec:
                    # w̃ − w: the perturbation as applied, ≈ −c·∇h(w) (exact when w̃ is within 2× of w)
                    p.sub_(saved)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(p, alpha=-self.lam / c)
                p.copy_(saved)  # exact restore of w
                if p.grad is None:
                    saved.zero_()
                else:
                    saved.copy_(p.grad)  # the buffer now holds R
                    p.grad = None
        torch.clear_autocast_cache()
        return {"harmful_loss": harmful, "harmful_loss_perturbed": perturbed,
                "regulariser": harmful - perturbed, "harmful_grad_norm": norm}

    def alignment(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        """Add ∇f into ``.grad``; a combination (Booster+Vaccine) replaces this part."""
        return {"loss": accumulate(ctx, batches["main"])}

    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        metrics = {}
        if self._refresh(ctx.step):
            metrics = self.regulariser(ctx, batches["harmful"])
            self._cached = True
        metrics = {**self.alignment(ctx, batches), **metrics}
        with torch.no_grad():
            for p, r in zip(ctx.params, self._buffer):
                p.grad = r.clone() if p.grad is None else p.grad.add_(r)
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.every == 1 or not self._cached:
            return {}
        return {f"R.{i}": r for i, r in enumerate(self._buffer)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            for i, r in enumerate(self._buffer):
                r.copy_(state[f"R.{i}"])
            self._cached = True
