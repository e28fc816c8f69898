"""Experiment tracking the ecosystem's way: accelerate's trackers (``run.log_with``).

Owns which trackers a run may name, the check that their package is installed (before any
training), and one tracker run per trained stage: named by the stage directory (plus what it
trains), the stage's deciding settings as hyperparameters, every row the training loop writes
to ``train_log.jsonl`` under ``train/`` and every probe row under ``probe/``, at its step.
TensorBoard and MLflow write under ``<out_dir>/tracking`` (``tensorboard --logdir
runs/demo/tracking``); wandb follows its own settings (``WANDB_MODE=offline`` needs no network).
The jsonl files stay the record: tracking is a view of them, and a resumed stage logs its
remaining steps to a fresh tracker run of the same name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

PACKAGES = {"tensorboard": "tensorboard (pip install 'booster[tracking]')", "wandb": "wandb (pip install wandb)",
            "mlflow": "mlflow (pip install mlflow)"}
"""Each tracker a run may name, with the package it needs."""
TRACKERS = tuple(PACKAGES)


def tracker_names(log_with: str) -> list[str]:
    """``run.log_with`` as a list: 'none', one name, or names joined by commas."""
    names = [n.strip() for n in str(log_with).split(",") if n.strip() and n.strip() != "none"]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ValueError(f"run.log_with: unknown tracker '{bad[0]}'; choose from none, {', '.join(TRACKERS)} "
                         "(several: tensorboard,wandb)")
    return names


def missing_packages(names: list[str]) -> list[str]:
    """The packages the named trackers need and this environment lacks (as install hints)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available}
    return [PACKAGES[n] for n in names if not available[n]()]


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def make_tracker(name: str, experiment: str, stage: str, directory: Path) -> Any:
    """Accelerate's tracker ``name`` for one stage: TensorBoard a run directory per stage, wandb
    and MLflow a run named by the stage in a project/experiment named by the run directory."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(stage, str(directory))
    if name == "wandb":
        return WandBTracker(experiment, name=stage, dir=str(directory))
    return MLflowTracker(experiment, logging_dir=str(directory), run_name=stage)


@contextlib.contextmanager
def tracked(accelerator: Any, names: list[str], directory: Path, stage: str,
            settings: dict[str, Any]) -> Iterator[None]:
    """The trackers ``names`` around one stage's training, on the main process (nothing when
    ``names`` is empty). Made here rather than by ``accelerator.init_trackers``, which names
    every tracker's run alike, and ended here rather than by ``accelerator.end_training``,
    which would also end the process group the next stage needs."""
    if not names or not accelerator.is_main_process:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    accelerator.trackers = [make_tracker(n, directory.parent.name, stage, directory) for n in names]
    for tracker in accelerator.trackers:
        tracker.start()
        tracker.store_init_configuration({k: _scalar(v) for k, v in settings.items()})
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []


def log_row(accelerator: Any, prefix: str, row: dict[str, Any]) -> None:
    """One jsonl row (with its ``step``) to the stage's trackers, numbers only."""
    if getattr(accelerator, "trackers", None):
        values = {f"{prefix}/{k}": v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(values, step=int(row["step"]))
