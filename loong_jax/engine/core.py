"""EngineCore: the one loop of plan -> dispatch -> wait -> apply, over any executor.

Three drivers share it: the serving `Engine` (requests, detokenization, streamed outputs), the simulator
(arrivals on a virtual clock) and the profiler (plans it builds itself, timed). Each composes the same
four moves:
  1. `schedule()`: the policy reads a `SchedulerView` of the state (numbers only; with `compile_aware`,
     also which programs the executor has ready and what compiling another costs) and returns a `Plan`.
  2. `dispatch(plan, sampling_rows)`: the state accounts the plan (pages, preemptions, migrations; its
     units are in flight), the degrees of its batches are counted, and the executor gets the plan with the
     `StepInputs` taken from the state (page tables, migration tickets) and from the driver (each
     request's sampling row, which holds its tokens). Drivers whose executor needs no inputs (the
     simulator's) pass no rows. With asynchronous scheduling, the decode units whose requests read no
     token history (no penalties) are then released at once (`EngineState.release_early`): the next
     `schedule()` plans for their instances while they run, their requests' new tokens pending. (A prefill
     is not released: the decode after it often runs on fewer instances, which would have to wait on the
     host for the prefill's token, holding up every other group's next step for a whole prefill.)
  3. `wait()`: the unit(s) that finish first, as `UnitResult`s.
  4. `apply(result)`: the state records the tokens, frees what finished, and returns the requests that did;
     for a released unit, `resolve(result)` writes its tokens in place of the pending ones instead.
`check_progress(plan)`, called before the plan is dispatched, raises `SchedulerStalled` when requests wait,
nothing runs and the policy planned nothing: a policy bug, reported instead of hanging.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Mapping

from loong_jax.engine.state import EngineState, Release, RequestState
from loong_jax.executor.protocol import Executor, StepInputs, UnitResult
from loong_jax.sampling.batch import SamplingRow
from loong_jax.scheduler.plan import DecodeBatch, Plan, RequestId, WorkUnit


class SchedulerStalled(RuntimeError):
    """Requests wait, nothing runs and the policy plans nothing: a policy bug, reported instead of hanging."""


class DopCounts:
    """How many batches ran at each degree of parallelism, per phase (reports and the server's metrics)."""

    def __init__(self):
        self.prefill: collections.Counter[int] = collections.Counter()
        self.decode: collections.Counter[int] = collections.Counter()

    def count(self, plan: Plan) -> None:
        """A decode step counts once per batch, a prefill once per batch, fused into a decode step or not."""
        for batch in plan.decodes:
            self.decode[len(batch.group)] += 1
            if batch.fused_prefill is not None:
                self.prefill[len(batch.fused_prefill.group)] += 1
        for batch in plan.prefills:
            self.prefill[len(batch.group)] += 1

    def as_dict(self) -> dict[str, dict[int, int]]:
        return {"prefill": dict(self.prefill), "decode": dict(self.decode)}


class EngineCore:
    def __init__(self, state: EngineState, policy, cost_model, executor: Executor, *,
                 clock: Callable[[], float] = time.monotonic, compile_aware: bool = True,
                 async_scheduling: bool = True):
        """`compile_aware`: the policy is told which programs are ready and what a compilation costs (off for
        reproducible runs and for executors that compile nothing). `async_scheduling`: release units early
        (step 2) when the executor feeds pending tokens."""
        if state.num_instances != executor.num_instances:
            raise ValueError(f"engine state has {state.num_instances} instances, the executor "
                             f"{executor.num_instances}")
        self.state = state
        self.policy = policy
        self.cost_model = cost_model
        self.executor = executor
        self.clock = clock
        self.compile_aware = compile_aware
        self.async_scheduling = async_scheduling and executor.feeds_pending_tokens
        self.dops = DopCounts()

    def schedule(self) -> Plan:
        return self.policy.schedule(self._view())

    def dispatch(self, plan: Plan, sampling_rows: Mapping[RequestId, SamplingRow] | None = None) -> list[Release]:
        """Returns the units released early (see step 2)."""
        now = self.clock()
        self.state.on_dispatched(plan, now)
        self.dops.count(plan)
        inputs = StepInputs() if sampling_rows is None else self.state.step_inputs(plan, sampling_rows)
        self.executor.submit(plan, inputs)
        if not self.async_scheduling:
            return []
        return [self.state.release_early(unit, now) for unit in plan.work_units()
                if self._releasable(unit, sampling_rows)]

    def wait(self) -> list[UnitResult]:
        return self.executor.wait_next()

    def apply(self, result: UnitResult) -> list[RequestState]:
        return self.state.apply(result)

    def resolve(self, result: UnitResult, release: Release) -> None:
        """A released unit's tokens, in place of the pending ones (requests forgotten since are skipped); a
        request the release finished at its last token finished when that token came."""
        requests = self.state.requests
        for request_id, index in release.pending.items():
            if request_id in requests:
                self.state.resolve_token(request_id, index, result.new_tokens[request_id], result.finish_time)
        for request in release.finished:
            if request.finish_reason == "finished":
                request.finish_time = result.finish_time

    @staticmethod
    def _releasable(unit: WorkUnit, sampling_rows: Mapping[RequestId, SamplingRow] | None) -> bool:
        """Decode steps (a prompt chunk riding in one included) whose requests read no token history when
        they sample (penalties would need the pending token on the host; without rows, as in the simulator,
        nothing samples)."""
        return isinstance(unit, DecodeBatch) and (sampling_rows is None or not any(
            sampling_rows[request_id].params.uses_penalties for request_id in unit.all_request_ids))

    def check_progress(self, plan: Plan) -> None:
        """Raises SchedulerStalled if `plan` was empty while requests wait and nothing runs."""
        if plan.is_empty and not self.executor.in_flight and self.state.has_unfinished():
            raise SchedulerStalled(f"policy {getattr(self.policy, 'name', self.policy)!r} planned nothing while "
                                   f"{len(self.state.waiting)} requests wait and nothing runs")

    def _view(self):
        now = self.clock()
        if not self.compile_aware:
            return self.state.view(self.cost_model, now)
        ready = self.executor.ready_programs()
        if ready is None:
            return self.state.view(self.cost_model, now)
        return self.state.view(self.cost_model, now, ready_programs=ready,
                               compile_cost_s=self.executor.compile_seconds_per_program())
