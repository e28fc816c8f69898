"""align -> attack -> evaluate, each stage cached under <out_dir>/stages/<kind>-<hash>.

A stage's hash covers exactly the settings that decide its output (and the hash of the
stage it starts from), so an aligned model is reused by every attack on it, and a rerun
skips every stage whose ``DONE.json`` exists. A stage directory is self-describing: its
config, the versions and data hashes it ran with, its logs, plots and outputs.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from booster.attack import poisoned_set
from booster.config import ExperimentConfig, expand_grid, to_dict, to_yaml
from booster.data import safety
from booster.data.base import Example, resolve_data_dir
from booster.data.tasks import get_task
from booster.defenses import make_defense
from booster.evaluate.generate import generate
from booster.evaluate.judges import Judge, make_judge
from booster.evaluate.probe import loss_probe
from booster.io import (append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, environment_info,
                        file_sha256, read_json, read_jsonl, rewrite_jsonl, stable_hash, write_csv)
from booster.models import ModelRecipe, build_model, load_tokenizer, save_trained
from booster.refusal import is_refusal
from booster.report import plot_log, plot_series, write_results
from booster.text import encode_pair
from booster.train import Stream, fit, total_steps

log = logging.getLogger("booster")

STAGE_VERSION = 1
"""Bump when a change alters what a stage computes, so old cached stages are not reused."""

DATA_FILES = ("safety/refusals.json", "safety/harmful_qa.json", "safety/hh_rlhf_harmless_test.jsonl.gz",
              "safety/advbench.prompt.yaml", "sst2/train.tsv", "sst2/dev.tsv")


@dataclass
class StageResult:
    key: str
    recipe: ModelRecipe
    dir: Path | None = None


def _data_payload(cfg: ExperimentConfig) -> dict[str, Any]:
    data = to_dict(cfg.data)
    data.pop("dir")  # where the data lives does not change what it is; file hashes are in meta.json
    return data


class Pipeline:
    """Runs the stages of one experiment config (every point of its grid)."""

    def __init__(self, cfg: ExperimentConfig, data_dir: str | None = None):
        self.cfg = cfg
        self.root = Path(cfg.run.out_dir)
        self.data_dir = resolve_data_dir(data_dir or cfg.data.dir)
        self._cache: dict[Any, Any] = {}
        self.rows: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- shared resources
    @cached_property
    def accelerator(self) -> Any:
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available())

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

    def task_eval(self, cfg: ExperimentConfig) -> list[Example]:
        return self._memo(("task_eval", cfg.attack.task, cfg.data.source),
                          lambda: get_task(cfg.attack.task).eval_set(self.data_dir, cfg.data.source))

    def encode(self, cfg: ExperimentConfig, examples: list[Example]) -> list[dict[str, list[int]]]:
        tok = self.tokenizer(cfg)
        return [encode_pair(tok, ex, cfg.model.prompt_format, cfg.model.max_length) for ex in examples]

    def judge(self, cfg: ExperimentConfig) -> Judge:
        return self._memo(("judge", cfg.eval.judge, cfg.eval.judge_path),
                          lambda: make_judge(cfg.eval.judge, cfg.eval.judge_path, data_dir=self.data_dir))

    @cached_property
    def data_hashes(self) -> dict[str, str]:
        if self.cfg.data.source == "hub":
            return {"source": "hub"}
        return {rel: file_sha256(self.data_dir / rel, 16) for rel in DATA_FILES if (self.data_dir / rel).is_file()}

    # ---------------------------------------------------------------- stage bookkeeping
    def _stage_dir(self, kind: str, payload: dict[str, Any]) -> tuple[str, Path]:
        key = f"{kind}-{stable_hash({'v': STAGE_VERSION, **payload})}"
        return key, self.root / "stages" / key

    def _begin(self, d: Path, payload: dict[str, Any], cfg: ExperimentConfig) -> float:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "config.json", payload)
        atomic_write_json(d / "meta.json", {"seed": cfg.run.seed, "environment": environment_info(),
                                            "data_dir": str(self.data_dir), "data_sha256": self.data_hashes})
        torch.manual_seed(cfg.run.seed)
        from accelerate.utils import set_seed

        set_seed(cfg.run.seed)
        return time.time()

    @staticmethod
    def _done(d: Path) -> bool:
        return (d / "DONE.json").is_file()

    @staticmethod
    def _finish(d: Path, started: float, **info: Any) -> None:
        shutil.rmtree(d / "checkpoint", ignore_errors=True)
        atomic_write_json(d / "DONE.json", {"seconds": round(time.time() - started, 1), **info})

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _save_model(self, model: Any, d: Path, full: bool) -> None:
        with atomic_dir(d / "model") as tmp:
            save_trained(model, tmp, full)

    def _write_logs(self, d: Path, title: str) -> None:
        for name in ("train_log", "probe_log"):
            rows = read_jsonl(d / f"{name}.jsonl")
            if rows:
                write_csv(d / f"{name}.csv", rows)
                plot_log(rows, d / f"{name}.png", title=f"{title} ({name.replace('_', ' ')})")

    # ---------------------------------------------------------------- stages
    def base(self, cfg: ExperimentConfig) -> StageResult:
        return StageResult(key=f"base-{stable_hash(to_dict(cfg.model))}", recipe=ModelRecipe())

    def align(self, cfg: ExperimentConfig) -> StageResult:
        if cfg.align.defense == "none":
            return self.base(cfg)
        payload = {"model": to_dict(cfg.model), "data": _data_payload(cfg), "align": to_dict(cfg.align),
                   "seed": cfg.run.seed}
        key, d = self._stage_dir("align", payload)
        full = cfg.model.finetune == "full"
        recipe = ModelRecipe(weights=self._rel(d / "model") if full else None,
                             adapter=None if full else self._rel(d / "model"))
        if self._done(d):
            return StageResult(key, recipe, d)
        started = self._begin(d, payload, cfg)
        log.info("align %s -> %s", cfg.align.defense, d)
        tok = self.tokenizer(cfg)
        data = self.safety(cfg)
        model = build_model(cfg.model, tok, ModelRecipe(), self.root, train="full" if full else "new_lora")
        defense = make_defense(cfg.align.defense, cfg.align)
        streams = {"main": Stream(self.encode(cfg, data.align), cfg.align.optim.batch_size, tok.pad_token_id,
                                  cfg.run.seed, "align")}
        if "harmful" in defense.streams:
            streams["harmful"] = Stream(self.encode(cfg, data.harmful), cfg.align.optim.batch_size,
                                        tok.pad_token_id, cfg.run.seed, "harmful")
        probes = {"harmful_loss": loss_probe(self.encode(cfg, data.probe), tok.pad_token_id)}
        if data.align_probe:
            probes["align_loss"] = loss_probe(self.encode(cfg, data.align_probe), tok.pad_token_id)
        steps = total_steps(cfg.align.optim, len(data.align))
        fit(model, defense, streams, cfg.align.optim, d, accelerator=self.accelerator, steps=steps,
            desc=f"align {cfg.align.defense}", probes=probes, probe_every=cfg.align.eval_every)
        self._save_model(model, d, full)
        recipe.save(d / "recipe.json")
        self._write_logs(d, f"alignment: {cfg.align.defense}")
        self._finish(d, started, steps=steps)
        return StageResult(key, recipe, d)

    def attack(self, cfg: ExperimentConfig, upstream: StageResult) -> StageResult:
        payload = {"upstream": upstream.key, "model": to_dict(cfg.model), "data": _data_payload(cfg),
                   "attack": to_dict(cfg.attack), "seed": cfg.run.seed}
        key, d = self._stage_dir("attack", payload)
        full = cfg.model.finetune == "full"
        up = upstream.recipe
        if full:
            mode, recipe = "full", ModelRecipe(weights=self._rel(d / "model"))
        elif cfg.attack.adapter == "single" and up.adapter:
            mode, recipe = "continue", ModelRecipe(up.weights, list(up.merged), self._rel(d / "model"))
        else:
            merged = list(up.merged) + ([up.adapter] if up.adapter else [])
            mode, recipe = "new_lora", ModelRecipe(up.weights, merged, self._rel(d / "model"))
        if self._done(d):
            return StageResult(key, recipe, d)
        started = self._begin(d, payload, cfg)
        log.info("attack p=%s on %s -> %s", cfg.attack.p, upstream.key, d)
        tok = self.tokenizer(cfg)
        data = self.safety(cfg)
        train_set = poisoned_set(self.task_pool(cfg), data.attack_pool, n=cfg.attack.n, p=cfg.attack.p,
                                 seed=cfg.run.seed)
        write_csv(d / "train_set.csv", [{"source": ex.source, "prompt": ex.prompt, "response": ex.response}
                                        for ex in train_set])
        model = build_model(cfg.model, tok, up, self.root, train=mode)
        defense = make_defense(cfg.attack.defense, cfg.attack)
        bs = cfg.attack.optim.batch_size
        streams = {"main": Stream(self.encode(cfg, train_set), bs, tok.pad_token_id, cfg.run.seed, "attack")}
        if "align" in defense.streams:
            streams["align"] = Stream(self.encode(cfg, data.align), bs, tok.pad_token_id, cfg.run.seed, "align")
        if "harmful" in defense.streams:
            streams["harmful"] = Stream(self.encode(cfg, data.harmful), bs, tok.pad_token_id, cfg.run.seed,
                                        "harmful")
        probes = {"harmful_loss": loss_probe(self.encode(cfg, data.probe), tok.pad_token_id)}
        steps = total_steps(cfg.attack.optim, len(train_set))
        fit(model, defense, streams, cfg.attack.optim, d, accelerator=self.accelerator, steps=steps,
            desc=f"attack p={cfg.attack.p}", probes=probes, probe_every=cfg.attack.probe_every)
        self._save_model(model, d, full)
        recipe.save(d / "recipe.json")
        self._write_logs(d, f"attack p={cfg.attack.p} on {upstream.key}")
        self._finish(d, started, steps=steps, protocol=mode)
        return StageResult(key, recipe, d)

    def evaluate(self, cfg: ExperimentConfig, upstream: StageResult, labels: dict[str, Any]) -> dict[str, Any]:
        payload = {"upstream": upstream.key, "model": to_dict(cfg.model), "data": _data_payload(cfg),
                   "eval": to_dict(cfg.eval), "task": cfg.attack.task}
        key, d = self._stage_dir("eval", payload)
        if self._done(d):
            metrics = dict(read_json(d / "metrics.json"))
        else:
            metrics = self._run_eval(cfg, upstream, payload, d)
        row = {**labels, "harmful_score": metrics["harmful_score"], "refusal_rate": metrics["refusal_rate"],
               "accuracy": metrics.get("accuracy"), "judge": metrics["judge"]["name"], "seed": cfg.run.seed,
               "eval_dir": self._rel(d)}
        self.rows = [r for r in self.rows if r["eval_dir"] != row["eval_dir"]] + [row]
        return row

    def _run_eval(self, cfg: ExperimentConfig, upstream: StageResult, payload: dict[str, Any], d: Path) -> dict:
        started = self._begin(d, payload, cfg)
        log.info("evaluate %s -> %s", upstream.key, d)
        tok = self.tokenizer(cfg)
        prompts = self.safety(cfg).eval_prompts[:cfg.eval.n_harmful]
        items = self.task_eval(cfg)[:cfg.eval.n_task]
        model = build_model(cfg.model, tok, upstream.recipe, self.root, train=None)
        model.to(self.accelerator.device)
        partial = d / "generations.partial.jsonl"
        done = {(r["kind"], r["index"]): r["answer"] for r in read_jsonl(partial)}

        def answers_for(kind: str, texts: list[str], max_new: int) -> list[str]:
            todo = [i for i in range(len(texts)) if (kind, i) not in done]

            def save(idx: list[int], outs: list[str]) -> None:
                rows = [{"kind": kind, "index": todo[i], "answer": a} for i, a in zip(idx, outs)]
                append_jsonl(partial, rows)
                done.update({(kind, r["index"]): r["answer"] for r in rows})

            if todo:
                generate(model, tok, [texts[i] for i in todo], fmt=cfg.model.prompt_format, max_new_tokens=max_new,
                         batch_size=cfg.eval.batch_size, desc=f"answers ({kind})", on_batch=save)
            return [done[(kind, i)] for i in range(len(texts))]

        harm_answers = answers_for("harmful", [p.prompt for p in prompts], cfg.eval.max_new_tokens)
        task_answers = answers_for("task", [x.prompt for x in items], cfg.eval.task_max_new_tokens)
        judge = self.judge(cfg)
        probs = judge.probs([p.prompt for p in prompts], harm_answers)
        task = get_task(cfg.attack.task)
        gens = [{"kind": "harmful", "prompt": p.prompt, "answer": a, "harm_prob": round(pr, 4),
                 "flagged": pr > judge.threshold, "refusal": is_refusal(a)}
                for p, a, pr in zip(prompts, harm_answers, probs)]
        gens += [{"kind": "task", "prompt": x.prompt, "answer": a, "gold": x.label, "parsed": task.parse(a),
                  "correct": task.correct(a, x.label)} for x, a in zip(items, task_answers)]
        harmful = [g for g in gens if g["kind"] == "harmful"]
        tasks = [g for g in gens if g["kind"] == "task"]
        metrics = {
            "harmful_score": 100.0 * sum(g["flagged"] for g in harmful) / len(harmful),
            "refusal_rate": 100.0 * sum(g["refusal"] for g in harmful) / len(harmful),
            "accuracy": 100.0 * sum(g["correct"] for g in tasks) / len(tasks) if tasks else None,
            "n_harmful": len(harmful), "n_task": len(tasks), "task": cfg.attack.task,
            "judge": judge.describe(), "judge_truncated": judge.last_truncated, "upstream": upstream.key,
            "notes": "harmful_score = % of answers the judge flags; refusal_rate = % with a refusal phrase "
                     "(second opinion); accuracy = % of task answers whose parsed label is correct; judge_truncated = "
                     "answers longer than the judge reads, judged on their beginning",
        }
        if cfg.eval.judge == "refusal":
            metrics["judge_warning"] = ("the refusal-phrase matcher stands in for a content judge: it counts "
                                        "degenerate non-refusals as harmful")
        rewrite_jsonl(d / "generations.jsonl", gens)
        atomic_write_json(d / "metrics.json", metrics)
        partial.unlink(missing_ok=True)
        self._finish(d, started)
        return metrics

    # ---------------------------------------------------------------- whole experiment
    def run(self, until: str = "evaluate") -> list[dict[str, Any]]:
        """Every grid point: (controls) -> align -> attack -> evaluate, up to stage ``until``."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "config.yaml", to_yaml(self.cfg))
        points = expand_grid(self.cfg)
        for i, cfg in enumerate(points, 1):
            log.info("grid point %d/%d", i, len(points))
            common = {"task": cfg.attack.task, "adapter": cfg.attack.adapter}
            if until == "evaluate" and cfg.run.controls:
                self.evaluate(cfg, self.base(cfg), {"defense": "none", "stage": "unaligned", **common})
            aligned = self.align(cfg)
            if until == "align":
                continue
            if until == "evaluate" and cfg.run.controls and cfg.align.defense != "none":
                self.evaluate(cfg, aligned, {"defense": cfg.align.defense, "stage": "aligned", **common})
            if not cfg.attack.enabled:
                continue
            attacked = self.attack(cfg, aligned)
            if until == "evaluate":
                labels = {"defense": cfg.align.defense, "stage": "attacked", "p": cfg.attack.p, "n": cfg.attack.n,
                          **common}
                if cfg.attack.defense != "sft":
                    labels["defense"] = f"{cfg.align.defense}+{cfg.attack.defense}"
                self.evaluate(cfg, attacked, labels)
        if until == "evaluate":
            self.report()
        return self.rows

    def report(self) -> str:
        grid_keys = tuple(k for k in self.cfg.grid if k not in ("align.defense", "attack.p", "run.seed"))
        judge = self.judge(self.cfg).describe()
        header = (f"# Results: {self.root}\n\nJudge: {judge['name']} (version {judge['version']}, threshold "
                  f"{judge['threshold']}). HS = harmful score, FA = fine-tune accuracy on {self.cfg.attack.task}; "
                  "mean ± std over seeds.\n")
        table = write_results(self.root, self.rows, grid_keys, header=header)
        self._plot_attack_curves()
        return table

    def _plot_attack_curves(self) -> None:
        series, relative = {}, {}
        for d in sorted((self.root / "stages").glob("attack-*")):
            rows = read_jsonl(d / "probe_log.jsonl")
            cfg = read_json(d / "config.json")
            if not rows or not self._done(d):
                continue
            up = cfg["upstream"].split("-")[0]
            name = f"{self._defense_of(cfg['upstream'])} p={cfg['attack']['p']} seed={cfg['seed']}" \
                if up == "align" else f"none p={cfg['attack']['p']}"
            xs, ys = [r["step"] for r in rows], [r["harmful_loss"] for r in rows]
            series[name] = (xs, ys)
            relative[name] = (xs, [y - ys[0] for y in ys])
        if series:
            plot_series(series, self.root / "attack_harmful_loss.png", title="harmful loss during the attack",
                        xlabel="fine-tuning step", ylabel="harmful loss (held-out pairs)")
            plot_series(relative, self.root / "attack_harmful_loss_relative.png",
                        title="harmful loss during the attack, minus its start", xlabel="fine-tuning step",
                        ylabel="Δ harmful loss")

    def _defense_of(self, key: str) -> str:
        cfg_path = self.root / "stages" / key / "config.json"
        return read_json(cfg_path)["align"]["defense"] if cfg_path.is_file() else key
