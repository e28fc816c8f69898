"""The names a config may use, as plain data below ``config.py``.

``config.py`` checks ``attack.task``, ``align.defense``, ``eval.judge`` and the like against
these, so validating a config imports no task reader, defence or judge (they pull in torch
and the data). Owns the judge registry itself (name -> 'module:Class', imported on first use
by ``booster.evaluate.judges.judge_class``, or a Judge class registered at run time) and the
lists of task and defence names, which tests/test_names.py holds equal to their registries
(``booster.data.tasks.TASKS``, ``booster.defenses.DEFENSES``).
"""

from __future__ import annotations

from typing import Any

TASKS: tuple[str, ...] = ("sst2", "agnews", "gsm8k", "instructions")
"""Task names, in the registry's order (``booster.data.tasks.TASKS``)."""

DEFENSES: dict[str, tuple[str, ...]] = {
    "sft": ("align", "attack"),
    "booster": ("align",),
    "vaccine": ("align",),
    "repnoise": ("align",),
    "booster_vaccine": ("align",),
    "booster_no_last_term": ("align",),
    "lisa": ("attack",),
}
"""Defence name -> the stages it runs in (its class's ``stages``), in the registry's order
(``booster.defenses.DEFENSES``). A defence registered at run time adds its line here too."""

JUDGES: dict[str, Any] = {
    "refusal": "booster.evaluate.judges:RefusalJudge",
    "classifier": "booster.evaluate.classifier:ClassifierJudge",
    "beaver_dam": "booster.evaluate.beaver_dam:BeaverDamJudge",
}
"""Judge name -> 'module:Class', imported on use (the classifier and beaver_dam pull in torch),
or a Judge class itself (a judge registered at run time)."""


def defense_names(stage: str) -> tuple[str, ...]:
    """The defences that can run in ``stage`` ('align' or 'attack')."""
    return tuple(name for name, stages in DEFENSES.items() if stage in stages)
