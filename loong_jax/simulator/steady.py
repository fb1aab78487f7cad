"""Figures that a finite run cannot flatter: the capacity bound, steady-state runs and the max sustainable rate.

A finite run of N requests meets a 25x SLO at rates far above what the cluster sustains (it only fails once
its backlog outgrows the SLO), so these figures judge a policy on the middle of a long run instead.

Data flow:
  1. `capacity_bound(requests, cost_model, num_instances)`: the rate at which serving every request exactly
     uses the cluster's instance-time, num_instances / mean over the workload of `request_work`, each
     request's `instance_seconds_lower_bound` (cost model: perfect batching, cheapest degree, no migration). No policy
     sustains more; it is an upper bound, loose where batches are limited by something other than KV.
  2. `steady_window(requests, slo, isolated)`: arrivals span [0, T]; the middle window is [T/4, 3T/4] and its
     requests are the ones judged; the run stops (without draining) at max(T, latest SLO deadline of a
     middle request), so that every judged request has its verdict.
  3. `simulate_steady(...)` runs `simulate` with that stop time (and, when searching, gives up as soon as the
     middle window's attainment is certainly below the target) and reduces it to a `SteadyPoint`:
       - middle_attainment: share of middle-window requests meeting their SLO (rejected, unfinished: missed);
       - backlog = outstanding WORK, in request-equivalents: Σ over requests arrived and not yet finished
         (rejected ones count as settled on arrival) of `request_work` (what the capacity bound counts: a
         question on a cached document is its suffix), divided by its mean over the workload. Counting requests instead would let a policy hide overload by serving the short
         ones and deferring the long ones; work cannot be reordered away. Sampled on 256 even points of the
         window: backlog_growth_per_s = least-squares slope, backlog_mean = its mean;
       - backlog_growing (`backlog_is_growing`): the fitted rise over the window, slope × window length,
         exceeds max(GROWTH_MIN_REQUESTS, GROWTH_RELATIVE × backlog_mean): a queue in steady state
         fluctuates around its mean, an overloaded one climbs by (rate − service rate) × time (from an empty
         start its rise over [T/4, 3T/4] equals its mean there, twice the relative threshold);
       - rejected_share, unserved_share: of the requests arriving by the end of the middle window, those
         rejected, and those neither finished nor rejected when the run stops (each has missed its deadline).
  4. `SteadyPoint.sustainable` = middle_attainment ≥ target and no growing backlog;
     `search_sustainable_rate` finds the highest such rate, at most the capacity bound, with
     `run.search_max_rate` (doubling / halving, then geometric bisection).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.cost.request_cost import instance_seconds_lower_bound
from loong_jax.scheduler.policy import PolicySpec
from loong_jax.simulator.metrics import DEFAULT_ATTAINMENT_TARGET, RequestRecord, SloSpec
from loong_jax.simulator.run import search_max_rate, simulate
from loong_jax.simulator.workloads import RequestSpec

MIDDLE_WINDOW = (0.25, 0.75)  # fractions of the arrival span judged in a steady-state run
BACKLOG_SAMPLES = 256  # even sample points of the backlog over the middle window
GROWTH_MIN_REQUESTS = 8.0  # a rise of fewer request-equivalents over the window is noise, whatever the mean
GROWTH_RELATIVE = 0.5  # ...and so is a rise below half the mean backlog


def request_work(requests: Sequence[RequestSpec], cost_model: CostModel, prefix_cache: bool = True) -> np.ndarray:
    """[requests] the instance-seconds serving each request costs at least (`instance_seconds_lower_bound`).
    With the prefix cache, every question on a document but the first (in arrival order) may reuse the
    document's full pages: it counts only its suffix."""
    memo: dict[tuple[int, int, int], float] = {}
    seen_documents: set[int] = set()
    work = np.zeros(len(requests))
    for k in sorted(range(len(requests)), key=lambda k: (requests[k].arrival_time, requests[k].request_id)):
        request, cached = requests[k], 0
        if prefix_cache and request.document is not None:
            if request.document in seen_documents:
                page = cost_model.page_size
                cached = min(request.document_len // page * page, (request.input_len - 1) // page * page)
            seen_documents.add(request.document)
        key = (request.input_len, request.output_len, cached)
        if key not in memo:
            memo[key] = instance_seconds_lower_bound(cost_model, *key)
        work[k] = memo[key]
    return work


def capacity_bound(requests: Sequence[RequestSpec], cost_model: CostModel, num_instances: int,
                   prefix_cache: bool = True) -> float:
    """Requests per second at which serving all of `requests` (their length mix) uses every instance-second
    (`request_work`: a question on a cached document counts only its suffix)."""
    return num_instances * len(requests) / float(request_work(requests, cost_model, prefix_cache).sum())


@dataclass(frozen=True)
class SteadyWindow:
    start: float  # first arrival time judged
    end: float  # last arrival time judged
    stop: float  # the run stops here
    middle_ids: frozenset  # request ids arriving in [start, end]
    considered_ids: frozenset  # request ids arriving by `end` (the shares of rejected and unserved)


def steady_window(requests: Sequence[RequestSpec], slo: SloSpec, isolated: np.ndarray) -> SteadyWindow:
    if len(requests) < 2:
        raise ValueError("a steady-state run needs at least two requests")
    span = max(r.arrival_time for r in requests)
    start, end = (fraction * span for fraction in MIDDLE_WINDOW)
    middle = [(i, r) for i, r in enumerate(requests) if start <= r.arrival_time <= end]
    if not middle:
        raise ValueError("no request arrives in the middle of the run: use more requests")
    last_deadline = max(slo.deadline(r.arrival_time, r.input_len, r.output_len, isolated[i]) for i, r in middle)
    return SteadyWindow(start, end, max(span, last_deadline), frozenset(r.request_id for _, r in middle),
                        frozenset(r.request_id for r in requests if r.arrival_time <= end))


def outstanding(records: Sequence[RequestRecord], weights: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[times] Σ weights of the requests arrived by each time and not finished by it (rejected: settled on
    arrival; never finished: outstanding to the end)."""
    arrivals = np.array([r.arrival_time for r in records])
    settles = np.array([r.arrival_time if r.rejected else (r.finish_time if r.finished else np.inf) for r in records])

    def cumulative(at: np.ndarray) -> np.ndarray:  # Σ weights of events at or before each time
        order = np.argsort(at, kind="stable")
        sums = np.concatenate([[0.0], np.cumsum(weights[order])])
        return sums[np.searchsorted(at[order], times, side="right")]

    return cumulative(arrivals) - cumulative(settles)


def backlog_trend(times: np.ndarray, backlog: np.ndarray) -> tuple[float, float]:
    """(least-squares slope per second, mean) of a backlog sampled at evenly spaced `times`."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0, float(np.mean(backlog))
    return float(np.polyfit(times - times[0], backlog, 1)[0]), float(np.mean(backlog))


def backlog_is_growing(slope: float, mean: float, duration: float) -> bool:
    """The backlog's fitted rise over the window exceeds both GROWTH_MIN_REQUESTS and GROWTH_RELATIVE × mean."""
    return slope * duration > max(GROWTH_MIN_REQUESTS, GROWTH_RELATIVE * mean)


@dataclass
class SteadyPoint:
    policy: str
    request_rate: float
    num_requests: int
    middle_requests: int
    middle_attainment: float
    backlog_growth_per_s: float  # outstanding work, request-equivalents per second; NaN when the run gave up early
    backlog_mean: float  # request-equivalents
    backlog_growing: bool | None  # None when the run gave up early (then it is not sustainable anyway)
    rejected_share: float
    unserved_share: float
    complete: bool  # False: stopped once the middle window's attainment was certainly below the target
    target: float = DEFAULT_ATTAINMENT_TARGET
    stop_time: float = 0.0
    wall_seconds: float = 0.0

    @property
    def sustainable(self) -> bool:
        return self.complete and self.middle_attainment >= self.target and self.backlog_growing is False

    def to_dict(self) -> dict:
        row = {**asdict(self), "sustainable": self.sustainable}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}

    @classmethod
    def from_dict(cls, row: dict) -> "SteadyPoint":
        fields = {name: row[name] for name in cls.__dataclass_fields__ if name in row}
        nan_when_none = ("backlog_growth_per_s", "backlog_mean")
        return cls(**{k: (math.nan if v is None and k in nan_when_none else v) for k, v in fields.items()})


def simulate_steady(
    requests: Sequence[RequestSpec],
    policy: PolicySpec,
    cost_model: CostModel,
    num_instances: int,
    *,
    request_rate: float,
    slo: SloSpec,
    isolated: np.ndarray,
    target: float = DEFAULT_ATTAINMENT_TARGET,
    give_up: bool = False,
    reveal_output_lengths: bool = True,
    prefix_cache: PrefixCacheOptions | None = None,
    async_scheduling: bool = False,
) -> SteadyPoint:
    """One steady-state run at `request_rate` (the requests' arrival times already at that rate)."""
    window = steady_window(requests, slo, isolated)
    point = simulate(requests, policy, cost_model, num_instances, request_rate=request_rate, slo=slo,
                     isolated=isolated, give_up_below=target if give_up else None, stop_at=window.stop,
                     watch_ids=window.middle_ids, reveal_output_lengths=reveal_output_lengths,
                     prefix_cache=prefix_cache, async_scheduling=async_scheduling)
    met = {r.request_id for r, iso in zip(point.records, isolated) if slo.meets(r, iso)}
    cached = prefix_cache is None or prefix_cache.enabled
    work_of = dict(zip((r.request_id for r in requests), request_work(requests, cost_model, cached)))
    work = np.array([work_of[r.request_id] for r in point.records])
    considered = [r for r in point.records if r.request_id in window.considered_ids]
    rejected = sum(r.rejected for r in considered)
    unserved = sum(not r.rejected and not r.finished for r in considered)
    duration = window.end - window.start
    if point.complete:
        grid = np.linspace(window.start, window.end, BACKLOG_SAMPLES)
        slope, mean = backlog_trend(grid, outstanding(point.records, work / work.mean(), grid))
        growing = backlog_is_growing(slope, mean, duration)
    else:
        slope, mean, growing = math.nan, math.nan, None
    return SteadyPoint(
        policy=point.policy,
        request_rate=request_rate,
        num_requests=len(requests),
        middle_requests=len(window.middle_ids),
        middle_attainment=len(met & window.middle_ids) / len(window.middle_ids),
        backlog_growth_per_s=slope,
        backlog_mean=mean,
        backlog_growing=growing,
        rejected_share=rejected / len(considered),
        unserved_share=unserved / len(considered),
        complete=point.complete,
        target=target,
        stop_time=window.stop,
        wall_seconds=point.wall_seconds,
    )


def search_sustainable_rate(
    evaluate: Callable[[float], SteadyPoint], initial_rate: float, precision: float = 0.05,
    ceiling: float = math.inf,
) -> float:
    """Highest rate whose steady-state point is sustainable (0.0 if none down to initial_rate / 2^10).

    Rates above `ceiling` (the capacity bound) fail without a run: no policy sustains more work than the
    cluster's instance-time, and near the bound a finite run's backlog is too noisy to show its growth (a
    result equal to the ceiling means: indistinguishable from the bound at this run length)."""
    def score(rate: float) -> float:
        if rate > ceiling * (1 + 1e-9):
            return 0.0
        return 1.0 if evaluate(rate).sustainable else 0.0

    return search_max_rate(score, min(initial_rate, ceiling), target=0.5, relative_precision=precision)
