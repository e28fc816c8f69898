"""Adding a defence is one file, one registry line (the class in ``DEFENSES``, which the
config's name check reads too) and one test: here all live in this file,
and the pipeline trains the defence on the tiny model without any other change."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from booster.config import AlignConfig, AttackConfig
from booster.data.base import DataError
from booster.defenses import DEFENSES
from booster.defenses.base import Defense, accumulate
from booster.io import read_jsonl
from booster.pipeline import Pipeline


class HalfSFT(Defense):
    """SFT at half the gradient: g = ½·∇f(w). Cost: one pass per step, no extra memory."""

    name = "half_sft"
    stages = ("align",)
    passes = 1

    @classmethod
    def length_problem(cls, stage_cfg, steps):
        return f"half_sft trains at most 5 steps, not {steps}" if steps > 5 else None

    def step(self, ctx, batches):
        return {"loss": accumulate(ctx, batches["main"], weight=0.5)}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(DEFENSES, HalfSFT.name, HalfSFT)  # the registry line


def test_a_defence_registered_from_a_test_file_trains_in_the_pipeline(registered, tiny_cfg):
    cfg = tiny_cfg("grid={}", "align.defense=half_sft", "attack.enabled=false", "run.controls=false")
    Pipeline(cfg).run(until="align")
    (stage,) = (Path(cfg.run.out_dir) / "stages").glob("align-*")
    assert (stage / "DONE.json").is_file() and (stage / "model").is_dir()
    assert json.loads((stage / "config.json").read_text())["align"]["defense"] == "half_sft"
    losses = [r["loss"] for r in read_jsonl(stage / "train_log.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # its own check of the stage length runs before anything trains
    too_long = tiny_cfg("grid={}", "align.defense=half_sft", "align.optim.steps=6", "attack.enabled=false",
                        "run.controls=false")
    with pytest.raises(DataError, match="half_sft trains at most 5 steps, not 6"):
        Pipeline(too_long).run(until="align")


def test_every_defence_section_is_a_field_of_its_class_in_each_of_its_stages():
    """The registry names each defence's settings class; the stage configs must hold it."""
    stage_configs = {"align": AlignConfig, "attack": AttackConfig}
    for name, cls in DEFENSES.items():
        for stage in cls.stages:
            fields = {f.name: f for f in dataclasses.fields(stage_configs[stage])}
            for section, settings in cls.config_sections.items():
                assert section in fields, f"{name}: {stage} config has no section {section}"
                assert isinstance(fields[section].default_factory(), settings), f"{name}: {stage}.{section}"
