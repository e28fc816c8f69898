"""Which settings decide which stage, and how stage directories are named.

A stage (``align``, ``attack``, ``eval``; ``base`` for the untrained model) lives in
``<out_dir>/stages/<kind>-<hash>``. Its hash covers exactly the settings that decide its
output, as changes from the defaults, plus the key of the stage it starts from, so:

- adding an option with a default leaves every existing stage hash alone;
- another defence's hyperparameters (the registry's ``config_sections``) stay out of a stage;
- the judge stays out of evaluation (it scores saved answers, it does not decide them);
- logging cadences (``eval_every``, ``probe_every``) stay out;
- an attack at p = 0 mixes nothing in, so it is one stage for every ``attack.mix``.

Every payload here is what ``config.json`` of its stage holds. The hashes are pinned by
tests/test_pipeline.py: a change that moves them makes every cached stage unreachable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booster.config import ExperimentConfig, to_dict
from booster.defenses import DEFENSES
from booster.data.base import DataError
from booster.evaluate.generate import EVAL_BATCH
from booster.io import file_sha256, stable_hash
from booster.models import ModelRecipe

STAGE_VERSION = 1
"""Bump when a change alters what a stage computes, so old cached stages are not reused."""


@dataclass
class StageResult:
    """A stage as the next one needs it: its key (the upstream of the next hash), the model it
    leaves, and its directory (None for the base model, which has none)."""

    key: str
    recipe: ModelRecipe
    dir: Path | None = None


def changed(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``value`` that differ from ``default``, recursively."""
    out = {}
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            sub = changed(v, default[k])
            if sub:
                out[k] = sub
        elif k not in default or default[k] != v:
            out[k] = v
    return out


def section(cfg: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """What decides a stage, as settings changed from the defaults: adding a new option with a
    default (or an unrelated defence's hyperparameters) leaves existing stage hashes alone."""
    value = {k: v for k, v in to_dict(cfg).items() if k not in drop}
    return changed(value, to_dict(type(cfg)()))


def defense_sections(stage: str, defense: str) -> tuple[str, ...]:
    """The sections of the stage's other defences (the registry's ``config_sections``): they
    do not decide this stage, so they stay out of its hash."""
    used = DEFENSES[defense].config_sections if defense in DEFENSES else ()
    every = {s for cls in DEFENSES.values() if stage in cls.stages for s in cls.config_sections}
    return tuple(sorted(every - set(used)))


def attack_drop(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The attack settings that do not decide its stage (nor label its row)."""
    drop = defense_sections("attack", cfg.attack.defense) + ("probe_every",)
    return drop + (("mix",) if cfg.attack.p == 0 else ())  # nothing is mixed in: one stage for every mix


def _trained_optims(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimiser settings a payload trains with (as hashed: defaults left out)."""
    return [payload.get(s, {}).get("optim", {}) for s in ("align", "attack")]


def warmup_fixed(payload: dict[str, Any]) -> dict[str, Any]:
    """A stage trained with warmup under the constant schedule before warmup took effect there
    (it was ignored) must not be reused: such stages get a hash of their own. Others keep theirs."""
    optims = _trained_optims(payload)
    if any(o.get("warmup_steps") and o.get("schedule", "constant") == "constant" for o in optims):
        return {"warmup": "applied"}
    return {}


def payloads(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The stage-deciding settings of each section (the judge does not decide generations)."""
    align_drop = defense_sections("align", cfg.align.defense) + ("eval_every",)
    return {"model": section(cfg.model), "data": section(cfg.data, drop=("dir",)),
            "align": {"defense": cfg.align.defense, **section(cfg.align, drop=align_drop)},
            "attack": {"p": cfg.attack.p, **section(cfg.attack, drop=attack_drop(cfg))},
            "eval": eval_section(cfg)}


def eval_section(cfg: ExperimentConfig) -> dict[str, Any]:
    """The evaluation settings that decide answers; a prompt file by its content, not its path."""
    out = section(cfg.eval, drop=("judge", "judge_path", "batch_size"))
    if cfg.eval.batch_size != EVAL_BATCH:  # the old default stays unhashed: cached evaluations keep their names
        out["batch_size"] = cfg.eval.batch_size
    if cfg.eval.prompts:
        path = Path(cfg.eval.prompts)
        if not path.is_file():
            raise DataError(f"eval.prompts: no file {path}; give a .txt or .jsonl file of harmful prompts")
        out["prompts"] = f"sha256:{file_sha256(path)}"
    else:
        out.pop("prompts_mode", None)  # no file: the mode changes no answer
    return out


def base_key(cfg: ExperimentConfig) -> str:
    """The untrained model's key: only the model settings decide it."""
    return f"base-{stable_hash(section(cfg.model))}"


def align_payload(cfg: ExperimentConfig) -> dict[str, Any]:
    pl = payloads(cfg)
    return {"model": pl["model"], "data": pl["data"], "align": pl["align"], "seed": cfg.run.seed}


def attack_payload(cfg: ExperimentConfig, upstream: StageResult) -> dict[str, Any]:
    pl = payloads(cfg)
    return {"upstream": upstream.key, "model": pl["model"], "data": pl["data"], "attack": pl["attack"],
            "seed": cfg.run.seed}


def eval_payload(cfg: ExperimentConfig, upstream_key: str) -> dict[str, Any]:
    pl = payloads(cfg)
    return {"upstream": upstream_key, "model": pl["model"], "data": pl["data"], "eval": pl["eval"],
            "task": cfg.attack.task}


def accumulation_fixed(payload: dict[str, Any]) -> dict[str, Any]:
    """Micro-batches were averaged equally before they were weighted by their answer tokens: a
    stage trained with grad_accum > 1 gets a hash of its own. Others keep theirs."""
    optims = _trained_optims(payload)
    return {"accumulation": "token-weighted"} if any(o.get("grad_accum", 1) > 1 for o in optims) else {}


def stage_key(kind: str, payload: dict[str, Any]) -> str:
    fixes = {**warmup_fixed(payload), **accumulation_fixed(payload)}
    return f"{kind}-{stable_hash({'v': STAGE_VERSION, **payload, **fixes})}"


def stage_dir(root: Path, kind: str, payload: dict[str, Any]) -> tuple[str, Path]:
    """(key, directory) of the stage of ``kind`` that ``payload`` decides, under run directory ``root``."""
    key = stage_key(kind, payload)
    return key, Path(root) / "stages" / key


def is_done(d: Path) -> bool:
    """A stage is done when its ``DONE.json`` exists: written last, after all its outputs."""
    return (d / "DONE.json").is_file()


def attack_recipe(cfg: ExperimentConfig, upstream: StageResult, model_dir: str) -> tuple[str, ModelRecipe]:
    """How an attack trains on its upstream's model (``full``, ``continue`` its adapter, or a
    ``new_lora`` over the merged ones) and the recipe it leaves, its weights in ``model_dir``."""
    up = upstream.recipe
    if cfg.model.finetune == "full":
        return "full", ModelRecipe(weights=model_dir)
    if cfg.attack.adapter == "single" and up.adapter:
        return "continue", ModelRecipe(up.weights, list(up.merged), model_dir)
    merged = list(up.merged) + ([up.adapter] if up.adapter else [])
    return "new_lora", ModelRecipe(up.weights, merged, model_dir)


def same_attack_other_length(cfg: ExperimentConfig, points: list[ExperimentConfig]) -> list[ExperimentConfig]:
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
    return [c for c in points if c.attack.optim.steps not in (None, cfg.attack.optim.steps)
            and without_length(c) == mine]
