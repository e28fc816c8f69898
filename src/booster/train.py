"""THE training loop, shared by alignment and the attack: one function, ``fit``.

Per step: the defence builds the combined gradient from its micro-batches; the loop checks
every loss term is finite, clips the combined gradient (if configured), steps the optimizer
and the schedule, zeroes the gradients, logs, runs the periodic probes and checkpoints.
A checkpoint holds the trainable weights, the optimizer state, the defence's state and the
step, all as safetensors (no pickle), written atomically; ``fit`` resumes from it. Data
order is a pure function of (seed, stream, step), so a resumed run sees the same batches.

Several processes (``accelerate launch``, DDP or FSDP2): ``optim.batch_size`` is the global
micro-batch; each process takes its slice of it (``Stream.shard``) and scales its loss so
that the average over processes that DDP/FSDP take is the global batch's loss, token for
token. Two processes therefore give the update one process gives on the same global batch
(tests/test_distributed.py). Only the main process writes files.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from booster.config import OptimConfig
from booster.defenses.base import LOSS_DENOMINATOR, Batch, Defense, StepContext
from booster.distributed import check_supported, full_tensor, is_fsdp, mean_over_processes, shard_like
from booster.io import append_jsonl, atomic_dir, read_json, read_jsonl, rewrite_jsonl, stable_hash
from booster.models import answer_head, answer_loss
from booster.text import IGNORE, pad_batch
from booster.tracking import log_row


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the message names the fix."""


class Stream:
    """Deterministic micro-batches over tokenised rows: micro-batch ``i`` depends only on
    (seed, name, i), reshuffled every epoch, so resuming at any step is exact.

    ``batch_size`` is the global micro-batch. In a run of ``world`` processes (``shard``),
    process ``rank`` gets rows ``[rank·b/world, (rank+1)·b/world)`` of each global
    micro-batch, plus ``LOSS_DENOMINATOR``: the global micro-batch's count of target tokens
    divided by ``world``. Every process sees every row, so it computes that count locally."""

    def __init__(self, rows: list[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int, name: str):
        if not rows:
            raise TrainingError(f"data stream '{name}' is empty; give it at least one example")
        self.rows, self.batch_size, self.pad_id, self.name = rows, batch_size, pad_id, name
        self.rank, self.world = 0, 1
        self._seed = int(stable_hash([seed, name], 12), 16)
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.rows)

    def shard(self, rank: int, world: int) -> "Stream":
        """This stream as process ``rank`` of ``world`` sees it (itself when ``world`` is 1)."""
        if world == 1:
            return self
        if self.batch_size % world:
            raise TrainingError(f"optim.batch_size={self.batch_size} (the global micro-batch of stream '{self.name}') "
                                f"cannot be split evenly over {world} processes; make it a multiple of {world}")
        out = copy.copy(self)
        out.rank, out.world = rank, world
        return out

    def _row(self, k: int) -> dict[str, list[int]]:
        epoch, pos = divmod(k, len(self.rows))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self._seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=g).tolist()
        return self.rows[self._perm[pos]]

    def batch(self, index: int) -> Batch:
        start = index * self.batch_size
        rows = [self._row(start + j) for j in range(self.batch_size)]
        if self.world == 1:
            return pad_batch(rows, self.pad_id)
        per = self.batch_size // self.world
        out = pad_batch(rows[self.rank * per:(self.rank + 1) * per], self.pad_id)
        targets = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows)  # the shifted labels
        out[LOSS_DENOMINATOR] = torch.tensor(targets / self.world, dtype=torch.float64)
        return out


def causal_lm_loss(model: Any) -> Callable[[Batch], torch.Tensor]:
    """The mean answer-token cross-entropy of a batch: the LM head on the answer positions alone
    where that is the same computation (``booster.models.answer_head``), else the model's own."""
    device = next(p.device for p in model.parameters())
    parts = answer_head(model)

    def loss(batch: Batch) -> torch.Tensor:
        denominator = batch.get(LOSS_DENOMINATOR)
        batch = {k: v.to(device) for k, v in batch.items() if k != LOSS_DENOMINATOR}
        if denominator is None and parts is not None and set(batch) == {"input_ids", "attention_mask", "labels"}:
            return answer_loss(parts, batch["input_ids"], batch["attention_mask"], batch["labels"])
        if denominator is None:
            return model(**batch, use_cache=False).loss
        # transformers' own loss: the sum over target tokens divided by num_items_in_batch
        return model(**batch, use_cache=False, num_items_in_batch=float(denominator)).loss

    return loss


def total_steps(optim: OptimConfig, n_main: int) -> int:
    if optim.steps is not None:
        return optim.steps
    return max(1, math.ceil(optim.epochs * n_main / (optim.batch_size * optim.grad_accum)))


@dataclass
class FitResult:
    steps: int
    log: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)


def _save_checkpoint(path: Path, step: int, named: list[tuple[str, torch.nn.Parameter]],
                     optimizer: torch.optim.Optimizer, defense: Defense, write: bool = True) -> None:
    """Call on every process (sharded tensors are gathered); only the one with ``write`` writes."""
    opt_state = optimizer.state_dict()
    tensors = {f"{i}.{k}": full_tensor(v.detach()).contiguous() for i, s in opt_state["state"].items()
               for k, v in s.items() if torch.is_tensor(v)}
    weights = {n: full_tensor(p.detach()).contiguous() for n, p in named}
    extra = {k: full_tensor(v).contiguous() for k, v in defense.state_dict().items()}
    if not write:
        return
    with atomic_dir(path) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(extra, str(tmp / "defense.safetensors"))
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "param_groups": opt_state["param_groups"], "names": [n for n, _ in named],
             "torch_rng": torch.get_rng_state().tolist()}))


def checkpoint_step(out_dir: Path) -> int:
    """The step a stage's training resumes from: its checkpoint's, 0 without one."""
    state = out_dir / "checkpoint" / "state.json"
    return int(read_json(state)["step"]) if state.is_file() else 0


def _load_checkpoint(path: Path, named: list[tuple[str, torch.nn.Parameter]],
                     optimizer: torch.optim.Optimizer, defense: Defense) -> int:
    """Every process reads the same files and keeps its shard of each tensor."""
    state = json.loads((path / "state.json").read_text())
    if state["names"] != [n for n, _ in named]:
        raise TrainingError(f"checkpoint {path} belongs to another model; delete it to start over")
    weights = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in named:
            p.copy_(shard_like(weights[n], p))
    flat = load_file(str(path / "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, k = key.split(".", 1)
        like = params[int(i)]
        opt_state.setdefault(int(i), {})[k] = shard_like(value, like) if value.shape == like.shape else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    defense.load_state_dict(load_file(str(path / "defense.safetensors")))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"])


def step_batches(streams: dict[str, Stream], defense: Defense, step: int, grad_accum: int) -> dict[str, list[Batch]]:
    """The micro-batches of optimizer step ``step`` for each stream the defence asks for."""
    return {name: [streams[name].batch(step * grad_accum + j) for j in range(grad_accum)]
            for name in defense.streams_at(step)}


def train_step(ctx: StepContext, defense: Defense, batches: dict[str, list[Batch]], optimizer: Any,
               optim: OptimConfig, desc: str = "train") -> dict[str, float]:
    """One optimizer step: the defence's combined gradient, checked, clipped, applied, zeroed."""
    metrics = mean_over_processes(ctx.accelerator, defense.step(ctx, batches))  # alike on every process
    if optim.max_grad_norm is not None:
        norm = ctx.accelerator.clip_grad_norm_(ctx.params, optim.max_grad_norm)
        if norm is not None:  # None: DeepSpeed clips inside its engine
            metrics["grad_norm"] = float(full_tensor(norm) if torch.is_tensor(norm) else norm)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise TrainingError(f"{desc}: {', '.join(bad)} became {list(bad.values())[0]} at step {ctx.step}; "
                            "lower the learning rate (optim.lr) or use model.dtype=float32")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def fit(model: Any, defense: Defense, streams: dict[str, Stream], optim: OptimConfig, out_dir: Path, *,
        accelerator: Any, steps: int, desc: str = "train",
        probes: dict[str, Callable[[Any], float]] | None = None, probe_every: int = 0,
        snapshots: dict[int, Callable[[int], None]] | None = None) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps with ``defense``; resumable from ``out_dir``.
    ``snapshots[s](s)`` runs after step s (probed there too) and before its checkpoint, so a run
    resumed past s does not call it again."""
    from transformers import get_scheduler

    check_supported(accelerator, defense.name, defense.passes, optim.grad_accum)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in defense.streams if s not in streams]
    if missing:
        raise TrainingError(f"defence '{defense.name}' needs data stream(s) {missing}; this stage provides "
                            f"{sorted(streams)}")
    streams = {k: s.shard(accelerator.process_index, accelerator.num_processes) for k, s in streams.items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TrainingError("the model has no trainable parameters; check model.finetune and model.lora.targets")
    optimizer = torch.optim.AdamW([p for _, p in named], lr=optim.lr, weight_decay=optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_fsdp(accelerator):  # fully_shard swapped every parameter for a sharded DTensor: take them again
        names = [n for n, _ in named]
        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        if [n for n, _ in named] != names:
            raise TrainingError("FSDP renamed the trainable parameters; checkpoints would not match them")
    params = [p for _, p in named]
    # transformers' 'constant' ignores warmup; its warmed-up twin is what optim.warmup_steps asks for
    schedule = "constant_with_warmup" if optim.schedule == "constant" and optim.warmup_steps else optim.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=steps)
    snapshots = snapshots or {}
    ctx = StepContext(model=model, params=params, loss=causal_lm_loss(model), accelerator=accelerator,
                      total_steps=steps)
    try:
        defense.setup(ctx)
    except ValueError as e:
        raise TrainingError(str(e)) from None

    ckpt = out_dir / "checkpoint"
    log_path, probe_path = out_dir / "train_log.jsonl", out_dir / "probe_log.jsonl"
    start = _load_checkpoint(ckpt, named, optimizer, defense) if (ckpt / "state.json").is_file() else 0
    main = accelerator.is_main_process
    if main:  # drop log rows past the checkpoint: they are recomputed identically
        rewrite_jsonl(log_path, [r for r in read_jsonl(log_path) if r["step"] < start])
        rewrite_jsonl(probe_path, [r for r in read_jsonl(probe_path) if 0 < start and r["step"] <= start])
    with warnings.catch_warnings():  # fast-forwarding the schedule of a resumed run, not a misuse
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            scheduler.step()

    def run_probes(step: int) -> None:
        if not probes:
            return
        model.eval()
        with torch.no_grad():
            row = {"step": step, **{name: fn(model) for name, fn in probes.items()}}
        model.train()
        if main:
            append_jsonl(probe_path, [row])
            log_row(accelerator, "probe", row)

    model.train()
    if start == 0 and probe_every:
        run_probes(0)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not main, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        ctx.step = step
        lr = scheduler.get_last_lr()[0]  # the rate this step trains with; scheduler.step() below moves to the next
        metrics = train_step(ctx, defense, step_batches(streams, defense, step, optim.grad_accum), optimizer, optim,
                             desc=desc)
        scheduler.step()
        row = {"step": step, "lr": lr, **metrics, "seconds": time.perf_counter() - t0}
        if main:
            append_jsonl(log_path, [row])
            log_row(accelerator, "train", row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if "loss" in k})
        done = step + 1
        if probe_every and (done % probe_every == 0 or done == steps or done in snapshots):
            run_probes(done)
        if done in snapshots:
            snapshots[done](done)
        if done % optim.checkpoint_every == 0 or done == steps:
            _save_checkpoint(ckpt, done, named, optimizer, defense, write=main)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop accelerate's references to this model and optimizer (a grid trains many)
    return FitResult(steps=steps, log=read_jsonl(log_path), probes=read_jsonl(probe_path))
