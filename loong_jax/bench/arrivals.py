"""Request arrival times of a benchmark run: Poisson, gamma with burstiness, or all at once.

Data flow:
  1. `arrival_gaps(count, rate, burstiness, rng)` draws the gap before each request. The gaps are gamma
     distributed with shape k = burstiness and mean 1 / rate (scale 1 / (rate · k)), as in vLLM's serving
     benchmark: k = 1 is a Poisson process (exponential gaps, coefficient of variation 1); k < 1 is burstier
     (CV = 1 / √k > 1); k > 1 is more regular. `rate = inf` sends everything at once (all gaps 0).
  2. `arrival_times(...)` turns the gaps into send offsets from the start of the run: the first request
     goes at 0, request i after the sum of the first i gaps (what a "send, then sleep" loop produces).
  3. Everything is drawn from a numpy Generator the caller seeds, so a run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np


def parse_rate(text: str | float) -> float:
    """A request rate in requests/s: a positive number or 'inf'."""
    rate = float(text)  # float("inf") and float("Infinity") work
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"request rate must be a positive number or 'inf', got {text!r}")
    return rate


def arrival_gaps(count: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """[count] float64 seconds between consecutive sends (gap i precedes request i + 1)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive finite number, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(count)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)


def arrival_times(count: int, rate: float, burstiness: float = 1.0, seed: int | None = 0,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """[count] float64 send offsets in seconds from the start, ascending, the first at 0."""
    rng = np.random.default_rng(seed) if rng is None else rng
    gaps = arrival_gaps(count, rate, burstiness, rng)
    if count == 0:
        return gaps
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def gap_statistics(times: np.ndarray) -> dict:
    """Mean rate and coefficient of variation of the gaps of a run's send times (for reports and tests)."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    if len(gaps) == 0:
        return {"mean_rate": math.nan, "gap_cv": math.nan}
    mean_gap = float(gaps.mean())
    return {"mean_rate": 1.0 / mean_gap if mean_gap > 0 else math.inf,
            "gap_cv": float(gaps.std() / mean_gap) if mean_gap > 0 else math.nan}
