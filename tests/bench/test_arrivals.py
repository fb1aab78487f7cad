"""Arrival processes: mean rate, gap coefficient of variation against burstiness, seeding, rate inf."""

import math

import numpy as np
import pytest

from loong_jax.bench.arrivals import arrival_gaps, arrival_times, gap_statistics, parse_rate

COUNT = 40_000


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_rate_and_cv(rate):
    stats = gap_statistics(arrival_times(COUNT, rate, burstiness=1.0, seed=1))
    assert stats["mean_rate"] == pytest.approx(rate, rel=0.03)
    assert stats["gap_cv"] == pytest.approx(1.0, rel=0.03)  # exponential gaps


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_cv_is_one_over_sqrt_burstiness(burstiness):
    stats = gap_statistics(arrival_times(COUNT, 3.0, burstiness=burstiness, seed=2))
    assert stats["mean_rate"] == pytest.approx(3.0, rel=0.04)  # burstiness never changes the mean rate
    assert stats["gap_cv"] == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_gaps_pass_a_distribution_check():
    # Poisson counts in unit windows: mean = variance = rate.
    times = arrival_times(COUNT, 5.0, seed=3)
    counts = np.bincount(times.astype(int))[:-1]
    assert counts.mean() == pytest.approx(5.0, rel=0.03)
    assert counts.var() == pytest.approx(5.0, rel=0.08)


def test_times_start_at_zero_ascend_and_repeat_with_the_seed():
    first = arrival_times(100, 2.0, 0.5, seed=7)
    assert first[0] == 0.0 and np.all(np.diff(first) >= 0)
    np.testing.assert_array_equal(first, arrival_times(100, 2.0, 0.5, seed=7))
    assert not np.array_equal(first, arrival_times(100, 2.0, 0.5, seed=8))


def test_infinite_rate_sends_everything_at_once():
    assert parse_rate("inf") == math.inf
    np.testing.assert_array_equal(arrival_times(5, math.inf), np.zeros(5))


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "fast"])
def test_bad_rates(bad):
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_bad_burstiness():
    rng = np.random.default_rng(0)
    for burstiness in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError):
            arrival_gaps(3, 1.0, burstiness, rng)
