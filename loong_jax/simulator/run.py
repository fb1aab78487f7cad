"""The simulation loop, and the search for the maximum request rate a policy sustains under the SLO.

Data flow:
  1. `simulate(requests, policy, cost_model, num_instances)` drives the engine's own `EngineCore` over a
     `SimExecutor` on a virtual clock:
       a. requests whose arrival time has come are added to the `EngineState` (one too large for the whole
          cluster is recorded as rejected);
       b. core.dispatch(core.schedule()): the policy plans, the state accounts the plan, the executor starts it;
       c. the clock jumps to whichever comes first, the next arrival or the next unit completion; completions
          go to core.apply(result).
     It stops when every request is done (or, with `give_up_below`, as soon as so many of the watched requests,
     `watch_ids`, have missed their SLO (`metrics.SloSpec`) that the attainment target can no longer be met;
     or, with `stop_at`, when the next event lies beyond that time: a steady-state run, `steady.py`). An empty
     plan with nothing in flight, work waiting and no arrival to come is a policy bug: `SchedulerStalled`.
  2. `RatePoint` = the metrics of one run (`metrics.summarize`) + engine counters + DoP histograms, plus the
     per-request records.
  3. `search_max_rate(evaluate, ...)` doubles / halves the request rate until the SLO attainment crosses the
     target (90%), then bisects (geometrically) to a relative precision: the max throughput under SLO.
  4. `PolicySpec.parse("static-sp:degree=4")` names a policy with options for the CLI and reports.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np

from loong_jax.engine.core import EngineCore, SchedulerStalled
from loong_jax.engine.prefix_cache import PrefixCacheOptions
from loong_jax.engine.state import EngineState, make_state_for
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.policy import Policy, PolicySpec
from loong_jax.simulator.metrics import (
    DEFAULT_ATTAINMENT_TARGET,
    DEFAULT_SLO_SCALE,
    RateMetrics,
    RequestRecord,
    SloSpec,
    isolated_latencies,
    summarize,
)
from loong_jax.simulator.sim_executor import SimExecutor
from loong_jax.simulator.workloads import DocumentHashes, RequestSpec

MAX_PLANS_AT_ONE_TIME = 10_000  # a policy that keeps planning without letting time move is looping


@dataclass
class RatePoint:
    policy: str
    metrics: RateMetrics
    complete: bool  # False: stopped early because the SLO target was already out of reach
    counters: dict = field(default_factory=dict)
    prefill_dops: dict = field(default_factory=dict)
    decode_dops: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    utilization: float = math.nan  # busy instance-seconds / (instances × makespan)
    scheduler_ms_median: float = math.nan  # wall time of one policy.schedule call
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    records: list[RequestRecord] = field(default_factory=list, repr=False)  # per request; not in to_dict (bulky)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            **self.metrics.to_dict(),
            "complete": self.complete,
            "counters": self.counters,
            "prefill_dops": {str(k): v for k, v in sorted(self.prefill_dops.items())},
            "decode_dops": {str(k): v for k, v in sorted(self.decode_dops.items())},
            "units": self.units,
            "utilization": None if math.isnan(self.utilization) else self.utilization,
            "scheduler_ms_median": None if math.isnan(self.scheduler_ms_median) else self.scheduler_ms_median,
            "virtual_seconds": self.virtual_seconds,
            "wall_seconds": self.wall_seconds,
        }


class _SloWatch:
    """Counts watched requests that have certainly missed their SLO by the current time (for giving up early)."""

    def __init__(self, deadlines: dict):
        self.deadlines = deadlines  # watched request id -> latest finish that can still meet its SLO
        self._sorted = sorted(deadlines.values())
        self._met: list[float] = []  # deadlines of requests that met their SLO
        self._rejected: list[float] = []  # deadlines of rejected requests (missed from the moment of rejection)

    def finished(self, request_id, met: bool) -> None:
        if met and request_id in self.deadlines:
            bisect.insort(self._met, self.deadlines[request_id])

    def rejected(self, request_id) -> None:
        if request_id in self.deadlines:
            bisect.insort(self._rejected, self.deadlines[request_id])

    def missed_by(self, now: float) -> int:
        """Rejected requests, plus requests whose deadline has passed without them meeting their SLO."""
        passed = bisect.bisect_left(self._sorted, now)
        passed_but_met = bisect.bisect_left(self._met, now)
        passed_rejected = bisect.bisect_left(self._rejected, now)
        return passed - passed_but_met - passed_rejected + len(self._rejected)


def simulate(
    requests: Sequence[RequestSpec],
    policy: PolicySpec | Policy,
    cost_model: CostModel,
    num_instances: int,
    *,
    request_rate: float,
    slo_scale: float = DEFAULT_SLO_SCALE,
    give_up_below: float | None = None,
    reveal_output_lengths: bool = True,
    isolated: np.ndarray | None = None,
    check_invariants: bool = False,
    slo: SloSpec | None = None,
    stop_at: float | None = None,
    watch_ids: Collection | None = None,
    prefix_cache: PrefixCacheOptions | None = None,
    async_scheduling: bool = False,
) -> RatePoint:
    """Serve `requests` with the policy on `num_instances` simulated instances.

    `reveal_output_lengths`: each request's max_new_tokens is its true output length, as in serving benchmarks
    that set max_tokens to the dataset's output length and ignore EOS; False hides it (policies then guess).
    `slo`: the SLO form (default: `slo_scale` × isolated latency).
    `give_up_below`: stop as soon as the SLO attainment of the watched requests (`watch_ids`, default all) is
    certainly below this fraction.
    `stop_at`: stop the clock at this time instead of draining (steady-state runs); what is unfinished then
    stays unfinished in the records.
    `check_invariants`: cross-check the state after every event and require every page free at the end (tests).
    `prefix_cache`: the cache's options (default: on); requests of shared-document workloads reuse the KV of
    their document's cached pages (`RequestSpec.document`), priced by the cost model as a suffix prefill
    attending to the prefix.
    `async_scheduling`: as the engine serves by default, decode steps are released at dispatch and the next
    step is planned while they run (`EngineCore`, step 2); it needs the output lengths revealed.
    """
    if async_scheduling and not reveal_output_lengths:
        raise ValueError("asynchronous scheduling in the simulator needs the output lengths revealed: a request "
                         "that ends early would have its next step planned already")
    wall_start = time.perf_counter()
    label = policy.label if isinstance(policy, PolicySpec) else getattr(policy, "name", type(policy).__name__)
    if isinstance(policy, PolicySpec):
        policy = policy.build()
    state: EngineState = make_state_for(cost_model, num_instances, prefix_cache)
    document_hashes = DocumentHashes(cost_model.page_size)
    output_lengths = {r.request_id: r.output_len for r in requests}
    executor = SimExecutor(cost_model, state, output_lengths, overlap=async_scheduling)
    core = EngineCore(state, policy, cost_model, executor, clock=lambda: executor.now, compile_aware=False)
    if isolated is None:
        isolated = isolated_latencies(requests, cost_model, num_instances)
    slo = slo or SloSpec(slo_scale)
    isolated_of = {r.request_id: isolated[i] for i, r in enumerate(requests)}
    watched = [r for r in requests if watch_ids is None or r.request_id in watch_ids]
    watch = _SloWatch({r.request_id: slo.deadline(r.arrival_time, r.input_len, r.output_len, isolated_of[r.request_id])
                       for r in watched})
    allowed_misses = math.inf if give_up_below is None else (1 - give_up_below) * len(watched)
    pending = sorted(requests, key=lambda r: (r.arrival_time, r.request_id))
    records = {r.request_id: RequestRecord(r.request_id, r.arrival_time, r.input_len, r.output_len) for r in requests}
    next_arrival = 0
    schedule_seconds: list[float] = []
    complete = True
    plans_at_this_time, last_time = 0, -1.0
    released = {}  # id(unit) -> its `Release` (asynchronous scheduling)

    def reject(request_id) -> None:
        watch.rejected(request_id)

    def admit_arrivals() -> None:
        nonlocal next_arrival
        while next_arrival < len(pending) and pending[next_arrival].arrival_time <= executor.now:
            spec = pending[next_arrival]
            next_arrival += 1
            try:
                state.add_request(spec.request_id, spec.input_len,
                                  spec.output_len if reveal_output_lengths else None, arrival=spec.arrival_time,
                                  block_hashes=document_hashes.of(spec))
            except ValueError:  # larger than the whole cluster's KV: rejected at the edge
                records[spec.request_id].rejected = True
                reject(spec.request_id)

    def plan_and_dispatch() -> bool:
        """True when everything in flight was released just now: the engine then plans its next step at
        once, while these run (`Engine.step`), instead of waiting for a unit to end."""
        started = time.perf_counter()
        plan = core.schedule()
        schedule_seconds.append(time.perf_counter() - started)
        if plan.is_empty:
            return False
        releases = core.dispatch(plan)
        for release in releases:
            released[id(release.unit)] = release
        for request_id in plan.rejections:
            reject(request_id)
        return bool(releases) and executor.in_flight == len(releases)

    def finish(request) -> None:
        record = records[request.request_id]
        record.first_token_time, record.finish_time = request.first_token_time, request.finish_time
        watch.finished(request.request_id, slo.meets(record, isolated_of[request.request_id]))

    while True:
        plans_at_this_time = plans_at_this_time + 1 if executor.now == last_time else 0
        last_time = executor.now
        if plans_at_this_time > MAX_PLANS_AT_ONE_TIME:
            raise SchedulerStalled(f"{MAX_PLANS_AT_ONE_TIME} plans at t={executor.now} without time moving: "
                                   + _stall_report(state, label, executor.now))
        admit_arrivals()
        if state.has_unfinished() and plan_and_dispatch():
            continue
        if watch.missed_by(executor.now) > allowed_misses:
            complete = False
            break
        # Jump to the next event: an arrival, or the completion of the earliest running unit.
        upcoming_finish = executor.next_finish_time()
        upcoming_arrival = pending[next_arrival].arrival_time if next_arrival < len(pending) else None
        if upcoming_finish is None and upcoming_arrival is None:
            if state.has_unfinished():
                raise SchedulerStalled(_stall_report(state, label, executor.now))
            break
        upcoming = min(t for t in (upcoming_finish, upcoming_arrival) if t is not None)
        if stop_at is not None and upcoming > stop_at:
            break  # steady-state run: what is unfinished now stays unfinished
        if upcoming_arrival is not None and (upcoming_finish is None or upcoming_arrival < upcoming_finish):
            executor.advance_to(upcoming_arrival)
            continue
        for result in core.wait():
            release = released.pop(id(result.unit), None)
            if release is not None:  # accounted at dispatch: its requests that finished end now
                core.resolve(result, release)
            for request in core.apply(result) if release is None else release.finished:
                finish(request)
        if check_invariants:
            state.check_invariants()

    if check_invariants and complete and stop_at is None:
        state.allocator.assert_all_free()
    for request_id, request in state.requests.items():
        record = records[request_id]
        record.first_token_time = request.first_token_time
        record.preemptions = request.num_preemptions
        if request.finish_reason == "finished":
            record.finish_time = request.finish_time
        elif request.finish_reason == "rejected":
            record.rejected = True
    ordered = [records[r.request_id] for r in requests]
    metrics = summarize(ordered, isolated, request_rate, slo=slo)
    makespan = metrics.makespan
    return RatePoint(
        policy=label,
        metrics=metrics,
        complete=complete,
        counters=dict(state.counters, prefix_cache_hits=state.prefix_cache.stats.hits,
                      prefix_cache_hit_tokens=state.prefix_cache.stats.hit_tokens),
        prefill_dops=dict(core.dops.prefill),
        decode_dops=dict(core.dops.decode),
        units=dict(executor.units_run),
        utilization=sum(executor.busy_seconds) / (num_instances * makespan) if makespan > 0 else math.nan,
        scheduler_ms_median=1e3 * float(np.median(schedule_seconds)) if schedule_seconds else math.nan,
        virtual_seconds=executor.now,
        wall_seconds=time.perf_counter() - wall_start,
        records=ordered,
    )


def _stall_report(state: EngineState, label: str, now: float) -> str:
    waiting = [(r.request_id, r.prefill_target) for r in state.waiting[:5]]
    free = [state.allocator.pages_free(i) for i in range(state.num_instances)]
    return (
        f"policy {label} planned nothing at t={now:.3f}s with nothing running and no arrival to come: "
        f"{len(state.waiting)} waiting (first: id, tokens = {waiting}), {len(state.prefilling)} prefilling, "
        f"{len(state.decoding)} decoding; free pages per instance {free}"
    )


def search_max_rate(
    evaluate: Callable[[float], float],
    initial_rate: float,
    target: float = DEFAULT_ATTAINMENT_TARGET,
    relative_precision: float = 0.05,
    max_evaluations: int = 20,
) -> float:
    """Highest rate with evaluate(rate) >= target: doubling/halving to a bracket, then geometric bisection.

    `evaluate(rate)` returns the SLO attainment at that rate. Returns 0.0 when even initial_rate / 2^10 fails, and
    math.inf when no rate up to the evaluation budget fails (a finite run of N requests can drain within the SLO
    however fast they arrive: the SLO is longer than the time to serve all N).
    """
    if initial_rate <= 0:
        raise ValueError(f"initial_rate must be positive, got {initial_rate}")
    evaluations = 0

    def passes(rate: float) -> bool:
        nonlocal evaluations
        evaluations += 1
        return evaluate(rate) >= target

    rate = initial_rate
    if passes(rate):
        low = rate
        high = rate * 2
        while passes(high):
            low, high = high, high * 2
            if evaluations >= max_evaluations:
                return math.inf
    else:
        high = rate
        low = rate / 2
        while not passes(low):
            high, low = low, low / 2
            if high < initial_rate / 2**10 or evaluations >= max_evaluations:
                return 0.0
    while high / low > 1 + relative_precision and evaluations < max_evaluations:
        middle = math.sqrt(low * high)
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


def initial_rate_guess(requests: Sequence[RequestSpec], isolated: np.ndarray, num_instances: int) -> float:
    """Rate at which the cluster would be busy if every request ran alone at its isolated latency (a start)."""
    return num_instances / float(np.mean(isolated))
