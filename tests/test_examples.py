"""The examples/ scripts run as a user would run them (on the tiny model), and a stage's
adapter loads with PEFT's own loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, saved", [("plain_loop.py", "adapter_model.safetensors"),
                                           ("hf_trainer.py", "checkpoint-2/adapter_model.safetensors"),
                                           ("trl_sft.py", "checkpoint-2/adapter_model.safetensors")])
def test_example_runs(script, saved, tmp_path, data_dir):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", "tiny", "--steps", "2",
                          "--data-dir", str(data_dir), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / saved).is_file()
    assert "h(w~)" in res.stdout or "booster_regulariser" in res.stdout
