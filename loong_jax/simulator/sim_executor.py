"""SimExecutor: runs a plan on a virtual clock, with step times from the cost model instead of devices.

It implements the executor contract (`loong_jax.executor.protocol`), so the engine core, the unchanged
`EngineState` and the policies drive it exactly as they drive the JAX executor.

Data flow:
  1. `submit(plan, inputs)` (after `state.on_dispatched(plan)`; the inputs are not needed: lengths come from
     the state it shares with the engine core): every work unit of the plan (disjoint instance sets)
     gets a duration from the cost model (`cost.estimates.unit_seconds`, the same definition policies
     estimate with) and goes on a heap keyed by its finish time = now + duration:
       - PrefillBatch on d instances: prefill_time_from_sums(d, Σ length, Σ((start+length)² − start²)) — a chunk
         attends to everything before it, which the quadratic term prices exactly;
       - DecodeBatch on d instances: decode_time(d, batch, Σ context); a fused chunked-prefill part adds its
         prefill time minus min(A_d, a_d), because one fused forward pass streams the weights once;
       - MigrationBatch: migration_time(tokens moved).
     At the same time it decides what the unit will report: one token (id 0) for each decode request and for
     each prefill request whose chunk ends its prompt, and `finished` for requests reaching their output length.
     With `overlap` (asynchronous scheduling, as the engine serves by default) the core releases decode
     units at dispatch and plans the next step while they run: a unit then starts when the last unit on
     any of its instances ends (now, without overlap, since only idle instances are planned).
  2. `next_finish_time()` lets the loop inject arrivals that come first (`advance_to(t)`).
  3. `wait_next()` pops every unit finishing at the earliest time, moves the clock there and returns their
     `UnitResult`s for `state.apply`.
  4. `busy_seconds` (per instance) and the units run per kind are kept for reports.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from typing import Hashable, Mapping

from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import StepInputs, UnitResult
from loong_jax.scheduler.cost import estimates
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, WorkUnit

NEW_TOKEN_ID = 0  # the simulator produces no real tokens; every generated token is id 0


class SimExecutor:
    def __init__(self, cost_model: CostModel, state: EngineState, output_lengths: Mapping[Hashable, int],
                 overlap: bool = False):
        self.cost_model = cost_model
        self.state = state
        self.output_lengths = output_lengths  # request id -> tokens it generates in total
        self.feeds_pending_tokens = overlap  # the core may release decode units early (see step 1)
        self.now = 0.0
        self._free_at = [0.0] * state.num_instances  # when the last unit on each instance ends
        self._heap: list[tuple[float, int, UnitResult]] = []
        self._order = itertools.count()  # FIFO among equal finish times
        self.busy_seconds = [0.0] * state.num_instances
        self.units_run: Counter[str] = Counter()

    # -- timing -------------------------------------------------------------------------------------------------
    def unit_seconds(self, unit: WorkUnit) -> float:
        """The cost model's duration of a unit (`cost.estimates.unit_seconds`, the one definition)."""
        if not isinstance(unit, (PrefillBatch, DecodeBatch, MigrationBatch)):
            raise TypeError(f"unknown work unit {type(unit).__name__}")
        return estimates.unit_seconds(self.cost_model, unit, lambda request_id: self.state.requests[request_id].context_len)

    # -- what a unit reports --------------------------------------------------------------------------------------
    def _outcome(self, unit: WorkUnit) -> tuple[dict, frozenset]:
        producing: list[Hashable] = []
        prefill = unit if isinstance(unit, PrefillBatch) else getattr(unit, "fused_prefill", None)
        if prefill is not None:
            for request_id, (start, length) in zip(prefill.request_ids, prefill.chunks):
                if start + length == self.state.requests[request_id].prefill_target:
                    producing.append(request_id)
        if isinstance(unit, DecodeBatch):
            producing.extend(unit.request_ids)
        finished = frozenset(
            r for r in producing if self.state.requests[r].num_generated + 1 >= self.output_lengths[r]
        )
        return {r: NEW_TOKEN_ID for r in producing}, finished

    # -- the executor interface -----------------------------------------------------------------------------------
    @property
    def num_instances(self) -> int:
        return self.state.num_instances

    def submit(self, plan: Plan, inputs: StepInputs | None = None) -> None:
        """Start every unit of an already dispatched plan at the current virtual time."""
        for unit in plan.work_units():
            seconds = self.unit_seconds(unit)
            if seconds < 0:
                raise ValueError(f"cost model gave a negative time {seconds} for {unit}")
            new_tokens, finished = self._outcome(unit)
            finish_time = max([self.now] + [self._free_at[i] for i in unit.group]) + seconds
            result = UnitResult(unit, new_tokens, finished, finish_time)
            heapq.heappush(self._heap, (finish_time, next(self._order), result))
            for instance in unit.group:
                self.busy_seconds[instance] += seconds
                self._free_at[instance] = finish_time
            self._count(unit)

    def _count(self, unit: WorkUnit) -> None:
        if isinstance(unit, PrefillBatch):
            self.units_run["prefill"] += 1
        elif isinstance(unit, DecodeBatch):
            self.units_run["decode"] += 1
            if unit.fused_prefill is not None:
                self.units_run["fused_prefill"] += 1
        else:
            self.units_run["migration"] += 1

    @property
    def in_flight(self) -> int:
        return len(self._heap)

    def ready_programs(self) -> None:
        return None  # nothing compiles in a simulation

    def compile_seconds_per_program(self) -> float:
        return 0.0

    def stats(self) -> dict:
        return {f"units_{kind}": count for kind, count in self.units_run.items()}

    def next_finish_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def advance_to(self, time: float) -> None:
        """Move the clock forward (to an arrival) without passing a pending completion."""
        upcoming = self.next_finish_time()
        if upcoming is not None and time > upcoming:
            raise ValueError(f"cannot advance to {time}: a unit finishes at {upcoming}")
        self.now = max(self.now, time)

    def wait_next(self) -> list[UnitResult]:
        """Results of every unit finishing at the earliest pending time; the clock moves there."""
        if not self._heap:
            return []
        first_time = self._heap[0][0]
        results = []
        while self._heap and self._heap[0][0] == first_time:
            results.append(heapq.heappop(self._heap)[2])
        self.now = max(self.now, first_time)
        return results
