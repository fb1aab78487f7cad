"""A tiny event-driven driver for scheduler tests: the cost model is the clock, outputs have fixed lengths.

Data flow: add requests at their arrival times; whenever an event happens, ask the policy for a plan,
dispatch it on the EngineState, and queue each unit's completion at now + its estimated duration; on
completion hand the state a UnitResult with one token per produced output and the requests whose output
length is reached. (The real simulator lives in loong_jax.simulator; this one keeps the tests standalone.)
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.cost.estimates import unit_seconds
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, PrefillBatch


@dataclass
class DriveReport:
    finish_time: float
    steps: int
    units: list = field(default_factory=list)  # (start, unit)
    plans: list = field(default_factory=list)


def drive(state: EngineState, policy, cost, arrivals, max_steps: int = 100_000, view_options=None,
          check_every: int = 1, tell_max_tokens: bool = True) -> DriveReport:
    """arrivals: list of (time, request_id, prompt_len, output_len). With `tell_max_tokens=False` the state
    does not learn the output lengths (the scheduler must guess growth, so scale-up and preemption happen)."""
    view_options = view_options or {}
    output_len = {rid: out for _, rid, _, out in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    events: list = []
    counter = itertools.count()
    now, steps, report = 0.0, 0, DriveReport(0.0, 0)
    arrival_index = 0
    while True:
        while arrival_index < len(pending) and pending[arrival_index][0] <= now:
            t, rid, prompt_len, out = pending[arrival_index]
            state.add_request(rid, prompt_len, max_new_tokens=out if tell_max_tokens else None, arrival=t)
            arrival_index += 1
        plan = policy.schedule(state.view(cost, now=now, **view_options))
        if not plan.is_empty:
            report.plans.append(plan)
            for unit in state.on_dispatched(plan, now=now):
                seconds = unit_seconds(cost, unit, lambda r: state.requests[r].context_len)
                report.units.append((now, unit))
                heapq.heappush(events, (now + max(seconds, 1e-9), next(counter), unit))
        if check_every and steps % check_every == 0:
            state.check_invariants()
        steps += 1
        if steps > max_steps:
            raise AssertionError(f"no progress after {max_steps} steps")
        next_arrival = pending[arrival_index][0] if arrival_index < len(pending) else None
        if not events:
            if next_arrival is None:
                if state.has_unfinished():
                    raise AssertionError("deadlock: work left but nothing running and nothing planned")
                break
            now = next_arrival
            continue
        if next_arrival is not None and next_arrival < events[0][0]:
            now = next_arrival
            continue
        now, _, unit = heapq.heappop(events)
        state.apply(_result(state, unit, now, output_len))
    state.check_invariants()
    report.finish_time, report.steps = now, steps
    return report


def _result(state: EngineState, unit, now: float, output_len) -> UnitResult:
    new_tokens, finished = {}, set()
    if isinstance(unit, MigrationBatch):
        return UnitResult(unit, {}, frozenset(), now)
    prefill = unit if isinstance(unit, PrefillBatch) else unit.fused_prefill
    producing = []
    if prefill is not None:
        for rid, (start, length) in zip(prefill.request_ids, prefill.chunks):
            if start + length == state.requests[rid].prefill_target:
                producing.append(rid)
    if isinstance(unit, DecodeBatch):
        producing.extend(unit.request_ids)
    for rid in producing:
        request = state.requests[rid]
        new_tokens[rid] = 7
        if request.num_generated + 1 >= output_len[rid]:
            finished.add(rid)
    return UnitResult(unit, new_tokens, frozenset(finished), now)
