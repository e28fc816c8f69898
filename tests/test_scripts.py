"""The analysis scripts under scripts/, run as a user runs them, on a made-up run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage(root: Path, name: str, config: dict, probes: list[float] | None = None) -> None:
    d = root / "stages" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "DONE.json").write_text("{}")
    if probes is not None:
        (d / "probe_log.jsonl").write_text("".join(json.dumps({"step": i, "harmful_loss": h}) + "\n"
                                                   for i, h in enumerate(probes)))


def test_attack_loss_table_names_a_default_setting_instead_of_a_blank(tmp_path):
    # two Booster alignments, one at the default lambda (absent from its stage config), one at
    # lambda=1: both rows must say which is which
    _stage(tmp_path, "align-a", {"align": {"defense": "booster"}, "data": {"n_benign": 400}})
    _stage(tmp_path, "align-b", {"align": {"defense": "booster", "booster": {"lam": 1.0}}, "data": {"n_benign": 400}})
    for up, probes in (("align-a", [2.5, 2.4]), ("align-b", [2.6, 2.3])):
        _stage(tmp_path, f"attack-{up}", {"upstream": up, "seed": 0, "attack": {"p": 0.2, "optim": {"lr": 5e-4}}},
               probes)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "attack_loss_table.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| booster")]
    assert len(rows) == 2
    assert any("align.booster.lam=default" in r and "-0.100" in r for r in rows)
    assert any("align.booster.lam=1.0" in r and "-0.300" in r for r in rows)


def test_attack_loss_table_orders_a_numeric_setting_by_value(tmp_path):
    # attacks of 200, 50 and 100 steps: 50 must come first, not 100 (string order)
    _stage(tmp_path, "align-a", {"align": {"defense": "sft"}, "data": {"n_benign": 400}})
    for steps in (200, 50, 100):
        _stage(tmp_path, f"attack-{steps}", {"upstream": "align-a", "seed": 0,
                                             "attack": {"p": 0.2, "optim": {"lr": 5e-4, "steps": steps}}},
               [2.5, 2.5 - steps / 1000])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "attack_loss_table.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| sft")]
    assert [r.split("attack.optim.steps=")[1].split(" ")[0] for r in rows] == ["50", "100", "200"]
