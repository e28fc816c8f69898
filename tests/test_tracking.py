"""run.log_with: accelerate's trackers see every row the training loop and its probes write,
one tracker run per stage (TensorBoard, offline); names and missing packages fail before training."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from booster.config import ConfigError
from booster.pipeline import Pipeline


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_logs_every_loss_term_and_probe_of_each_stage(tiny_cfg):
    cfg = tiny_cfg("run.log_with=tensorboard", "run.estimate=false", "run.controls=false", "grid={}",
                   "align.defense=booster")
    pipe = Pipeline(cfg)
    pipe.run(until="attack")
    stages = sorted(p for p in (pipe.root / "stages").iterdir() if p.name.split("-")[0] in ("align", "attack"))
    assert len(stages) == 2
    runs = {p.name: p for p in (pipe.root / "tracking").iterdir()}
    for stage in stages:
        label = "booster" if stage.name.startswith("align") else "p0.25"
        logged = scalars(runs[f"{stage.name}-{label}"])
        train = rows(stage / "train_log.jsonl")
        assert len(train) == 3
        terms = [k for k in train[0] if k != "step"]
        if stage.name.startswith("align"):
            assert {"harmful_loss", "regulariser"} <= set(terms)  # Booster's own terms
        for key in terms:
            assert logged[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in train}, rel=1e-6), key
        probes = rows(stage / "probe_log.jsonl")
        assert logged["probe/harmful_loss"] == pytest.approx({r["step"]: r["harmful_loss"] for r in probes},
                                                             rel=1e-6)


def test_an_unknown_tracker_is_a_one_line_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; choose from none, tensorboard"):
        tiny_cfg("run.log_with=tensorbord")


def test_a_missing_tracker_package_fails_before_training(tiny_cfg, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    pipe = Pipeline(tiny_cfg("run.log_with=tensorboard"))
    with pytest.raises(ConfigError, match=r"needs tensorboard \(pip install 'booster\[tracking\]'\)"):
        pipe.run()
    assert not (pipe.root / "stages").exists()
