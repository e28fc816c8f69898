"""Several processes on accelerate (DDP or FSDP2): what the loop needs beyond one process.

The engines are accelerate's: ``accelerate launch`` starts the processes, ``prepare`` wraps
the model (DDP, or FSDP2's ``fully_shard``), ``backward`` averages gradients over processes on
every backward that is not under ``no_sync``. This module only holds what our loop adds:

- which launches we refuse before any training (``check_supported``): DeepSpeed with a
  multi-pass defence (its engine steps the optimizer inside ``backward``), DeepSpeed with
  gradient accumulation or ZeRO-3, and FSDP1 (flat parameters; use FSDP2);
- sharded tensors in and out: a DTensor's full value for checkpoints and saved models
  (``full_tensor``) and back (``shard_like``);
- metrics averaged over processes so every process logs, and stops, alike (``mean_over_processes``);
- one accelerator for a whole run, with a long collective timeout, because evaluation runs
  on the main process only while the others wait.

Batch semantics: ``optim.batch_size`` is the *global* micro-batch, split evenly over the
processes (see ``train.Stream.shard``), so one config means the same update on any number
of processes.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any

import torch

WAIT_TIMEOUT = timedelta(hours=6)
"""Collective timeout: the other processes wait this long while the main process evaluates
(generation and judging of a 7B model take far longer than the default 10-30 minutes)."""


class DistributedError(RuntimeError):
    """A launch our loop cannot run correctly; the message names the fix."""


def make_accelerator() -> Any:
    """The run's accelerator: settings from ``accelerate launch`` (or one process), CPU when
    there is no GPU, and a collective timeout long enough for main-process evaluation."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=WAIT_TIMEOUT)])


def launch_rank() -> int:
    """This process's rank from the launcher's environment, before any accelerator exists."""
    return int(os.environ.get("RANK", "0"))


def _kind(accelerator: Any) -> str:
    return str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]


def is_fsdp(accelerator: Any) -> bool:
    return _kind(accelerator) == "FSDP"


def check_supported(accelerator: Any, defense_name: str, passes: int, grad_accum: int = 1) -> None:
    """Refuse, before any training, a launch under which a defence would silently be wrong."""
    kind = _kind(accelerator)
    wants_deepspeed = kind == "DEEPSPEED" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if wants_deepspeed:
        if passes > 1:
            raise DistributedError(
                f"defence '{defense_name}' takes {passes} forward/backward passes per step, but DeepSpeed steps the "
                "optimizer inside backward; launch with a DDP or FSDP accelerate config instead "
                "(configs/accelerate/ddp.yaml or fsdp.yaml)")
        if grad_accum > 1:
            raise DistributedError(
                "DeepSpeed scales and steps by its own gradient_accumulation_steps; set optim.grad_accum=1 or "
                "launch with a DDP or FSDP accelerate config (configs/accelerate/ddp.yaml or fsdp.yaml)")
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if getattr(plugin, "zero_stage", 0) == 3:
            raise DistributedError("DeepSpeed ZeRO-3 partitions the weights our checkpoints read; use ZeRO stage "
                                   "<= 2 or the FSDP config (configs/accelerate/fsdp.yaml)")
    if kind == "FSDP":
        version = getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise DistributedError("FSDP1 (flat parameters) is not supported; set fsdp_version: 2 in the accelerate "
                                   "config (see configs/accelerate/fsdp.yaml)")
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and kind == "MULTI_CPU":
        warnings.warn("accelerate runs an FSDP config as DDP on CPU (it selects FSDP only on accelerators); "
                      "the parameters are replicated, not sharded", stacklevel=2)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded tensor (a collective for a DTensor: call it on
    every process)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like`` (this process's shard when ``like`` is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)
    return full


def gathered_state(accelerator: Any, model: Any, full: bool) -> dict[str, torch.Tensor] | None:
    """What ``models.save_trained`` needs when the weights are sharded (FSDP2): the trainable
    tensors gathered (LoRA), or accelerate's full state dict (full fine-tuning); None when
    they are not sharded. A collective: call it on every process."""
    if not is_fsdp(accelerator):
        return None
    if full:
        state = accelerator.get_state_dict(model)
        # a tied weight (lm_head = embed_tokens) comes back under both names, as two copies that
        # save_pretrained cannot recognise as one: keep only the name it keeps in one process
        tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} -
                {n for n, _ in model.named_parameters()})
        return {k: v for k, v in state.items() if k not in tied}
    return {n: full_tensor(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def mean_over_processes(accelerator: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over processes (one collective). With the loss scaled as in
    ``train.causal_lm_loss``, the mean of the per-process losses is the global batch's loss;
    a value every process shares (a global norm) stays as it is."""
    if getattr(accelerator, "num_processes", 1) <= 1 or not metrics:
        return metrics
    keys = list(metrics)  # the same order on every process: the same defence built them
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))
