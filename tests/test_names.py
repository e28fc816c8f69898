"""The names the config checks are the names the registries hold, and the config checks task
and judge names without importing a task reader or a judge."""

from __future__ import annotations

import ast
from pathlib import Path

from booster import names
from booster.data.tasks import TASKS
from booster.config import build_config
from booster.defenses import DEFENSES, defense_names
from booster.evaluate.judges import Judge, judge_class

CONFIG = Path(__file__).resolve().parents[1] / "src" / "booster" / "config.py"


def test_task_names_are_the_task_registry():
    assert names.TASKS == tuple(TASKS)


def test_defence_names_by_stage_come_from_the_defence_registry(monkeypatch):
    assert defense_names("attack") == ("sft", "lisa")
    assert defense_names("align") == ("sft", "booster", "vaccine", "repnoise", "booster_vaccine",
                                      "booster_no_last_term")

    class Toy:
        stages = ("attack",)

    monkeypatch.setitem(DEFENSES, "toy", Toy)  # one registry line makes a valid config name
    assert build_config([("test", {"attack": {"defense": "toy"}})]).attack.defense == "toy"


def test_every_judge_name_resolves_to_its_judge_class():
    for name in names.JUDGES:
        cls = judge_class(name)
        assert issubclass(cls, Judge) and cls.name == name


def test_config_imports_no_room_to_check_names():
    imported = {node.module for node in ast.walk(ast.parse(CONFIG.read_text(encoding="utf-8")))
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("booster")}
    rooms = ("booster.evaluate", "booster.data", "booster.models", "booster.pipeline")
    assert not [m for m in imported if m.startswith(rooms)], imported
    # the defences' own settings dataclasses are sections of the stage configs, not name checks
    assert {m for m in imported if m.startswith("booster.defenses.")} <= {
        "booster.defenses.booster", "booster.defenses.lisa", "booster.defenses.repnoise", "booster.defenses.vaccine"}
