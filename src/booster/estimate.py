"""How long a run will take on this machine, said before the wait.

Owns the cost model of a stage and its measurement; the pipeline lists the stages still to
run and logs the sums. Seconds of a stage:

    training    steps · passes · B · L̄        · t_train    (L̄: mean padded length of its batches)
              + probes · Σ_probe rows (len)    · t_forward
    evaluation  Σ_kinds ⌈n / batch⌉ · new_tokens · t_decode  +  padded prompt tokens · t_forward

t_train (a token through a forward and backward pass, optimizer step included), t_forward (a
token through a forward pass) and t_decode (one greedy decoding step of a batch of
``eval.batch_size`` prompts) are timed on this machine with the run's own model, dtype,
batches and prompts (``measure``: a few training steps, a probe batch, a few decoding steps;
~10-30 s on 2 CPU cores). Generation is costed at its full ``max_new_tokens``: an answer that
ends early (a refusal) costs less, so evaluations of aligned models come in under the estimate.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of work on this machine."""

    train_token_s: float
    forward_token_s: float
    decode_step_s: float


@dataclass
class StageWork:
    """The work of one stage, in the units ``Rates`` prices."""

    label: str
    train_tokens: float = 0.0
    forward_tokens: float = 0.0
    decode_steps: float = 0.0

    def seconds(self, rates: Rates) -> float:
        return (self.train_tokens * rates.train_token_s + self.forward_tokens * rates.forward_token_s
                + self.decode_steps * rates.decode_step_s)


def mean_padded_length(batch_lengths: Callable[[int], int], n: int = 32) -> float:
    """Mean padded length of the first ``n`` batches (``batch_lengths(i)``: batch i's width)."""
    return statistics.mean(batch_lengths(i) for i in range(n))


def training_work(label: str, steps: int, passes: int, batch_size: int, grad_accum: int, length: float,
                  probes: int, probe_tokens: int) -> StageWork:
    """``probes`` probe runs, each a forward pass over ``probe_tokens`` tokens."""
    return StageWork(label, train_tokens=steps * passes * batch_size * grad_accum * length,
                     forward_tokens=probes * probe_tokens)


def probe_count(steps: int, every: int) -> int:
    """Probes ``fit`` runs: at step 0, every ``every`` steps and at the end."""
    if not every:
        return 0
    return 1 + steps // every + (steps % every != 0)


def padded_prompt_tokens(lengths: list[int], batch_size: int) -> int:
    """Prompt tokens the prefill computes: longest first, batches padded to their longest."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size))


def eval_work(label: str, n_harmful: int, max_new: int, n_task: int, task_max_new: int, batch_size: int,
              prompt_tokens: int = 0) -> StageWork:
    steps = math.ceil(n_harmful / batch_size) * max_new + math.ceil(n_task / batch_size) * task_max_new
    return StageWork(label, forward_tokens=prompt_tokens, decode_steps=steps)


def _timed(fn: Callable[[], Any]) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model: Any, loss: Callable[[dict], Any], batches: list[dict], probe_batch: dict,
            generate_batch: Callable[[int], Any], decode_tokens: int = 8, batch_rows: int | None = None) -> Rates:
    """Time this machine on the run's own work. ``model``: a fresh trainable model (its weights
    are changed; throw it away after). ``batches``: training micro-batches, the first one a
    warm-up. ``generate_batch(k)``: greedy decoding of one evaluation batch for exactly k new
    tokens. Plain forward/backward/AdamW steps (what SFT's step is), no collectives."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-12)
    model.train()

    def step(batch: dict) -> None:
        loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    timed = batches[1:] or batches
    seconds = sum(_timed(lambda b=b: step(b)) for b in timed)
    train_token_s = seconds / sum(b["input_ids"].numel() for b in timed)
    model.eval()
    with torch.no_grad():
        fwd = {k: probe_batch[k] for k in ("input_ids", "attention_mask")}
        forward_token_s = _timed(lambda: model(**fwd, use_cache=False)) / probe_batch["input_ids"].numel()
        generate_batch(2)  # warm-up
        # the prefill, priced by t_forward, drops out of the difference; best of two of each
        long = min(_timed(lambda: generate_batch(decode_tokens + 1)) for _ in range(2))
        short = min(_timed(lambda: generate_batch(1)) for _ in range(2))
        # a decoding step pushes one token per answer through the model: never cheaper than that
        rows = probe_batch["input_ids"].shape[0] if batch_rows is None else batch_rows
        decode_step_s = max((long - short) / decode_tokens, rows * forward_token_s)
    return Rates(train_token_s, forward_token_s, decode_step_s)


def say(seconds: float) -> str:
    """'about 52 min', 'about 1 h 35 min', 'under a minute'."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 60:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"
