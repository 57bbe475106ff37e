"""`make mutate`'s sampling and its summary line (tests/support/mutate_io.py, mutation_score.py)."""

from __future__ import annotations

import pytest

from tests.support.mutate_io import sampled
from tests.support.mutation_score import sample_summary, wilson


def test_wilson_interval_of_85_in_100() -> None:
    # The roots of |0.85 - p| = 1.96 * sqrt(p * (1 - p) / 100), found by bisection: 0.7672 and 0.9069.
    low, high = wilson(85, 100)
    assert low == pytest.approx(0.7672, abs=5e-4)
    assert high == pytest.approx(0.9069, abs=5e-4)


def test_wilson_interval_stays_within_zero_and_one() -> None:
    assert wilson(0, 5)[0] == 0.0
    assert wilson(5, 5)[1] == 1.0


def test_sample_is_the_same_for_the_same_seed_and_a_subset() -> None:
    names = [f"m{i}" for i in range(200)]
    first = sampled(names, 30, seed="smtpgate/x.py:")
    assert first == sampled(list(reversed(names)), 30, seed="smtpgate/x.py:")
    assert len(first) == len(set(first)) == 30 and set(first) <= set(names)
    assert first != sampled(names, 30, seed="smtpgate/y.py:")


def test_sample_takes_every_name_when_there_are_fewer() -> None:
    assert sampled(["b", "a"], 30, seed="s") == ["a", "b"]


def test_sample_summary_counts_a_mutant_without_a_test_as_a_survivor() -> None:
    line = sample_summary(["killed"] * 8 + ["timeout", "no tests", "not checked"], 500)
    assert line.startswith("mutation score 90.0 % ")
    assert "9 of 10 killed, 1 survived (1 without a test, 1 not run yet, sample of 11 of 500)" in line
