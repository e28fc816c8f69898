"""Worker of tests/test_distributed.py: trains a tiny model (``CASES``: SFT and Booster with
LoRA, Booster resumed from a checkpoint, Booster with full fine-tuning) with the real loop
(``fit``) and records, for every step, the combined gradient each defence left in ``.grad``
(before clipping and the optimizer), the logged metrics, a loss probe, the trained weights
and what the pipeline's save path writes.

    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml tests/dist_worker.py OUT ddp
    python tests/dist_worker.py OUT single

The test imports ``run_case`` for the one-process reference and launches this file for two
processes. Mode ``fsdp``: accelerate selects FSDP only on accelerators and runs an FSDP
config on CPU as DDP, so this worker switches accelerate's state to FSDP2 itself, with the
plugin accelerate builds from the launched config; from there on it is accelerate's own
FSDP2 path (``fsdp2_prepare_model``, ``fully_shard``) on gloo.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

VOCAB = 101
STEPS, GRAD_ACCUM, BATCH = 2, 2, 4
DTYPE = getattr(torch, os.environ.get("DIST_WORKER_DTYPE", "float64"))
"""float64 in the test (only summation order separates the runs); float32 to measure the usual case."""
SEEN: dict[str, object] = {}
"""What the steps saw: the parameters' type and how much of them this process holds, the rows
per micro-batch, and how many parameters a defence failed to restore bit for bit."""


def rows(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Rows of different lengths and answer lengths, so the processes' halves of a global
    micro-batch hold different numbers of target tokens (the case a per-process mean gets wrong)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def streams():
    from booster.train import Stream

    return {"main": Stream(rows(16, 0), BATCH, 0, 0, "main"), "harmful": Stream(rows(16, 1), BATCH, 0, 0, "harmful")}


def tiny(full: bool = False):
    """The tiny model with a LoRA adapter on q and v, or (``full``) every weight trainable."""
    from peft import LoraConfig, get_peft_model

    from booster.models import tiny_model

    torch.manual_seed(0)
    if full:
        return tiny_model(VOCAB).to(DTYPE)
    model = get_peft_model(tiny_model(VOCAB), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model.to(DTYPE)


def recorder(defense):
    """The defence, also keeping the full combined gradient of every step."""
    from booster.distributed import full_tensor

    grads: list[dict[str, torch.Tensor]] = []
    inner_step = defense.step

    def local(p):
        return p.to_local() if hasattr(p, "to_local") else p

    def step(ctx, batches):
        before = [local(p).detach().clone() for p in ctx.params]
        metrics = inner_step(ctx, batches)
        # the defence must leave this process's weights (its shard, under FSDP) bit for bit as they were
        SEEN["not_restored"] = SEEN.get("not_restored", 0) + sum(
            not torch.equal(b, local(p).detach()) for b, p in zip(before, ctx.params))
        grads.append({f"{i}": full_tensor(p.grad.detach()).clone() for i, p in enumerate(ctx.params)})
        SEEN.update(param_type=type(ctx.params[0]).__name__, numel=sum(p.numel() for p in ctx.params),
                    local_numel=sum(local(p).numel() for p in ctx.params),
                    rows_per_micro_batch=[b["input_ids"].shape[0] for mbs in batches.values() for b in mbs])
        return metrics

    defense.step = step
    return defense, grads


CASES = {"sft": ("sft", False, False), "booster": ("booster", False, False),
         "booster-resumed": ("booster", True, False), "booster-full": ("booster", False, True),
         "booster-low-memory": ("booster", False, False, True)}
"""case -> (defence, resume from a checkpoint after one step, full fine-tuning[, booster.low_memory])."""


def run_case(accelerator, case: str, out: Path) -> dict[str, torch.Tensor]:
    """Train ``STEPS`` steps; return {step{i}.grad.<param>, final.<param>, saved.<key>, log{i}.<metric>,
    probe{i}} as full tensors. ``saved``: what the pipeline's save path wrote to disk."""
    from safetensors.torch import load_file

    from booster.config import AlignConfig, BoosterConfig, OptimConfig
    from booster.defenses import make_defense
    from booster.distributed import full_tensor, gathered_state
    from booster.evaluate.probe import loss_probe
    from booster.models import save_trained
    from booster.train import fit

    name, resume, full, *low = CASES[case]
    stage = AlignConfig(defense=name, booster=BoosterConfig(low_memory=bool(low and low[0])))
    optim = OptimConfig(lr=1e-2, steps=STEPS, grad_accum=GRAD_ACCUM, batch_size=BATCH, checkpoint_every=1)
    probes = {"harmful": loss_probe(rows(5, 2), 0)}
    grads = []
    if resume:  # one step, then a fresh model (as in a new process) continues from the checkpoint
        defense, first = recorder(make_defense(name, stage))
        fit(tiny(full), defense, streams(), optim, out, accelerator=accelerator, steps=1, probes=probes,
            probe_every=1)
        grads += first
    model = tiny(full)
    defense, rest = recorder(make_defense(name, stage))
    result = fit(model, defense, streams(), optim, out, accelerator=accelerator, steps=STEPS, probes=probes,
                 probe_every=1)
    grads += rest
    tensors = {f"step{i}.grad.{n}": g for i, step in enumerate(grads) for n, g in step.items()}
    tensors.update({f"final.{n}": full_tensor(p.detach()).clone() for n, p in model.named_parameters()
                    if p.requires_grad})
    for i, row in enumerate(result.log):
        for k, v in row.items():
            if k not in ("step", "lr", "seconds"):
                tensors[f"log{i}.{k}"] = torch.tensor(float(v), dtype=torch.float64)
    for i, row in enumerate(result.probes):
        tensors[f"probe{i}"] = torch.tensor(row["harmful"], dtype=torch.float64)
    state = gathered_state(accelerator, model, full)  # as Pipeline._save_model does
    if accelerator.is_main_process:
        save_trained(model, out / "model", full, state_dict=state)
        saved = load_file(str(out / "model" / ("model.safetensors" if full else "adapter_model.safetensors")))
        tensors.update({f"saved.{k}": v for k, v in saved.items()})
    return tensors


def force_fsdp2() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    assert plugin.fsdp_version == 2, plugin.fsdp_version
    for state in (PartialState, AcceleratorState):
        state._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def main() -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    accelerator = Accelerator(cpu=True)
    if mode == "fsdp":
        force_fsdp2()
    results = {}
    for case in CASES:
        results[case] = run_case(accelerator, case, out / mode / case)
    not_restored = accelerator.reduce(torch.tensor(SEEN.pop("not_restored")), reduction="sum")
    if accelerator.is_main_process:
        for case, tensors in results.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{mode}-{case}.safetensors"))
        (out / f"{mode}.json").write_text(json.dumps({
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "not_restored_on_any_process": int(not_restored), **SEEN}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
