"""What every defence shares: the step context, gradient accumulation, the global norm.

A defence's ``step`` receives, for each data stream it asked for, the micro-batches of one
optimizer step. It leaves the combined gradient in ``.grad`` of the trainable parameters
and returns its metrics; the training loop owns clipping, ``optimizer.step`` and
``zero_grad``. Because a defence sees all micro-batches of a step together, gradient
accumulation is an exact large batch for every defence, multi-pass ones included.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

Batch = dict[str, torch.Tensor]


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


def accumulate(ctx: StepContext, micro_batches: list[Batch], weight: float = 1.0) -> float:
    """Add ``weight * mean_k loss_k`` 's gradient into ``.grad``; return the mean loss.
    Gradients are synchronised across processes once, on the last micro-batch: that backward
    averages the whole ``.grad`` over processes (what earlier phases left there, identical on
    every process, stays as it is), so on return every process holds the global gradient
    (DDP) or its shard of it (FSDP2)."""
    k = len(micro_batches)
    total = 0.0
    for j, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if j == k - 1 else ctx.accelerator.no_sync(ctx.model)
        with sync:
            loss = ctx.loss(mb)
            ctx.accelerator.backward(loss * (weight / k))
        total += loss.detach().float().item()
    return total / k


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
