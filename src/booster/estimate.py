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

``stage_work`` and ``measure_run`` read the run's data through ``RunData`` (what the pipeline's
``booster.rundata.DataServer`` serves); ``estimate_run`` logs the sums before the first stage;
``RunTimer`` corrects the estimates as stages finish.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("booster")


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
    steps: int = 0

    def seconds(self, rates: Rates) -> float:
        return (self.train_tokens * rates.train_token_s + self.forward_tokens * rates.forward_token_s
                + self.decode_steps * rates.decode_step_s)

    def after(self, step: int) -> StageWork:
        """The work left when training resumes from a checkpoint at ``step`` (a resumed stage
        priced whole would also throw off ``RunTimer``'s correction of every later stage)."""
        if not self.steps or step <= 0:
            return self
        left = max(self.steps - step, 0)
        share = left / self.steps
        return replace(self, train_tokens=self.train_tokens * share, forward_tokens=self.forward_tokens * share,
                       steps=left)


def mean_padded_length(batch_lengths: Callable[[int], int], n: int = 32) -> float:
    """Mean padded length of the first ``n`` batches (``batch_lengths(i)``: batch i's width)."""
    return statistics.mean(batch_lengths(i) for i in range(n))


def training_work(label: str, steps: int, passes: float, batch_size: int, grad_accum: int, length: float,
                  probes: int, probe_tokens: int) -> StageWork:
    """``probes`` probe runs, each a forward pass over ``probe_tokens`` tokens."""
    return StageWork(label, train_tokens=steps * passes * batch_size * grad_accum * length,
                     forward_tokens=probes * probe_tokens, steps=steps)


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


class RunData(Protocol):
    """The run's data as the pipeline serves it (loaded once, cached): a stage's cost depends
    on its examples and their tokenised lengths."""

    def tokenizer(self, cfg: Any) -> Any: ...

    def safety(self, cfg: Any) -> Any: ...

    def encode(self, cfg: Any, examples: list[Any]) -> list[dict[str, list[int]]]: ...

    def benign(self, cfg: Any) -> list[Any]: ...

    def task_pool(self, cfg: Any) -> list[Any]: ...

    def mix_pool(self, cfg: Any) -> list[Any]: ...

    def task_eval(self, cfg: Any) -> list[Any]: ...

    def eval_prompts(self, cfg: Any) -> list[Any]: ...


# Heavy imports stay inside the functions below: the cost model itself needs no torch.
def stage_work(kind: str, cfg: Any, data: RunData) -> StageWork:
    """What a stage of ``kind`` (align, attack, eval) of grid point ``cfg`` costs, in the units
    of ``Rates`` (no model is loaded)."""
    from booster.attack import poisoned_set
    from booster.data.tasks import get_task
    from booster.defenses import DEFENSES
    from booster.evaluate.generate import prompt_ids
    from booster.train import Stream, total_steps

    pad = data.tokenizer(cfg).pad_token_id
    safety = data.safety(cfg)
    probe_tokens = sum(len(r["input_ids"]) for r in data.encode(cfg, safety.probe))

    def length(rows: list[Any], batch_size: int, name: str) -> float:
        stream = Stream(data.encode(cfg, rows), batch_size, pad, cfg.run.seed, name)
        return mean_padded_length(lambda i: stream.batch(i)["input_ids"].shape[1])

    if kind == "eval":
        task = get_task(cfg.attack.task)
        tok = data.tokenizer(cfg)
        prompts = [p.prompt for p in data.eval_prompts(cfg)]
        items = [x.prompt for x in data.task_eval(cfg)[:cfg.eval.n_task]]
        prefill = sum(padded_prompt_tokens([len(ids) for ids in prompt_ids(tok, texts, cfg.model.prompt_format)],
                                           cfg.eval.batch_size) for texts in (prompts, items) if texts)
        return eval_work(kind, len(prompts), cfg.eval.max_new_tokens, len(items),
                         cfg.eval.task_max_new_tokens or task.max_new_tokens, cfg.eval.batch_size, prefill)
    stage_cfg = cfg.align if kind == "align" else cfg.attack
    defense = DEFENSES[stage_cfg.defense]
    optim = stage_cfg.optim
    if kind == "align":
        main = safety.align + data.benign(cfg)
        probe_tokens += sum(len(r["input_ids"]) for r in data.encode(cfg, safety.align_probe[:cfg.data.n_probe]))
        every = stage_cfg.eval_every
    else:
        main = poisoned_set(data.task_pool(cfg), data.mix_pool(cfg), n=cfg.attack.n, p=cfg.attack.p,
                            seed=cfg.run.seed)
        every = stage_cfg.probe_every
    sources = {"main": main, "align": safety.align, "harmful": safety.harmful}
    lengths = [length(sources[s], optim.batch_size, s) for s in defense.streams if s in sources]
    steps = total_steps(optim, len(main))
    return training_work(kind, steps, defense.mean_passes(stage_cfg), optim.batch_size, optim.grad_accum,
                         sum(lengths) / len(lengths), probe_count(steps, every), probe_tokens)


def measure_run(cfg: Any, data: RunData, device: Any, root: Path) -> Rates:
    """This machine's speed on ``cfg``'s model, alignment batches and evaluation prompts
    (``measure`` on a fresh model that is thrown away after)."""
    from booster.evaluate.generate import generate
    from booster.models import ModelRecipe, build_model
    from booster.text import pad_batch
    from booster.train import Stream, causal_lm_loss

    tok = data.tokenizer(cfg)
    safety = data.safety(cfg)
    model = build_model(cfg.model, tok, ModelRecipe(), root,
                        train="full" if cfg.model.finetune == "full" else "new_lora").to(device)
    stream = Stream(data.encode(cfg, safety.align + data.benign(cfg)), cfg.align.optim.batch_size,
                    tok.pad_token_id, cfg.run.seed, "align")
    probe = pad_batch(data.encode(cfg, safety.probe[:16]), tok.pad_token_id)
    prompts = [p.prompt for p in safety.eval_prompts[:min(cfg.eval.batch_size, cfg.eval.n_harmful)]]

    def generate_batch(k: int) -> Any:  # one evaluation batch, exactly k new tokens
        return generate(model, tok, prompts, fmt=cfg.model.prompt_format, max_new_tokens=k, min_new_tokens=k,
                        batch_size=len(prompts), desc="estimate (decoding)")

    batches = [{k: v.to(device) for k, v in stream.batch(i).items()} for i in range(3)]
    return measure(model, causal_lm_loss(model), batches, {k: v.to(device) for k, v in probe.items()},
                   generate_batch, batch_rows=len(prompts))


KIND_NAMES = {"align": "alignments", "attack": "attacks", "eval": "evaluations"}



class RunTimer:
    """The estimate of each stage still to run, corrected as stages finish by how far the
    finished ones of the same sort were off (actual over estimated seconds; training and
    evaluation apart, since their estimates rest on different measurements)."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates = estimates
        self.done: dict[str, float] = {}

    @staticmethod
    def _sort(stage: str) -> str:
        return "eval" if stage.startswith("eval") else "train"

    def _scale(self, sort: str) -> float:
        done = [k for k in self.done if k in self.estimates and self._sort(k) == sort and self.estimates[k] > 0]
        est = sum(self.estimates[k] for k in done)
        return sum(self.done[k] for k in done) / est if est > 0 else 1.0

    def _expected(self, stage: str) -> float:
        return self._scale(self._sort(stage)) * self.estimates.get(stage, 0.0)

    def left(self) -> float:
        return sum(self._expected(k) for k in self.estimates if k not in self.done)

    def starting(self, stage: str) -> str:
        k = len(self.done) + 1
        return f"stage {k}/{len(self.estimates)} {stage}: {say(self._expected(stage))}; the run: {say(self.left())} left"

    def finished(self, stage: str, seconds: float) -> None:
        self.done[stage] = seconds


def estimate_run(todo: list[tuple[str, Path, Any]], data: RunData, accelerator: Any, root: Path,
                 work: Callable[[str, Any], StageWork], judge_pending: Callable[[Any], bool]) -> RunTimer | None:
    """Log how long the stages ``todo`` ((kind, directory, config) each) will take here, before
    running them, and return their timer; None where a single process cannot time them."""
    if accelerator.num_processes > 1 or any(c.eval.engine == "vllm" for _, _, c in todo):
        log.info("estimate: skipped (several processes or vLLM; it times a single process)")
        return None
    from booster.train import checkpoint_step

    t0 = time.time()
    rates = measure_run(todo[0][2], data, accelerator.device, root)
    timer = RunTimer({d.name: work(kind, cfg).after(checkpoint_step(d)).seconds(rates) for kind, d, cfg in todo})
    total = timer.left()
    by_kind: dict[str, list[float]] = {}
    for kind, d, _ in todo:
        by_kind.setdefault(kind, []).append(timer.estimates[d.name])
    parts = ", ".join(f"{len(v)} {KIND_NAMES[k]} {say(sum(v)).replace('about ', '~')}" for k, v in by_kind.items())
    log.info("estimate: %d stages to run, %s on this machine (%s; measured in %.0f s: %.2f ms per token "
             "trained, %.0f ms per decoding step of %d answers)", len(todo), say(total), parts, time.time() - t0,
             1e3 * rates.train_token_s, 1e3 * rates.decode_step_s, todo[0][2].eval.batch_size)
    if judge_pending(todo[0][2]):
        log.info("estimate: plus the judge's one-time build before the first evaluation (13 min measured "
                 "on 2 Zen 4 cores; docs/results/cpu-demo-amortised/times.md)")
    return timer
