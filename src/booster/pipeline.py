"""align -> attack -> evaluate, each stage cached under <out_dir>/stages/<kind>-<hash>.

A stage's hash covers exactly the settings that decide its output (and the hash of the
stage it starts from; ``booster.stages`` owns those rules), so an aligned model is reused by
every attack on it, and a rerun skips every stage whose ``DONE.json`` exists. A stage
directory is self-describing: its config, the versions and data hashes it ran with, its
logs, plots and outputs.

The pipeline conducts: it serves the run's data, trains the alignment and the attack, and
hands evaluation to ``booster.evaluate.stage``, the time estimate to ``booster.estimate``,
tables to ``booster.report`` and curves to ``booster.plots``.

Under ``accelerate launch`` every process runs the pipeline: all of them train (DDP or
FSDP2), only the main process writes files and evaluates, and the others wait at a barrier
after each stage, so that every process agrees on which stages are done.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from booster.attack import poisoned_set
from booster.config import ConfigError, ExperimentConfig, expand_grid, flatten, get_dotted, to_dict, to_yaml, varied_keys
from booster.data import safety
from booster.data.base import DataError, Example, resolve_data_dir
from booster.data.prompts import load_prompt_file, seen_in_training
from booster.data.tasks import get_task
from booster.defenses import DEFENSES, make_defense
from booster.distributed import DistributedError, check_supported, gathered_state, make_accelerator
from booster.estimate import KIND_NAMES, RunTimer, StageWork, measure_run, say, stage_work
from booster.evaluate.generate import vllm_available
from booster.evaluate.judges import Judge, make_judge
from booster.evaluate.probe import loss_probe
from booster.evaluate.stage import empty_rate, judged, score_by_source, write_answers
from booster.io import (atomic_dir, atomic_write_json, atomic_write_text, environment_info, file_sha256, read_jsonl,
                        rewrite_jsonl, stable_hash, write_csv)
from booster.models import DtypeChoice, ModelRecipe, build_model, load_tokenizer, resolve_dtype, save_trained
from booster.plots import plot_alignment_curves, plot_attack_curves, plot_log
from booster.report import write_report
from booster.results import OWN_COLUMNS, ResultRow, result_row
from booster.stages import (StageResult, align_payload, attack_drop, attack_payload, base_key, eval_payload, is_done,
                            payloads, stage_dir)
from booster.text import encode_pair
from booster.tracking import missing_packages, tracked, tracker_names
from booster.train import Stream, fit, total_steps

log = logging.getLogger("booster")

SAFETY_FILES = ("safety/refusals.json", "safety/harmful_qa.json", "safety/hh_rlhf_harmless_test.jsonl.gz",
                "safety/advbench.prompt.yaml")
"""What every stage reads; each task adds its own (``Task.files``)."""


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Pipeline:
    """Runs the stages of one experiment config (every point of its grid)."""

    def __init__(self, cfg: ExperimentConfig, data_dir: str | None = None):
        self.cfg = cfg
        self.root = Path(cfg.run.out_dir)
        self.data_dir = resolve_data_dir(data_dir or cfg.data.dir)
        self._cache: dict[Any, Any] = {}
        self.rows: list[ResultRow] = []
        self.chains: list[dict[str, Any]] = []
        self.points: list[ExperimentConfig] = []
        """The grid being run: attacks that differ only in length share one training run."""
        self.timer: RunTimer | None = None
        """The run's time estimate, per stage still to run (``estimate``)."""
        self.dtypes: dict[str, DtypeChoice] = {}
        """model.dtype as each grid point resolved it (by the resolved name), for meta.json."""

    # ---------------------------------------------------------------- shared resources
    @cached_property
    def accelerator(self) -> Any:
        return make_accelerator()

    def tracked(self, stage: str, payload: dict[str, Any]) -> Any:
        """The run's experiment trackers (run.log_with) around one stage's training."""
        return tracked(self.accelerator, tracker_names(self.cfg.run.log_with), self.root / "tracking", stage,
                       flatten(payload))

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _check_launch(self, points: list[ExperimentConfig]) -> None:
        """Refuse, before any stage runs, a launch some grid point could not train correctly."""
        n = self.accelerator.num_processes
        for cfg in points:
            for name, optim in ((cfg.align.defense, cfg.align.optim), (cfg.attack.defense, cfg.attack.optim)):
                if name in DEFENSES:
                    check_supported(self.accelerator, name, DEFENSES[name].passes, optim.grad_accum)
                if optim.batch_size % n:
                    raise DistributedError(f"optim.batch_size={optim.batch_size} is the global micro-batch and cannot "
                                           f"be split evenly over {n} processes; make it a multiple of {n}")

    def _memo(self, key: Any, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def tokenizer(self, cfg: ExperimentConfig) -> Any:
        return self._memo(("tok", stable_hash(to_dict(cfg.model))), lambda: load_tokenizer(cfg.model))

    def safety(self, cfg: ExperimentConfig) -> safety.SafetyData:
        d = cfg.data
        kwargs = dict(n_align=d.n_align, n_harmful=d.n_harmful, n_probe=d.n_probe, seed=d.split_seed)
        if d.source == "hub":
            return self._memo(("safety", "hub", *kwargs.values()), lambda: safety.load_beavertails(**kwargs))
        return self._memo(("safety", *kwargs.values()), lambda: safety.load_local(self.data_dir, **kwargs))

    def task_pool(self, cfg: ExperimentConfig) -> list[Example]:
        return self._memo(("pool", cfg.attack.task, cfg.data.source),
                          lambda: get_task(cfg.attack.task).pool(self.data_dir, cfg.data.source))

    def mix_pool(self, cfg: ExperimentConfig) -> list[Example]:
        """Where the attack's p·n mixed-in samples come from: the attacker's harmful pairs, or, for
        the benign control (attack.mix=TASK), the first half of that task's pool; alignment's
        benign examples come from the end of each pool (benign()), so the two never overlap."""
        if cfg.attack.mix == "harmful":
            return self.safety(cfg).attack_pool
        pool = self._memo(("pool", cfg.attack.mix, cfg.data.source),
                          lambda: get_task(cfg.attack.mix).pool(self.data_dir, cfg.data.source))
        return pool[:len(pool) // 2]

    def eval_prompts(self, cfg: ExperimentConfig) -> list[Example]:
        """The harmful prompts an evaluation answers: the first eval.n_harmful held-out ones,
        and/or the user's file (eval.prompts, eval.prompts_mode)."""
        held_out = self.safety(cfg).eval_prompts[:cfg.eval.n_harmful]
        if not cfg.eval.prompts:
            return held_out
        own = self._memo(("prompts", cfg.eval.prompts), lambda: load_prompt_file(cfg.eval.prompts))
        return own if cfg.eval.prompts_mode == "replace" else held_out + own

    def task_eval(self, cfg: ExperimentConfig) -> list[Example]:
        return self._memo(("task_eval", cfg.attack.task, cfg.data.source),
                          lambda: get_task(cfg.attack.task).eval_set(self.data_dir, cfg.data.source))

    def benign(self, cfg: ExperimentConfig) -> list[Example]:
        """data.n_benign task examples for alignment, evenly from data.benign_tasks; drawn from the
        end of each (fixed-order) pool, so they stay apart from the attacker's samples."""
        d = cfg.data
        if not d.n_benign:
            return []
        out: list[Example] = []
        for i, name in enumerate(d.benign_tasks):
            share = d.n_benign // len(d.benign_tasks) + (i < d.n_benign % len(d.benign_tasks))
            pool = self._memo(("pool", name, d.source), lambda: get_task(name).pool(self.data_dir, d.source))
            if share > len(pool) // 2:
                raise DataError(f"data.n_benign asks {share} examples of {name} but its pool has {len(pool)}; "
                                "lower data.n_benign")
            out += pool[len(pool) - share:]
        return out

    def encode(self, cfg: ExperimentConfig, examples: list[Example]) -> list[dict[str, list[int]]]:
        tok = self.tokenizer(cfg)
        return [encode_pair(tok, ex, cfg.model.prompt_format, cfg.model.max_length) for ex in examples]

    def judge(self, cfg: ExperimentConfig) -> Judge:
        return self._memo(("judge", cfg.eval.judge, cfg.eval.judge_path),
                          lambda: make_judge(cfg.eval.judge, cfg.eval.judge_path, data_dir=self.data_dir))

    def data_hashes(self, cfg: ExperimentConfig) -> dict[str, str]:
        """Hashes of the data files a stage of ``cfg`` reads: the safety data and the files of
        its attack task, its benign control's task and its alignment's benign tasks."""
        if cfg.data.source == "hub":
            return {"source": "hub"}
        tasks = sorted({t for t in (cfg.attack.task, cfg.attack.mix, *cfg.data.benign_tasks) if t != "harmful"})
        patterns = SAFETY_FILES + tuple(f for t in tasks for f in get_task(t).files)

        def make() -> dict[str, str]:
            paths = sorted({p for pattern in patterns for p in self.data_dir.glob(pattern) if p.is_file()})
            return {str(p.relative_to(self.data_dir)): file_sha256(p, 16) for p in paths}

        return self._memo(("data_hashes", patterns), make)

    # ---------------------------------------------------------------- stage bookkeeping
    def _streams(self, cfg: ExperimentConfig, defense: Any, main: list[Example], batch_size: int,
                 main_name: str) -> dict[str, Stream]:
        """The stage's own data as 'main', plus the alignment or harmful pairs the defence asks for."""
        pad, seed = self.tokenizer(cfg).pad_token_id, cfg.run.seed
        data = self.safety(cfg)
        sources = {"main": (main, main_name), "align": (data.align, "align"), "harmful": (data.harmful, "harmful")}
        return {name: Stream(self.encode(cfg, sources[name][0]), batch_size, pad, seed, sources[name][1])
                for name in ("main", *defense.streams) if name in sources}

    def _stage_dir(self, kind: str, payload: dict[str, Any]) -> tuple[str, Path]:
        return stage_dir(self.root, kind, payload)

    def _describe(self, d: Path, payload: dict[str, Any], cfg: ExperimentConfig) -> None:
        d.mkdir(parents=True, exist_ok=True)
        if self.main:
            atomic_write_json(d / "config.json", payload)
            atomic_write_json(d / "meta.json", {"seed": cfg.run.seed, "environment": environment_info(),
                                                "data_dir": str(self.data_dir), "data_sha256": self.data_hashes(cfg),
                                                "processes": self.accelerator.num_processes,
                                                "dtype": asdict(self._dtype_choice(cfg)),
                                                "distributed": str(self.accelerator.distributed_type)})

    def _begin(self, d: Path, payload: dict[str, Any], cfg: ExperimentConfig) -> float:
        self._describe(d, payload, cfg)
        if self.main and self.timer is not None:
            log.info(self.timer.starting(d.name))
        torch.manual_seed(cfg.run.seed)
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        return time.time()

    def _dtype_choice(self, cfg: ExperimentConfig) -> DtypeChoice:
        return self.dtypes.get(cfg.model.dtype) or resolve_dtype(cfg.model.dtype)

    def resolve_dtypes(self, points: list[ExperimentConfig]) -> list[ExperimentConfig]:
        """Each point with model.dtype resolved on this machine (auto -> bfloat16 or float32), the
        choice logged once: stages are hashed by the dtype they train in, so an auto stage is
        the stage of the explicit dtype it became, and cached stages of either stay valid."""
        out = []
        for cfg in points:
            choice = resolve_dtype(cfg.model.dtype)
            if choice.resolved not in self.dtypes:
                (log.warning if choice.emulated else log.info)(choice.message())
            self.dtypes[choice.resolved] = choice
            cfg = copy.deepcopy(cfg)
            cfg.model.dtype = choice.resolved
            out.append(cfg)
        return out

    @staticmethod
    def _done(d: Path) -> bool:
        return is_done(d)

    def _finish(self, d: Path, started: float, **info: Any) -> None:
        """Mark a stage done (main process only; callers on every process then wait at a barrier)."""
        if self.main:
            shutil.rmtree(d / "checkpoint", ignore_errors=True)
            atomic_write_json(d / "DONE.json", {"seconds": round(time.time() - started, 1), **info})
            if self.timer is not None:
                self.timer.finished(d.name, time.time() - started)

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _save_model(self, model: Any, d: Path, full: bool) -> None:
        """Every process calls this (FSDP2 gathers the shards); the main process writes."""
        state = gathered_state(self.accelerator, model, full)
        if self.main:
            with atomic_dir(d / "model") as tmp:
                save_trained(model, tmp, full, state_dict=state)

    def _write_logs(self, d: Path, title: str) -> None:
        if not self.main:
            return
        for name in ("train_log", "probe_log"):
            rows = read_jsonl(d / f"{name}.jsonl")
            if rows:
                write_csv(d / f"{name}.csv", rows)
                plot_log(rows, d / f"{name}.png", title=f"{title} ({name.replace('_', ' ')})")

    # ---------------------------------------------------------------- stages
    def base(self, cfg: ExperimentConfig) -> StageResult:
        return StageResult(key=base_key(cfg), recipe=ModelRecipe())

    def align(self, cfg: ExperimentConfig) -> StageResult:
        if cfg.align.defense == "none":
            return self.base(cfg)
        payload = align_payload(cfg)
        key, d = self._stage_dir("align", payload)
        full = cfg.model.finetune == "full"
        recipe = ModelRecipe(weights=self._rel(d / "model") if full else None,
                             adapter=None if full else self._rel(d / "model"))
        if self._done(d):
            return StageResult(key, recipe, d)
        started = self._begin(d, payload, cfg)
        log.info("align %s -> %s", cfg.align.defense, d)
        with self.accelerator.main_process_first():  # downloads and caches: once, by the main process
            tok = self.tokenizer(cfg)
            data = self.safety(cfg)
            model = build_model(cfg.model, tok, ModelRecipe(), self.root, train="full" if full else "new_lora")
        defense = make_defense(cfg.align.defense, cfg.align)
        streams = self._streams(cfg, defense, data.align + self.benign(cfg), cfg.align.optim.batch_size, "align")
        probes = {"harmful_loss": loss_probe(self.encode(cfg, data.probe), tok.pad_token_id)}
        if data.align_probe:  # as many as the harmful probe: a probe costs a forward pass per example
            probes["align_loss"] = loss_probe(self.encode(cfg, data.align_probe[:cfg.data.n_probe]), tok.pad_token_id)
        steps = total_steps(cfg.align.optim, len(streams["main"]))
        with self.tracked(f"{d.name}-{cfg.align.defense}", payload):
            fit(model, defense, streams, cfg.align.optim, d, accelerator=self.accelerator, steps=steps,
                desc=f"align {cfg.align.defense}", probes=probes, probe_every=cfg.align.eval_every)
        self._save_model(model, d, full)
        if self.main:
            recipe.save(d / "recipe.json")
        self._write_logs(d, f"alignment: {cfg.align.defense}")
        self._finish(d, started, steps=steps)
        self.accelerator.wait_for_everyone()
        return StageResult(key, recipe, d)

    def _attack_recipe(self, cfg: ExperimentConfig, upstream: StageResult, d: Path) -> tuple[str, ModelRecipe]:
        up = upstream.recipe
        if cfg.model.finetune == "full":
            return "full", ModelRecipe(weights=self._rel(d / "model"))
        if cfg.attack.adapter == "single" and up.adapter:
            return "continue", ModelRecipe(up.weights, list(up.merged), self._rel(d / "model"))
        merged = list(up.merged) + ([up.adapter] if up.adapter else [])
        return "new_lora", ModelRecipe(up.weights, merged, self._rel(d / "model"))

    def _same_attack_other_length(self, cfg: ExperimentConfig) -> list[ExperimentConfig]:
        """Grid points whose attack is this one run for another number of steps. Under a constant
        learning rate the shorter ones are, to the bit, the first steps of the longest (the data
        stream is fixed by the seed), so one run of the longest gives them all. Attack-time
        defences are left out: Lisa's schedule depends on the total length."""
        if cfg.attack.optim.schedule != "constant" or cfg.attack.defense != "sft" or cfg.attack.optim.steps is None:
            return []

        def without_length(c: ExperimentConfig) -> str:
            attack = copy.deepcopy(payloads(c)["attack"])
            attack.get("optim", {}).pop("steps", None)
            return stable_hash({"align": align_payload(c), "attack": attack})

        mine = without_length(cfg)  # equal hashes: same defence, schedule and all but the length
        return [c for c in self.points if c.attack.optim.steps not in (None, cfg.attack.optim.steps)
                and without_length(c) == mine]

    def _snapshot(self, cfg: ExperimentConfig, upstream: StageResult, long_dir: Path, started: float,
                  model: Any, step: int) -> None:
        """Write the stage of the ``step``-step attack ``cfg`` from the longer run at that step,
        as that attack run on its own would have written it (every process calls this)."""
        payload = attack_payload(cfg, upstream)
        _, d = self._stage_dir("attack", payload)
        mode, recipe = self._attack_recipe(cfg, upstream, d)
        self._describe(d, payload, cfg)
        if self.main:
            shutil.copy2(long_dir / "train_set.csv", d / "train_set.csv")
            for name, last in (("train_log", step - 1), ("probe_log", step)):  # train rows count from 0
                rewrite_jsonl(d / f"{name}.jsonl", [r for r in read_jsonl(long_dir / f"{name}.jsonl")
                                                    if r["step"] <= last])
        self._save_model(model, d, cfg.model.finetune == "full")
        if self.main:
            recipe.save(d / "recipe.json")
        self._write_logs(d, f"attack p={cfg.attack.p} on {upstream.key}")
        self._finish(d, started, steps=step, protocol=mode, snapshot_of=long_dir.name)
        self.accelerator.wait_for_everyone()

    def attack(self, cfg: ExperimentConfig, upstream: StageResult) -> StageResult:
        payload = attack_payload(cfg, upstream)
        key, d = self._stage_dir("attack", payload)
        full = cfg.model.finetune == "full"
        up = upstream.recipe
        mode, recipe = self._attack_recipe(cfg, upstream, d)
        if self._done(d):
            return StageResult(key, recipe, d)
        others = self._same_attack_other_length(cfg)
        longest = max(others, key=lambda c: c.attack.optim.steps, default=None)
        if longest is not None and longest.attack.optim.steps > cfg.attack.optim.steps:
            log.info("attack of %d steps: taken from the %d-step run of the same attack",
                     cfg.attack.optim.steps, longest.attack.optim.steps)
            self.attack(longest, upstream)
            if self._done(d):  # else the longer run resumed past this length: train it on its own
                return StageResult(key, recipe, d)
        started = self._begin(d, payload, cfg)
        log.info("attack p=%s on %s -> %s", cfg.attack.p, upstream.key, d)
        with self.accelerator.main_process_first():  # downloads and caches: once, by the main process
            tok = self.tokenizer(cfg)
            data = self.safety(cfg)
            pool = self.task_pool(cfg)
            model = build_model(cfg.model, tok, up, self.root, train=mode)
        train_set = poisoned_set(pool, self.mix_pool(cfg), n=cfg.attack.n, p=cfg.attack.p, seed=cfg.run.seed)
        if self.main:
            write_csv(d / "train_set.csv", [{"source": ex.source, "prompt": ex.prompt, "response": ex.response}
                                            for ex in train_set])
        defense = make_defense(cfg.attack.defense, cfg.attack)
        streams = self._streams(cfg, defense, train_set, cfg.attack.optim.batch_size, "attack")
        probes = {"harmful_loss": loss_probe(self.encode(cfg, data.probe), tok.pad_token_id)}
        steps = total_steps(cfg.attack.optim, len(train_set))
        snapshots = {}
        for c in others:
            c_dir = self._stage_dir("attack", attack_payload(c, upstream))[1]
            if c.attack.optim.steps < steps and not self._done(c_dir):
                snapshots[c.attack.optim.steps] = (lambda s, c=c: self._snapshot(c, upstream, d, started, model, s))
        with self.tracked(f"{d.name}-p{cfg.attack.p}", payload):
            fit(model, defense, streams, cfg.attack.optim, d, accelerator=self.accelerator, steps=steps,
                desc=f"attack p={cfg.attack.p}", probes=probes, probe_every=cfg.attack.probe_every,
                snapshots=snapshots)
        self._save_model(model, d, full)
        if self.main:
            recipe.save(d / "recipe.json")
        self._write_logs(d, f"attack p={cfg.attack.p} on {upstream.key}")
        self._finish(d, started, steps=steps, protocol=mode)
        self.accelerator.wait_for_everyone()
        return StageResult(key, recipe, d)

    def evaluate(self, cfg: ExperimentConfig, upstream: StageResult, labels: dict[str, Any]) -> ResultRow | dict:
        payload = eval_payload(cfg, upstream.key)
        key, d = self._stage_dir("eval", payload)
        # The main process generates and judges; the others wait (a long collective timeout: make_accelerator).
        if self.main and not self._done(d):
            self._run_eval(cfg, upstream, payload, d)
        self.accelerator.wait_for_everyone()
        if not self.main:
            return {}
        metrics = judged(self.judge(cfg), d)
        row = result_row(labels, metrics, empty_rate(d), self._rel(d), score_by_source(d, metrics))
        self.rows = [r for r in self.rows if r["eval_dir"] != row["eval_dir"]] + [row]
        return row

    def _run_eval(self, cfg: ExperimentConfig, upstream: StageResult, payload: dict[str, Any], d: Path) -> None:
        started = self._begin(d, payload, cfg)
        log.info("evaluate %s -> %s", upstream.key, d)
        write_answers(cfg, upstream.recipe, self.root, self.accelerator.device, self.tokenizer(cfg),
                      self.eval_prompts(cfg), self.task_eval(cfg)[:cfg.eval.n_task], d,
                      upstream.key)
        self._finish(d, started)

    # ---------------------------------------------------------------- whole experiment
    def preflight(self, points: list[ExperimentConfig]) -> None:
        """Check what can be checked cheaply before any training: model sources, tokenizers and
        their templates, data files and split sizes, the poisoned set of every attack, defence
        settings that depend on the stage length. Raises the one-line error of the first problem."""
        from booster.attack import poisoned_set
        from booster.defenses import DEFENSES
        from booster.models import resolve_source

        missing = missing_packages(tracker_names(self.cfg.run.log_with))
        if missing:
            raise ConfigError(f"run.log_with={self.cfg.run.log_with} needs {missing[0]}; install it or set "
                              "run.log_with=none")
        for cfg in points:
            resolve_source(cfg.model)
            data = self.safety(cfg)
            if (not cfg.eval.prompts or cfg.eval.prompts_mode == "add") and cfg.eval.n_harmful > len(data.eval_prompts):
                raise DataError(f"eval.n_harmful={cfg.eval.n_harmful} but only {len(data.eval_prompts)} held-out "
                                "harmful prompts exist; lower eval.n_harmful")
            self.task_eval(cfg)
            if cfg.eval.prompts:
                prompts = self.eval_prompts(cfg)
                seen = seen_in_training(prompts, data.align + data.harmful + data.attack_pool)
                if seen:
                    log.warning("eval.prompts: %d of the %d prompts of %s are among this run's training prompts; "
                                "their answers measure memory as much as safety", seen, len(prompts), cfg.eval.prompts)
            if cfg.eval.engine == "vllm" and not (torch.cuda.is_available() and vllm_available()):
                raise DataError("eval.engine=vllm needs a GPU and the vllm package; use eval.engine=hf here")
            if cfg.attack.task in cfg.data.benign_tasks and cfg.data.n_benign:
                raise DataError(f"data.benign_tasks contains the attack's task {cfg.attack.task}: alignment would "
                                "pre-train the user's task; drop it from data.benign_tasks")
            benign = self.benign(cfg)
            problems = []  # each defence checks the settings that depend on its stage's length
            if cfg.align.defense in DEFENSES:
                steps = total_steps(cfg.align.optim, len(data.align) + len(benign))
                problems.append(DEFENSES[cfg.align.defense].length_problem(cfg.align, steps))
            if cfg.attack.enabled:
                poisoned_set(self.task_pool(cfg), self.mix_pool(cfg), n=cfg.attack.n, p=cfg.attack.p, seed=0)
                steps = total_steps(cfg.attack.optim, cfg.attack.n)
                problems.append(DEFENSES[cfg.attack.defense].length_problem(cfg.attack, steps))
            if any(problems):
                raise DataError(next(p for p in problems if p))
            if cfg.align.defense in DEFENSES and "harmful" in DEFENSES[cfg.align.defense].streams and not data.harmful:
                raise DataError(f"align.defense={cfg.align.defense} needs harmful pairs; set data.n_harmful >= 1")
        for cfg in {base_key(c): c for c in points}.values():
            self.tokenizer(cfg)

    def run(self, until: str = "evaluate") -> list[dict[str, Any]]:
        """Every grid point: (controls) -> align -> attack -> evaluate, up to stage ``until``."""
        points = self.resolve_dtypes(expand_grid(self.cfg))
        self.points = points
        self.preflight(points)
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_launch(points)
        if self.main:
            atomic_write_text(self.root / "config.yaml", to_yaml(self.cfg))
            if self.cfg.run.estimate:
                self.estimate(points, until)
        started = time.time()
        for i, cfg in enumerate(points, 1):
            log.info("grid point %d/%d: %s", i, len(points),
                     ", ".join(f"{k}={get_dotted(cfg, k)}" for k in varied_keys(self.cfg)) or "(no grid)")
            chain = self._run_point(cfg, until)
            if chain:
                self.chains = [c for c in self.chains if c["point"] != chain["point"]] + [chain]
            elapsed = time.time() - started
            log.info("sweep: %d/%d points done, %s elapsed, about %s left", i, len(points),
                     _hms(elapsed), _hms(elapsed / i * (len(points) - i)))
        if until == "evaluate" and self.main:
            self.report()
        return self.rows

    def plan(self, points: list[ExperimentConfig], until: str = "evaluate") -> list[tuple[str, Path, ExperimentConfig]]:
        """The stages ``run`` will train or evaluate and that are not done yet, in order, each
        once: (kind, directory, the config of the first point that runs it). The chain is
        ``_run_point``'s: unaligned control, alignment, aligned control, attack, evaluation."""
        stages: dict[Path, tuple[str, Path, ExperimentConfig]] = {}

        def add(kind: str, payload: dict[str, Any], cfg: ExperimentConfig) -> str:
            key, d = self._stage_dir(kind, payload)
            stages.setdefault(d, (kind, d, cfg))
            return key

        evaluate = until == "evaluate"
        for cfg in points:
            controls = evaluate and cfg.run.controls
            base = self.base(cfg).key
            if controls:
                add("eval", eval_payload(cfg, base), cfg)
            aligned = base if cfg.align.defense == "none" else add("align", align_payload(cfg), cfg)
            if until == "align":
                continue
            if controls and cfg.align.defense != "none":
                add("eval", eval_payload(cfg, aligned), cfg)
            if not cfg.attack.enabled:
                continue
            attacked = add("attack", attack_payload(cfg, StageResult(aligned, ModelRecipe())), cfg)
            if evaluate:
                add("eval", eval_payload(cfg, attacked), cfg)
        return [s for s in stages.values() if not self._done(s[1])]

    def _stage_work(self, kind: str, cfg: ExperimentConfig) -> StageWork:
        longer = kind == "attack" and any(c.attack.optim.steps > cfg.attack.optim.steps
                                          for c in self._same_attack_other_length(cfg))
        # saved on the way by the longer run of the same attack: no work of its own
        return StageWork(kind) if longer else stage_work(kind, cfg, self)

    def estimate(self, points: list[ExperimentConfig], until: str = "evaluate") -> float | None:
        """Log how long the stages still to run will take here, before running them; keep the
        per-stage estimates so each stage's start logs the time left (``RunTimer``)."""
        todo = self.plan(points, until)
        if not todo:
            return None
        if self.accelerator.num_processes > 1 or any(c.eval.engine == "vllm" for _, _, c in todo):
            log.info("estimate: skipped (several processes or vLLM; it times a single process)")
            return None
        t0 = time.time()
        rates = measure_run(todo[0][2], self, self.accelerator.device, self.root)
        work = {d.name: self._stage_work(kind, cfg) for kind, d, cfg in todo}
        self.timer = RunTimer({k: w.seconds(rates) for k, w in work.items()})
        total = self.timer.left()
        by_kind = {}
        for kind, d, _ in todo:
            by_kind.setdefault(kind, []).append(self.timer.estimates[d.name])
        parts = ", ".join(f"{len(v)} {KIND_NAMES[k]} {say(sum(v)).replace('about ', '~')}" for k, v in by_kind.items())
        log.info("estimate: %d stages to run, %s on this machine (%s; measured in %.0f s: %.2f ms per token "
                 "trained, %.0f ms per decoding step of %d answers)", len(todo), say(total), parts, time.time() - t0,
                 1e3 * rates.train_token_s, 1e3 * rates.decode_step_s, todo[0][2].eval.batch_size)
        if self.judge_missing(todo[0][2]):
            log.info("estimate: plus the judge's one-time build before the first evaluation (10-15 min on 2 CPU "
                     "cores)")
        return total

    def judge_missing(self, cfg: ExperimentConfig) -> bool:
        if cfg.eval.judge != "classifier" or cfg.eval.judge_path:
            return False
        from booster.evaluate.classifier import JUDGE_FILE, ClassifierSettings, default_dir

        return not (default_dir(ClassifierSettings(), self.data_dir) / JUDGE_FILE).is_file()

    def _run_point(self, cfg: ExperimentConfig, until: str) -> dict[str, Any] | None:
        grid = {k: get_dotted(cfg, k) for k in varied_keys(self.cfg)}

        def labels(stage: str, prefixes: tuple[str, ...]) -> dict[str, Any]:
            # a control row carries only the grid values that decide it (it is shared across the rest)
            relevant = {k: v for k, v in grid.items() if k.startswith(prefixes) and k not in OWN_COLUMNS}
            return {"stage": stage, "task": cfg.attack.task, **relevant}

        evaluate = until == "evaluate"
        chain: dict[str, Any] = {"point": grid}
        if evaluate and cfg.run.controls:
            row = self.evaluate(cfg, self.base(cfg), {"defense": "none", **labels("unaligned", ("model.", "data.",
                                                                                               "eval."))})
            chain["unaligned"] = row.get("eval_dir")
        aligned = self.align(cfg)
        if until == "align":
            return None
        if evaluate and cfg.run.controls and cfg.align.defense != "none":
            row = self.evaluate(cfg, aligned, {"defense": cfg.align.defense, "seed": cfg.run.seed,
                                               **labels("aligned", ("model.", "data.", "eval.", "align."))})
            chain["aligned"] = row.get("eval_dir")
        if not cfg.attack.enabled:
            return chain if evaluate else None
        attacked = self.attack(cfg, aligned)
        if not evaluate:
            return None
        defense = cfg.align.defense if cfg.attack.defense == "sft" else f"{cfg.align.defense}+{cfg.attack.defense}"
        # a stage shared by several grid points (p=0 for every attack.mix) carries none of what they vary
        dropped = attack_drop(cfg)
        attacked_labels = {k: v for k, v in labels("attacked", ("",)).items()
                           if not (k.startswith("attack.") and k.split(".")[1] in dropped)}
        row = self.evaluate(cfg, attacked, {"defense": defense, "seed": cfg.run.seed, "p": cfg.attack.p,
                                            "n": cfg.attack.n, "adapter": cfg.attack.adapter, **attacked_labels})
        chain["attacked"] = row.get("eval_dir")
        return chain

    def report(self) -> str:
        """results.md/.csv/.jsonl, the controls table when the grid varies attack.p, plots."""
        rewrite_jsonl(self.root / "results.jsonl", self.rows)
        rewrite_jsonl(self.root / "chains.jsonl", self.chains)
        return write_report(self.root, self.cfg, self.rows, self.chains, self.judge(self.cfg).describe()) + \
            plot_attack_curves(self.root) + plot_alignment_curves(self.root)

