"""The run's data, served to the stages: which examples go where, loaded once per run.

Owns the rules of data placement (the attacker's pool and mixed-in samples, alignment's
benign examples, the prompts an evaluation answers), the tokenised form a stage trains on,
the hashes of the files a stage reads (``meta.json``), and the memo that keeps every file
parsed and every tokenizer loaded once across the grid. ``booster.estimate.RunData`` is the
protocol it satisfies; the pipeline holds one ``DataServer`` and conducts the stages with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from booster.config import ExperimentConfig, to_dict
from booster.data import safety
from booster.data.base import DataError, Example
from booster.data.prompts import load_prompt_file
from booster.data.tasks import get_task
from booster.io import file_sha256, stable_hash
from booster.models import load_tokenizer
from booster.text import encode_pair
from booster.train import Stream

SAFETY_FILES = ("safety/refusals.json", "safety/harmful_qa.json", "safety/hh_rlhf_harmless_test.jsonl.gz",
                "safety/advbench.prompt.yaml")
"""What every stage reads; each task adds its own (``Task.files``)."""


class DataServer:
    """The data of every grid point of a run, from ``data_dir``, each piece loaded on first use."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._cache: dict[Any, Any] = {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key``: grid points share files, tokenizers and pools."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def tokenizer(self, cfg: ExperimentConfig) -> Any:
        return self.memo(("tok", stable_hash(to_dict(cfg.model))), lambda: load_tokenizer(cfg.model))

    def safety(self, cfg: ExperimentConfig) -> safety.SafetyData:
        d = cfg.data
        kwargs = dict(n_align=d.n_align, n_harmful=d.n_harmful, n_probe=d.n_probe, seed=d.split_seed)
        if d.source == "hub":
            return self.memo(("safety", "hub", *kwargs.values()), lambda: safety.load_beavertails(**kwargs))
        return self.memo(("safety", *kwargs.values()), lambda: safety.load_local(self.data_dir, **kwargs))

    def _pool(self, task: str, source: str) -> list[Example]:
        return self.memo(("pool", task, source), lambda: get_task(task).pool(self.data_dir, source))

    def task_pool(self, cfg: ExperimentConfig) -> list[Example]:
        return self._pool(cfg.attack.task, cfg.data.source)

    def mix_pool(self, cfg: ExperimentConfig) -> list[Example]:
        """Where the attack's p·n mixed-in samples come from: the attacker's harmful pairs, or, for
        the benign control (attack.mix=TASK), the first half of that task's pool; alignment's
        benign examples come from the end of each pool (benign()), so the two never overlap."""
        if cfg.attack.mix == "harmful":
            return self.safety(cfg).attack_pool
        pool = self._pool(cfg.attack.mix, cfg.data.source)
        return pool[:len(pool) // 2]

    def eval_prompts(self, cfg: ExperimentConfig) -> list[Example]:
        """The harmful prompts an evaluation answers: the first eval.n_harmful held-out ones,
        and/or the user's file (eval.prompts, eval.prompts_mode)."""
        held_out = self.safety(cfg).eval_prompts[:cfg.eval.n_harmful]
        if not cfg.eval.prompts:
            return held_out
        own = self.memo(("prompts", cfg.eval.prompts), lambda: load_prompt_file(cfg.eval.prompts))
        return own if cfg.eval.prompts_mode == "replace" else held_out + own

    def task_eval(self, cfg: ExperimentConfig) -> list[Example]:
        return self.memo(("task_eval", cfg.attack.task, cfg.data.source),
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
            pool = self._pool(name, d.source)
            if share > len(pool) // 2:
                raise DataError(f"data.n_benign asks {share} examples of {name} but its pool has {len(pool)}; "
                                "lower data.n_benign")
            out += pool[len(pool) - share:]
        return out

    def encode(self, cfg: ExperimentConfig, examples: list[Example]) -> list[dict[str, list[int]]]:
        tok = self.tokenizer(cfg)
        return [encode_pair(tok, ex, cfg.model.prompt_format, cfg.model.max_length) for ex in examples]

    def streams(self, cfg: ExperimentConfig, defense: Any, main: list[Example], batch_size: int,
                main_name: str) -> dict[str, Stream]:
        """The stage's own data as 'main', plus the alignment or harmful pairs the defence asks for."""
        pad, seed = self.tokenizer(cfg).pad_token_id, cfg.run.seed
        data = self.safety(cfg)
        sources = {"main": (main, main_name), "align": (data.align, "align"), "harmful": (data.harmful, "harmful")}
        return {name: Stream(self.encode(cfg, sources[name][0]), batch_size, pad, seed, sources[name][1])
                for name in ("main", *defense.streams) if name in sources}

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

        return self.memo(("data_hashes", patterns), make)
