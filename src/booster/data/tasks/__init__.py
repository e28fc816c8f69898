"""Fine-tuning tasks of the simulated user, one file each, and their registry.

Tasks: sst2 (sentiment), agnews (4-way topic), gsm8k (grade-school maths), instructions
(Alpaca-style instruction following on the benign prompts the data directory has). A new
task is its file (a ``Task`` naming its ``files``), a line in ``TASKS`` below and its name
in ``booster.names.TASKS``.
"""

from __future__ import annotations

from booster.data.base import DataError
from booster.data.tasks.agnews import AGNews
from booster.data.tasks.base import Task
from booster.data.tasks.gsm8k import GSM8K
from booster.data.tasks.instructions import Instructions
from booster.data.tasks.sst2 import SST2

TASKS: dict[str, Task] = {t.name: t for t in (SST2(), AGNews(), GSM8K(), Instructions())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["AGNews", "GSM8K", "Instructions", "SST2", "TASKS", "Task", "get_task"]
