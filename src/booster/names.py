"""The names a config may use, as plain data below ``config.py``.

``config.py`` checks ``attack.task`` and ``eval.judge`` against these, so validating a config
imports no task reader or judge (they pull in the data and the encoders). Owns the judge
registry itself (name -> 'module:Class', imported on first use by
``booster.evaluate.judges.judge_class``, or a Judge class registered at run time) and the list
of task names, which tests/test_names.py holds equal to ``booster.data.tasks.TASKS``. Defence
names need no list here: the config already imports the defence classes for their settings
sections, so it checks names against ``booster.defenses.DEFENSES`` itself.
"""

from __future__ import annotations

from typing import Any

TASKS: tuple[str, ...] = ("sst2", "agnews", "gsm8k", "instructions")
"""Task names, in the registry's order (``booster.data.tasks.TASKS``)."""

JUDGES: dict[str, Any] = {
    "refusal": "booster.evaluate.judges:RefusalJudge",
    "classifier": "booster.evaluate.classifier:ClassifierJudge",
    "classifier_v1": "booster.evaluate.classifier:ClassifierV1Judge",
    "beaver_dam": "booster.evaluate.beaver_dam:BeaverDamJudge",
    "raters": "booster.evaluate.raters:RatersJudge",
}
"""Judge name -> 'module:Class', imported on use (the classifier and beaver_dam pull in torch),
or a Judge class itself (a judge registered at run time)."""

