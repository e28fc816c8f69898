"""The benchmark's arithmetic (benchmarks/ is not a package: load the script by path)."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("step_cost", Path(__file__).parents[1] / "benchmarks" / "step_cost.py")
step_cost = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(step_cost)


def test_amortised_split_pairs_each_step_with_its_round():
    # The reference drifts 2x between rounds; pairing by round must cancel it.
    ref = [1.0, 2.0, 1.0, 2.0]
    times = [3.0, 2.2, 1.1, 2.2]  # refresh at round 0 (3x), reuse 1.1x after
    split = step_cost.amortised_split(ref, times, [True, False, False, False], periods=(1, 4, 100))
    assert split["refresh_ratio"] == pytest.approx(3.0)
    assert split["reuse_ratio"] == pytest.approx(1.1)
    assert (split["n_refresh"], split["n_reuse"]) == (1, 3)
    assert split["projected_ratio"][1] == pytest.approx(3.0)
    assert split["projected_ratio"][4] == pytest.approx((3.0 + 3 * 1.1) / 4)
    assert split["projected_ratio"][100] == pytest.approx((3.0 + 99 * 1.1) / 100)


def test_amortised_split_is_none_for_uniform_steps():
    assert step_cost.amortised_split([1.0, 1.0], [3.0, 3.0], [True, True]) is None
    assert step_cost.amortised_split([1.0, 1.0], [1.0, 1.0], [False, False]) is None
