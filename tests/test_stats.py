"""Seed-and-prompt intervals and detectable differences on hand-counted cases."""

from __future__ import annotations

import math

import pytest

from booster.stats import (detectable_difference, per_seed_differences, prompt_detectable_difference,
                           seed_prompt_interval, seed_t_interval)


def seed_of(only_b: int, only_a: int, n: int = 100):
    """n prompts: ``only_b`` flagged for B alone, ``only_a`` for A alone, the rest for neither."""
    return [(False, True)] * only_b + [(True, False)] * only_a + [(False, False)] * (n - only_a - only_b)


def test_per_seed_differences_are_counted_in_points():
    assert per_seed_differences([seed_of(12, 2), seed_of(0, 5), seed_of(3, 3)]) == [10.0, -5.0, 0.0]


def test_no_variation_anywhere_gives_a_point_interval():
    pairs = [[(False, True)] * 10] * 3  # B flagged on every prompt, A on none, at every seed
    assert seed_prompt_interval(pairs, reps=200) == (100.0, 100.0, 100.0)


def test_seed_bootstrap_alone_when_prompts_agree_within_seeds():
    # seed 1: every prompt +1, seed 2: every prompt 0 -> the prompt draw changes nothing; the mean of
    # two seeds drawn with replacement is 100 (1/4), 50 (1/2) or 0 (1/4): the 95% interval is [0, 100]
    pairs = [[(False, True)] * 20, [(False, False)] * 20]
    mean, lo, hi = seed_prompt_interval(pairs, reps=4000)
    assert (mean, lo, hi) == (50.0, 0.0, 100.0)


def test_one_seed_is_the_paired_prompt_bootstrap():
    # 10 of 100 prompts +1, none -1: the mean of 100 draws is Binomial(100, 0.1)/100, sd 3 points
    mean, lo, hi = seed_prompt_interval([seed_of(10, 0)], reps=20000)
    assert mean == 10.0
    assert lo == pytest.approx(10 - 1.96 * 3, abs=1.5) and hi == pytest.approx(10 + 1.96 * 3, abs=1.5)


def test_t_interval_and_detectable_difference_by_hand():
    # differences 10, -5, 0: mean 5/3, sd = sqrt(((25/3)^2 + (20/3)^2 + (5/3)^2) / 2) = sqrt(175/3)
    sd = math.sqrt(175 / 3)
    se = sd / math.sqrt(3)
    mean, lo, hi = seed_t_interval([10.0, -5.0, 0.0])
    assert mean == pytest.approx(5 / 3)
    assert hi - mean == pytest.approx(4.302653 * se, rel=1e-5)  # t(0.975, 2)
    assert detectable_difference([10.0, -5.0, 0.0]) == pytest.approx((4.302653 + 1.060660) * se, rel=1e-5)
    assert seed_t_interval([3.0]) is None and detectable_difference([3.0]) is None


def test_prompt_detectable_difference_by_hand():
    # d = +1 on 10 prompts, 0 on 90: mean 0.1, sample variance 9/99, SE sqrt(9/99/100)
    se = math.sqrt(9 / 99 / 100)
    assert prompt_detectable_difference(seed_of(10, 0)) == pytest.approx(100 * (1.959964 + 0.841621) * se, rel=1e-5)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="at least one seed"):
        seed_prompt_interval([])


def test_no_spread_sizes_no_test():
    assert detectable_difference([5.0, 5.0, 5.0]) is None
    assert prompt_detectable_difference([(True, True), (False, False)]) is None
