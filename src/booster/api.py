"""Booster in your own training loop: the defence the pipeline trains with, behind a plain call.

    from booster import BoosterStep

    step = BoosterStep(model, lam=5.0, alpha=0.1)         # once: allocates one weight copy
    for align_batch, harmful_batch in batches:
        metrics = step.backward(align_batch, harmful_batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)         # clipping, if you clip, comes after
        optimizer.step()
        optimizer.zero_grad()

``backward`` leaves in ``.grad`` of the trainable parameters

    g = ∇f(w) + λ · ( ∇h(w) − ∇h(w̃) ),    w̃ = w − α · ∇h(w) / ‖∇h(w)‖

(Huang et al., ICLR 2025, Eq. 3; f: loss on the alignment batch, harmful prompt -> refusal;
h: loss on the harmful batch, harmful prompt -> harmful answer) and the weights exactly as they
were, bit for bit: w is copied before the perturbation and copied back, never recomputed by
subtracting the perturbation. Cost: three forward/backward passes; memory: one copy of the
trainable weights, kept across calls. It is ``booster.defenses.booster.Booster``, the class
``booster run`` trains with, not a copy of it.

Batches are Hugging Face causal-LM batches (``input_ids``, ``attention_mask``, ``labels`` with
-100 on the prompt) unless ``loss_fn(batch) -> scalar`` says otherwise. Gradient accumulation:
pass the micro-batches of one optimizer step together, as lists; each counts by its answer
tokens, so the step's loss is the large batch's token mean, and ‖∇h‖ is taken over all of them
(a micro-batch with no answer tokens adds nothing; with your own loss_fn and no labels the
micro-batches weigh equally)
(``backward`` once per micro-batch would perturb each by its own gradient: not Booster's step).
A PEFT model works as it is (its trainable parameters are the adapters). bf16 works (the norm is
summed in float32). Several processes (accelerate DDP): pass ``accelerator=``; the gradients are
then synchronised once per pass on its last micro-batch, and every process ends with the same
global gradient; FSDP2 works the same way through ``booster run`` (docs/distributed.md).
Gradients already in ``.grad`` on entry are kept and added to.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable

import torch

from booster.config import BoosterConfig
from booster.defenses.base import Batch, StepContext
from booster.defenses.booster import Booster


class PlainBackward:
    """What the defence asks of an accelerator, with a plain backward: a single-process loop
    (no ``accelerator``), or a Trainer's accelerator whose ``no_sync`` keeps the micro-batches
    before the last from synchronising while the backward stays unscaled (BoosterStep averages
    the micro-batches itself; the Trainer's accelerator would divide by k once more)."""

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.accelerator is None else self.accelerator.no_sync(model)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()


def _batches(x: Batch | list[Batch]) -> list[Batch]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class BoosterStep:
    """Booster's combined gradient for a model in your own loop (see the module docstring)."""

    def __init__(self, model: Any, *, lam: float = 5.0, alpha: float = 0.1, loss_fn: Callable[[Batch], Any] | None = None,
                 accelerator: Any = None, low_memory: bool = False,
                 params: list[torch.nn.Parameter] | None = None):
        from booster.train import causal_lm_loss

        settings = BoosterConfig(lam=lam, alpha=alpha, low_memory=low_memory)  # checks the ranges
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad); Booster has nothing to train")
        self.ctx = StepContext(model=model, params=self.params, loss=loss_fn or causal_lm_loss(model),
                               accelerator=accelerator or PlainBackward())
        self.defense = Booster(SimpleNamespace(booster=settings))
        self.defense.setup(self.ctx)

    def backward(self, align: Batch | list[Batch], harmful: Batch | list[Batch]) -> dict[str, float]:
        """Add Booster's gradient into ``.grad``; return the loss terms (``loss`` = f,
        ``harmful_loss`` = h(w), ``harmful_loss_perturbed`` = h(w̃), ``regulariser``, and
        ``harmful_grad_norm`` = ‖∇h(w)‖)."""
        kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None  # the defence builds the gradient from empty
        metrics = self.defense.step(self.ctx, {"main": _batches(align), "harmful": _batches(harmful)})
        with torch.no_grad():
            for p, g in zip(self.params, kept):
                if g is not None:
                    p.grad = g.add_(p.grad) if p.grad is not None else g
        return metrics


def booster_backward(model: Any, align: Batch | list[Batch], harmful: Batch | list[Batch], *, lam: float = 5.0,
                     alpha: float = 0.1, loss_fn: Callable[[Batch], Any] | None = None,
                     accelerator: Any = None) -> dict[str, float]:
    """One call of ``BoosterStep(model, ...).backward(align, harmful)``: g = ∇f(w) + λ(∇h(w) − ∇h(w̃)),
    w̃ = w − α∇h(w)/‖∇h(w)‖, added into ``.grad``, weights restored bit for bit. It allocates
    its weight copy on every call: in a loop, keep a ``BoosterStep``."""
    return BoosterStep(model, lam=lam, alpha=alpha, loss_fn=loss_fn, accelerator=accelerator).backward(align, harmful)
