"""What can be checked before any training, so a sweep fails in seconds rather than hours in.

Owns the checks that need the run's data or machine rather than the config alone (those live
in ``config.py``): model sources, tokenizers and their templates, data files and split sizes,
the poisoned set of every attack, tracker packages, the generation engine, and each defence's
settings that depend on its stage's length, and whether the launch (processes, DeepSpeed,
FSDP) can train every defence of the grid. Each raises the one-line error of the first
problem it finds.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from booster.attack import poisoned_set
from booster.checks import ConfigError
from booster.config import ExperimentConfig
from booster.data.base import DataError
from booster.data.prompts import seen_in_training
from booster.defenses import DEFENSES
from booster.distributed import DistributedError, check_supported
from booster.evaluate.generate import vllm_available
from booster.models import resolve_source
from booster.rundata import DataServer
from booster.tracking import missing_packages, tracker_names
from booster.train import total_steps

log = logging.getLogger("booster")


def check_launch(accelerator: Any, points: list[ExperimentConfig]) -> None:
    """Refuse, before any stage runs, a launch some grid point could not train correctly."""
    n = accelerator.num_processes
    for cfg in points:
        for name, optim in ((cfg.align.defense, cfg.align.optim), (cfg.attack.defense, cfg.attack.optim)):
            if name in DEFENSES:
                check_supported(accelerator, name, DEFENSES[name].passes, optim.grad_accum)
            if optim.batch_size % n:
                raise DistributedError(f"optim.batch_size={optim.batch_size} is the global micro-batch and cannot "
                                       f"be split evenly over {n} processes; make it a multiple of {n}")


def preflight(cfg: ExperimentConfig, points: list[ExperimentConfig], data: DataServer) -> None:
    """Check every grid point of ``cfg`` (``points``) against the data ``data`` serves."""
    missing = missing_packages(tracker_names(cfg.run.log_with))
    if missing:
        raise ConfigError(f"run.log_with={cfg.run.log_with} needs {missing[0]}; install it or set "
                          "run.log_with=none")
    for point in points:
        check_point(point, data)
    for point in points:  # one load per distinct model (the server keeps them)
        data.tokenizer(point)


def check_point(cfg: ExperimentConfig, data: DataServer) -> None:
    resolve_source(cfg.model)
    safety = data.safety(cfg)
    if (not cfg.eval.prompts or cfg.eval.prompts_mode == "add") and cfg.eval.n_harmful > len(safety.eval_prompts):
        raise DataError(f"eval.n_harmful={cfg.eval.n_harmful} but only {len(safety.eval_prompts)} held-out "
                        "harmful prompts exist; lower eval.n_harmful")
    data.task_eval(cfg)
    if cfg.eval.prompts:
        prompts = data.eval_prompts(cfg)
        seen = seen_in_training(prompts, safety.align + safety.harmful + safety.attack_pool)
        if seen:
            log.warning("eval.prompts: %d of the %d prompts of %s are among this run's training prompts; "
                        "their answers measure memory as much as safety", seen, len(prompts), cfg.eval.prompts)
    if cfg.eval.engine == "vllm" and not (torch.cuda.is_available() and vllm_available()):
        raise DataError("eval.engine=vllm needs a GPU and the vllm package; use eval.engine=hf here")
    if cfg.attack.task in cfg.data.benign_tasks and cfg.data.n_benign:
        raise DataError(f"data.benign_tasks contains the attack's task {cfg.attack.task}: alignment would "
                        "pre-train the user's task; drop it from data.benign_tasks")
    benign = data.benign(cfg)
    problems = []  # each defence checks the settings that depend on its stage's length
    if cfg.align.defense in DEFENSES:
        steps = total_steps(cfg.align.optim, len(safety.align) + len(benign))
        problems.append(DEFENSES[cfg.align.defense].length_problem(cfg.align, steps))
    if cfg.attack.enabled:
        poisoned_set(data.task_pool(cfg), data.mix_pool(cfg), n=cfg.attack.n, p=cfg.attack.p, seed=0)
        steps = total_steps(cfg.attack.optim, cfg.attack.n)
        problems.append(DEFENSES[cfg.attack.defense].length_problem(cfg.attack, steps))
    if any(problems):
        raise DataError(next(p for p in problems if p))
    if cfg.align.defense in DEFENSES and "harmful" in DEFENSES[cfg.align.defense].streams and not safety.harmful:
        raise DataError(f"align.defense={cfg.align.defense} needs harmful pairs; set data.n_harmful >= 1")
