"""The names the config checks (booster.names) are the names the registries hold, and the
config checks them without importing a task reader, a defence's class or a judge."""

from __future__ import annotations

import ast
from pathlib import Path

from booster import names
from booster.data.tasks import TASKS
from booster.defenses import DEFENSES
from booster.evaluate.judges import Judge, judge_class

CONFIG = Path(__file__).resolve().parents[1] / "src" / "booster" / "config.py"


def test_task_names_are_the_task_registry():
    assert names.TASKS == tuple(TASKS)


def test_defence_names_and_stages_are_the_defence_registry():
    assert names.DEFENSES == {name: tuple(cls.stages) for name, cls in DEFENSES.items()}
    assert names.defense_names("attack") == ("sft", "lisa")


def test_every_judge_name_resolves_to_its_judge_class():
    for name in names.JUDGES:
        cls = judge_class(name)
        assert issubclass(cls, Judge) and cls.name == name


def test_config_imports_no_room_to_check_names():
    imported = {node.module for node in ast.walk(ast.parse(CONFIG.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("booster")}
    rooms = ("booster.evaluate", "booster.data", "booster.models", "booster.pipeline")
    assert not [m for m in imported if m.startswith(rooms) or m == "booster.defenses"], imported
    # the defences' own settings dataclasses are sections of the stage configs, not name checks
    assert {m for m in imported if m.startswith("booster.defenses.")} <= {
        "booster.defenses.booster", "booster.defenses.lisa", "booster.defenses.repnoise", "booster.defenses.vaccine"}
