"""align -> attack -> evaluate, each stage cached under <out_dir>/stages/<kind>-<hash>.

A stage's hash covers exactly the settings that decide its output (and the hash of the
stage it starts from; ``booster.stages`` owns those rules), so an aligned model is reused by
every attack on it, and a rerun skips every stage whose ``DONE.json`` exists. A stage
directory is self-describing: its config, the versions and data hashes it ran with, its
logs, plots and outputs.

The pipeline conducts: it trains the alignment and the attack on the data its
``booster.rundata.DataServer`` serves, and hands the checks before training to
``booster.preflight``, evaluation to ``booster.evaluate.stage``, the time estimate to
``booster.estimate``, tables to ``booster.report`` and curves to ``booster.plots``.

Under ``accelerate launch`` every process runs the pipeline: all of them train (DDP or
FSDP2), only the main process writes files and evaluates, and the others wait at a barrier
after each stage, so that every process agrees on which stages are done.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from booster.attack import poisoned_set
from booster.config import ExperimentConfig, expand_grid, flatten, get_dotted, to_yaml, varied_keys
from booster.data.base import resolve_data_dir
from booster.defenses import make_defense
from booster.distributed import gathered_state, make_accelerator
from booster.estimate import RunTimer, StageWork, estimate_run, stage_work
from booster.evaluate.generate import eval_batch_size
from booster.evaluate.judges import Judge, judge_class, make_judge
from booster.evaluate.probe import loss_probe
from booster.evaluate.stage import empty_rate, judged, score_by_source, write_answers
from booster.io import (atomic_dir, atomic_write_json, atomic_write_text, environment_info, read_jsonl, rewrite_jsonl,
                        write_csv)
from booster.models import (DtypeChoice, ModelRecipe, build_model, default_device_type, resolve_dtype, resolve_dtypes,
                            save_trained)
from booster.plots import plot_alignment_curves, plot_attack_curves, write_stage_logs
from booster.preflight import check_launch, preflight
from booster.report import write_report
from booster.results import OWN_COLUMNS, ResultRow, result_row
from booster.rundata import DataServer
from booster.stages import (StageResult, align_payload, attack_drop, attack_payload, attack_recipe, base_key,
                            eval_payload, is_done, same_attack_other_length, stage_dir)
from booster.tracking import tracked, tracker_names
from booster.train import fit, total_steps

log = logging.getLogger("booster")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Pipeline:
    """Runs the stages of one experiment config (every point of its grid)."""

    def __init__(self, cfg: ExperimentConfig, data_dir: str | None = None):
        self.cfg = cfg
        self.root = Path(cfg.run.out_dir)
        self.data_dir = resolve_data_dir(data_dir or cfg.data.dir)
        self.data = DataServer(self.data_dir)
        """The run's data, loaded once for every grid point (``booster.rundata``)."""
        self.rows: list[ResultRow] = []
        self.chains: list[dict[str, Any]] = []
        self.points: list[ExperimentConfig] = []
        """The grid being run: attacks that differ only in length share one training run."""
        self.timer: RunTimer | None = None
        """The run's time estimate, per stage still to run (``estimate``)."""
        self.dtypes: dict[str, DtypeChoice] = {}
        """model.dtype as each grid point resolved it (by the resolved name), for meta.json."""
        self.eval_batches: set[int] = set()
        """The eval.batch_size values an unset one became (each logged once)."""

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

    def judge(self, cfg: ExperimentConfig) -> Judge:
        return self.data.memo(("judge", cfg.eval.judge, cfg.eval.judge_path),
                              lambda: make_judge(cfg.eval.judge, cfg.eval.judge_path, data_dir=self.data_dir))

    # ---------------------------------------------------------------- stage bookkeeping
    def _stage_dir(self, kind: str, payload: dict[str, Any]) -> tuple[str, Path]:
        return stage_dir(self.root, kind, payload)

    def _describe(self, d: Path, payload: dict[str, Any], cfg: ExperimentConfig) -> None:
        d.mkdir(parents=True, exist_ok=True)
        if self.main:
            atomic_write_json(d / "config.json", payload)
            atomic_write_json(d / "meta.json", {"seed": cfg.run.seed, "environment": environment_info(),
                                                "data_dir": str(self.data_dir),
                                                "data_sha256": self.data.data_hashes(cfg),
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
        """Each point with model.dtype resolved on this machine (``booster.models.resolve_dtypes``),
        then an unset eval.batch_size from it (``booster.evaluate.generate.eval_batch_size``)."""
        points = resolve_dtypes(points, self.dtypes)
        device_type = default_device_type()
        for cfg in points:
            if cfg.eval.batch_size is None:
                cfg.eval.batch_size = eval_batch_size(cfg.model.dtype, device_type)
                if cfg.eval.batch_size not in self.eval_batches:
                    log.info("eval.batch_size unset -> %d (%s on %s)", cfg.eval.batch_size, cfg.model.dtype,
                             device_type)
                self.eval_batches.add(cfg.eval.batch_size)
        return points

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
        if self.main:
            write_stage_logs(d, title)

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
            tok = self.data.tokenizer(cfg)
            data = self.data.safety(cfg)
            model = build_model(cfg.model, tok, ModelRecipe(), self.root, train="full" if full else "new_lora")
        defense = make_defense(cfg.align.defense, cfg.align)
        streams = self.data.streams(cfg, defense, data.align + self.data.benign(cfg), cfg.align.optim.batch_size,
                                    "align")
        probes = {"harmful_loss": loss_probe(self.data.encode(cfg, data.probe), tok.pad_token_id)}
        if data.align_probe:  # as many as the harmful probe: a probe costs a forward pass per example
            probes["align_loss"] = loss_probe(self.data.encode(cfg, data.align_probe[:cfg.data.n_probe]),
                                              tok.pad_token_id)
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

    def _snapshot(self, cfg: ExperimentConfig, upstream: StageResult, long_dir: Path, started: float,
                  model: Any, step: int) -> None:
        """Write the stage of the ``step``-step attack ``cfg`` from the longer run at that step,
        as that attack run on its own would have written it (every process calls this)."""
        payload = attack_payload(cfg, upstream)
        _, d = self._stage_dir("attack", payload)
        mode, recipe = attack_recipe(cfg, upstream, self._rel(d / "model"))
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
        mode, recipe = attack_recipe(cfg, upstream, self._rel(d / "model"))
        if self._done(d):
            return StageResult(key, recipe, d)
        others = same_attack_other_length(cfg, self.points)
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
            tok = self.data.tokenizer(cfg)
            data = self.data.safety(cfg)
            pool = self.data.task_pool(cfg)
            model = build_model(cfg.model, tok, up, self.root, train=mode)
        train_set = poisoned_set(pool, self.data.mix_pool(cfg), n=cfg.attack.n, p=cfg.attack.p, seed=cfg.run.seed)
        if self.main:
            write_csv(d / "train_set.csv", [{"source": ex.source, "prompt": ex.prompt, "response": ex.response}
                                            for ex in train_set])
        defense = make_defense(cfg.attack.defense, cfg.attack)
        streams = self.data.streams(cfg, defense, train_set, cfg.attack.optim.batch_size, "attack")
        probes = {"harmful_loss": loss_probe(self.data.encode(cfg, data.probe), tok.pad_token_id)}
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
        write_answers(cfg, upstream.recipe, self.root, self.accelerator.device, self.data.tokenizer(cfg),
                      self.data.eval_prompts(cfg), self.data.task_eval(cfg)[:cfg.eval.n_task], d,
                      upstream.key)
        self._finish(d, started)

    # ---------------------------------------------------------------- whole experiment
    def preflight(self, points: list[ExperimentConfig]) -> None:
        """Check what can be checked cheaply before any training (``booster.preflight``)."""
        preflight(self.cfg, points, self.data)

    def run(self, until: str = "evaluate") -> list[dict[str, Any]]:
        """Every grid point: (controls) -> align -> attack -> evaluate, up to stage ``until``."""
        points = self.resolve_dtypes(expand_grid(self.cfg))
        self.points = points
        self.preflight(points)
        self.root.mkdir(parents=True, exist_ok=True)
        check_launch(self.accelerator, points)
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
            if until == "evaluate" and self.main:  # a long sweep keeps what it finished: `booster report` reads it
                self.save_rows()
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
                                          for c in same_attack_other_length(cfg, self.points))
        # saved on the way by the longer run of the same attack: no work of its own
        return StageWork(kind) if longer else stage_work(kind, cfg, self.data)

    def estimate(self, points: list[ExperimentConfig], until: str = "evaluate") -> float | None:
        """Log how long the stages still to run will take here, before running them; keep the
        per-stage estimates so each stage's start logs the time left (``RunTimer``)."""
        todo = self.plan(points, until)
        if todo:
            self.timer = estimate_run(todo, self.data, self.accelerator, self.root, self._stage_work,
                                      self.judge_missing)
        return self.timer.left() if todo and self.timer else None

    def judge_missing(self, cfg: ExperimentConfig) -> bool:
        return judge_class(cfg.eval.judge).build_pending(cfg.eval.judge_path, self.data_dir)

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

    def save_rows(self) -> None:
        """results.jsonl and chains.jsonl: what `booster report` builds the tables from."""
        rewrite_jsonl(self.root / "results.jsonl", self.rows)
        rewrite_jsonl(self.root / "chains.jsonl", self.chains)

    def report(self) -> str:
        """results.md/.csv/.jsonl, the controls table when the grid varies attack.p, plots."""
        self.save_rows()
        return write_report(self.root, self.cfg, self.rows, self.chains, self.judge(self.cfg).describe()) + \
            plot_attack_curves(self.root) + plot_alignment_curves(self.root)

