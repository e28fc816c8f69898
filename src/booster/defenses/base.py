"""What every defence shares: the step context, gradient accumulation, the global norm.

A defence's ``step`` receives, for each data stream it asked for, the micro-batches of one
optimizer step. It leaves the combined gradient in ``.grad`` of the trainable parameters
and returns its metrics; the training loop owns clipping, ``optimizer.step`` and
``zero_grad``. A defence sees all micro-batches of a step together, so a multi-pass defence
(Booster) takes its norm and its perturbation over the whole step. ``accumulate`` weights each
micro-batch by its answer tokens: k micro-batches are then one batch of k·b rows token for
token (SFT, Booster, Lisa and the ablation use it). Vaccine and RepNoise average the
micro-batches' own means instead (their perturbation and loss terms are per micro-batch);
with unequal answer lengths that is not the large batch's token mean.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from booster.text import IGNORE

Batch = dict[str, torch.Tensor]

LOSS_DENOMINATOR = "loss_denominator"
"""Batch key (several processes only): divide the summed token loss by this, not by the
local token count. Process r's loss is then world·S_r/N, and the average over processes
that DDP/FSDP take of its gradient is ∇(S/N): the global micro-batch's token-mean loss."""


@dataclass
class StepContext:
    model: Any
    """The model as prepared by accelerate (possibly wrapped for DDP/FSDP)."""
    params: list[torch.nn.Parameter]
    """The trainable parameters, in a fixed order."""
    loss: Callable[[Batch], torch.Tensor]
    """Mean next-token cross-entropy on a batch's answer tokens."""
    accelerator: Any
    step: int = 0
    total_steps: int = 0


def target_tokens(batch: Batch) -> float:
    """The answer tokens a micro-batch's loss averages over: its shifted labels that are not
    ignored, or, with several processes, the global micro-batch's count (``loss_denominator``),
    the same on every process. A batch without labels (a caller's own loss_fn) counts as 1:
    such micro-batches weigh equally."""
    denominator = batch.get(LOSS_DENOMINATOR)
    if denominator is not None:
        return float(denominator)
    if "labels" not in batch:
        return 1.0
    return float((batch["labels"][:, 1:] != IGNORE).sum())


def accumulate(ctx: StepContext, micro_batches: list[Batch], weight: float = 1.0) -> float:
    """Add ``weight ·`` the gradient of the step's token-mean loss into ``.grad``; return that loss.
    Micro-batch j (n_j answer tokens of N in all) counts n_j / N, so k micro-batches are one
    large batch. One with no answer tokens (its answer cut by max_length) adds nothing: its mean
    would be 0/0. Gradients are synchronised across processes once, on the last micro-batch
    that has tokens (the counts are global, so every process skips the same ones): that
    backward averages the whole ``.grad`` over processes (what earlier phases left there,
    identical on every process, stays as it is), so on return every process holds the global
    gradient (DDP) or its shard of it (FSDP2)."""
    counts = [target_tokens(mb) for mb in micro_batches]
    n_all = sum(counts)
    if n_all == 0:
        return 0.0
    last = max(j for j, n in enumerate(counts) if n > 0)
    total = 0.0
    for j, (mb, n) in enumerate(zip(micro_batches, counts)):
        if n == 0:
            continue
        sync = contextlib.nullcontext() if j == last else ctx.accelerator.no_sync(ctx.model)
        with sync:
            loss = ctx.loss(mb)
            ctx.accelerator.backward(loss * (weight * n / n_all))
        total += loss.detach().float().item() * n / n_all
    return total


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes (itself when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients together (one vector over every trainable parameter, over
    every process's shard of it), the same value on every process.

    Replicated gradients (one process, DDP after its all-reduce) need no communication.
    Sharded ones (FSDP2: DTensors) are combined by DTensor itself: each shard's norm is a
    partial norm, and the stacked total is reduced over the mesh in one collective
    (``full_tensor``), whatever the placements are."""
    from torch.distributed.tensor import DTensor

    # at least float32 (bf16 gradients are summed in float32), float64 stays float64
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.promote_types(p.grad.dtype, torch.float32))
             for p in params if p.grad is not None]
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(norms))
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total.item()


class Defense(ABC):
    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    """Where it applies: 'align' (safety alignment) and/or 'attack' (user fine-tuning)."""
    passes: ClassVar[int]
    """Forward/backward passes per step, per micro-batch."""
    config_sections: ClassVar[dict[str, type]] = {}
    """The stage config's sections this defence reads, each with its settings dataclass
    (``{"booster": BoosterConfig}``, defined beside the defence): they enter the stage hash,
    other defences' sections stay out of it, and each is a field of that class in the
    config of every stage the defence applies to."""
    streams: ClassVar[tuple[str, ...]] = ("main",)
    """Data streams needed per step: 'main' (the stage's own data: alignment pairs in
    alignment, the user's data in the attack), 'harmful' (harmful pairs), 'align'."""

    @classmethod
    def mean_passes(cls, stage_cfg: Any) -> float:
        """Passes per step on average over a stage with these settings (the time estimate's unit)."""
        return float(cls.passes)

    def __init__(self, stage_cfg: Any = None) -> None:
        self.stage_cfg = stage_cfg

    @classmethod
    def length_problem(cls, stage_cfg: Any, steps: int) -> str | None:
        """What is wrong with running this defence for ``steps`` steps under ``stage_cfg``, if
        anything: the pipeline asks before any stage trains (settings that depend on the
        stage's length cannot be checked when the config loads)."""
        return None

    def setup(self, ctx: StepContext) -> None:
        """Allocate buffers once, before the first step."""

    def streams_at(self, step: int) -> tuple[str, ...]:
        return self.streams

    @abstractmethod
    def step(self, ctx: StepContext, batches: dict[str, list[Batch]]) -> dict[str, float]:
        """Leave the combined gradient in ``.grad``; return metrics (every loss term)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs (e.g. an anchor copy of the weights)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
