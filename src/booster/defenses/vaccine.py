"""Vaccine (Huang et al., NeurIPS 2024): perturbation-aware alignment.

    min_w  max_{‖ε‖ ≤ ρ}  f(w; e_l + ε_l for every layer l)
    ε* = ρ · ∇_e f / ‖∇_e f‖            (first-order inner maximiser)

e_l is the output of layer l's self-attention block (before the residual add), which is
where the official code hooks; ‖·‖ is one L2 norm over all layers and the whole batch.
Pass 1 takes the gradient of f with respect to the e_l only (torch.autograd.grad: no
parameter gradients are formed); pass 2 adds ε to the e_l with forward hooks that return
a new output (no ``.data`` writes, no deprecated backward hooks, tuple outputs handled) and
back-propagates f into ``.grad``. With gradient accumulation the norm spans all
micro-batches, so the perturbation equals the large-batch one.

Hyperparameter: ρ = ``vaccine.rho`` (Booster paper's comparison: 5; Vaccine repository: 2).
Cost: 2 forward passes, 1 backward to the activations, 1 full backward (~2× SFT).
Extra memory: one tensor per layer of the attention output's size (batch × length × width).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from booster.checks import check
from booster.defenses.base import Batch, Defense, StepContext, all_reduce_sum


def attention_modules(model: Any) -> list[torch.nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not mods:
        raise ValueError("vaccine found no attention modules named '*.self_attn' in this model; "
                         "it supports Llama-style decoders (Llama, Qwen2, Gemma, Mistral, SmolLM)")
    return mods


@contextlib.contextmanager
def _hooks(modules: list[torch.nn.Module], hook: Any) -> Iterator[None]:
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


def perturbed_alignment(ctx: StepContext, micro_batches: list[Batch], rho: float) -> dict[str, float]:
    """Add the gradient of f under the worst-case attention-output perturbation into ``.grad``."""
    modules = attention_modules(ctx.model)
    k = len(micro_batches)
    grads: list[list[torch.Tensor]] = []
    clean = 0.0
    for mb in micro_batches:
        acts: list[torch.Tensor] = []

        def capture(i: int):
            def hook(module, inputs, output):
                acts.append(_first(output))
            return hook

        with ctx.accelerator.no_sync(ctx.model), _hooks(modules, capture):
            loss = ctx.loss(mb)
        grads.append([g.detach() for g in torch.autograd.grad(loss / k, acts)])
        clean += loss.item() / k
    sq = torch.stack([g.float().pow(2).sum() for gs in grads for g in gs]).sum()
    norm = all_reduce_sum(sq).sqrt().item()
    scale = rho / norm if norm > 0 else 0.0
    perturbed = 0.0
    for j, (mb, gs) in enumerate(zip(micro_batches, grads)):
        def add(i: int):
            def hook(module, inputs, output):
                return _replace_first(output, _first(output) + scale * gs[i].to(_first(output).dtype))
            return hook

        sync = contextlib.nullcontext() if j == k - 1 else ctx.accelerator.no_sync(ctx.model)
        with sync, _hooks(modules, add):
            loss = ctx.loss(mb)
            ctx.accelerator.backward(loss / k)
        perturbed += loss.item() / k
    return {"loss": perturbed, "loss_unperturbed": clean, "activation_grad_norm": norm}


@dataclass
class VaccineConfig:
    rho: float = 5.0
    """Radius of the worst-case perturbation of the attention outputs, one global L2 norm over
    all layers and the whole batch (Booster paper's comparison: 5; Vaccine repository: 2)."""

    def __post_init__(self) -> None:
        check(self.rho > 0, f"vaccine.rho must be > 0, got {self.rho}; it is the perturbation radius")


class Vaccine(Defense):
    name = "vaccine"
    stages = ("align",)
    passes = 2
    config_sections = {"vaccine": VaccineConfig}

    def __init__(self, stage_cfg) -> None:
        super().__init__(stage_cfg)
        self.rho = stage_cfg.vaccine.rho

    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        return perturbed_alignment(ctx, batches["main"], self.rho)
