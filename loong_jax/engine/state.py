"""Engine state on the host: requests, queues, busy instances and the KV page allocator.

The engine loop is event driven (programs on disjoint groups run side by side):
  1. `add_request(...)` validates and queues a request (FIFO); one that can never fit the cluster's KV is
     rejected here with a ValueError.
  2. `view(cost_model, now)` hands the policy a `SchedulerView`; the policy returns a `Plan` for idle instances.
  3. `on_dispatched(plan, now)` checks the plan (idle, disjoint instances; pages available; requests in the
     right phase) and applies its page accounting in order: rejections, preemptions (recompute: KV freed,
     request back to waiting with its generated tokens kept), migrations (destination pages taken, source
     pages held until done), prefills (pages per placement), decodes (one slot on each master). The units'
     instances and requests are now in flight.
  4. `step_inputs(plan, sampling_rows)`: what travels with the plan to the executor (each request's page
     tables and KV layout after this dispatch, each migration's tickets).
  5. `apply(UnitResult)` when a unit finishes: its instances become idle, new tokens are recorded, prefills
     that reached the end of their prompt start decoding, finished or aborted requests free their pages.

Prefix cache: a request queued with its prompt token ids (or simulated block hashes) gets its block hashes
once; `view` tells the policy what each waiting request finds cached (`prefix_hits.PrefixHits`); a prefill
starting at the cached length is a hit, checked (`plan_check`) and attached before any page of the plan
is taken; a finished prefill's full pages enter the cache (`KVAllocator.cache_prompt_pages`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping

from loong_jax.engine.kv_allocator import KVAllocator
from loong_jax.engine.plan_check import PlanError, check_plan
from loong_jax.engine.prefix_hits import PrefixHits
from loong_jax.engine.prefix_cache import BlockHash, PrefixCacheOptions, chain_hashes
from loong_jax.executor.protocol import PENDING_TOKEN, MigrationTicket, RequestInputs, StepInputs, UnitResult
from loong_jax.sampling.batch import SamplingRow
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, RequestId, WorkUnit
from loong_jax.scheduler.view import (
    DECODING, FINISHED, PREFILLING, WAITING, InstanceView, RequestView, SchedulerView,
)


@dataclass(slots=True, eq=False)
class RequestState(RequestView):
    """A request's live record: the numbers of its `RequestView` plus tokens and timings."""

    generated: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "finished", "abort", "rejected"
    num_preemptions: int = 0
    ending: str | None = None  # finish asked while in flight ("abort", "finished"): done when its unit returns
    block_hashes: tuple[BlockHash, ...] = ()  # of the prompt's full pages (prefix cache)
    prefix_hit: tuple[tuple[int, int], ...] = ()  # (instance, page) per cached block, as of `prefix_hit_version`
    prefix_hit_version: int = -1
    computing_prefix: bool = False  # its prompt's blocks are counted in `PrefixHits` (prefill running)


@dataclass(frozen=True)
class Release:
    """A unit accounted before its tokens are known (`EngineState.release_early`)."""

    unit: WorkUnit
    pending: dict[RequestId, int]  # request -> index of the output token the unit samples for it
    finished: list[RequestState]  # finished on release: max_new_tokens reached, or a finish asked meanwhile


@dataclass
class _InFlight:
    unit: WorkUnit
    dispatched_at: float
    tickets: list[MigrationTicket] = field(default_factory=list)


class EngineState:
    def __init__(self, num_instances: int, pages_per_instance: int | list[int], page_size: int,
                 prefix_cache: PrefixCacheOptions | None = None):
        self.allocator = KVAllocator(pages_per_instance, page_size, num_instances, prefix_cache)
        self.prefix_cache = self.allocator.prefix_cache
        self.num_instances = self.allocator.num_instances
        self.page_size = page_size
        self.requests: dict[RequestId, RequestState] = {}
        self._waiting: list[RequestState] = []  # sorted by seq
        # Changes with every removal or insertion other than an arrival appended at the tail (`view` keeps
        # its answer against it and the queue's length).
        self._waiting_edits = 0
        self.prefilling: dict[RequestId, RequestState] = {}
        self.decoding: dict[RequestId, RequestState] = {}
        self.finished: dict[RequestId, RequestState] = {}
        self._busy: list[WorkUnit | None] = [None] * self.num_instances
        self._busy_until = [0.0] * self.num_instances
        self._in_flight: dict[WorkUnit, _InFlight] = {}
        self._next_seq = 0
        self.prefix_hits = PrefixHits(self.prefix_cache, page_size)
        self.counters = {"preemptions": 0, "migrations": 0, "scale_ups": 0, "scale_downs": 0, "rejections": 0}

    # -- requests -----------------------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.allocator.total_pages * self.page_size

    def add_request(self, request_id: RequestId, prompt_len: int, max_new_tokens: int | None = None,
                    arrival: float = 0.0, prompt_token_ids=None,
                    block_hashes: tuple[BlockHash, ...] | None = None) -> RequestState:
        """Queue a request. With `prompt_token_ids` (or, from simulated workloads, `block_hashes`) its prompt
        can reuse and fill the prefix cache."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # KV holds every token but the last generated one.
        peak_tokens = prompt_len + (max_new_tokens or 1) - 1
        if peak_tokens > self.capacity_tokens:
            raise ValueError(
                f"request {request_id!r} needs KV for {peak_tokens} tokens (prompt {prompt_len} + max_new_tokens "
                f"{max_new_tokens} - 1) but the whole cluster holds {self.capacity_tokens} tokens "
                f"({self.num_instances} instances x {self.allocator.total_pages // self.num_instances} pages x "
                f"{self.page_size}); shorten the prompt or lower max_new_tokens"
            )
        if prompt_token_ids is not None and len(prompt_token_ids) != prompt_len:
            raise ValueError(f"request {request_id!r}: {len(prompt_token_ids)} prompt token ids for prompt_len "
                             f"{prompt_len}")
        if block_hashes is None:
            block_hashes = ()
            if prompt_token_ids is not None and self.prefix_cache.enabled:
                block_hashes = chain_hashes(prompt_token_ids, self.page_size, self.prefix_cache.options.model_identity)
        request = RequestState(request_id=request_id, seq=self._next_seq, arrival=arrival, prompt_len=prompt_len,
                               max_new_tokens=max_new_tokens, block_hashes=tuple(block_hashes))
        self._next_seq += 1
        self.requests[request_id] = request
        self._waiting.append(request)  # (last in seq order: no edit)
        return request

    @property
    def waiting(self) -> tuple[RequestState, ...]:
        return tuple(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.prefilling or self.decoding)

    def abort(self, request_id: RequestId, now: float = 0.0) -> bool:
        """Finish a request as aborted; pages are freed now, or when its running unit returns."""
        return self.finish_request(request_id, "abort", now)

    def finish_request(self, request_id: RequestId, reason: str, now: float = 0.0) -> bool:
        """Finish a request ("abort", or "finished" when the engine saw it stop after its unit was released):
        pages are freed now, or when the unit it is running in returns (whose token for it is dropped)."""
        request = self.requests.get(request_id)
        if request is None or request.status == FINISHED:
            return False
        if request.in_flight:
            request.ending = reason
            return True
        self._finish(request, reason, now)
        return True

    def forget(self, request_id: RequestId) -> None:
        """Drop a finished request's record (a long-running engine would otherwise keep every one)."""
        request = self.requests.get(request_id)
        if request is None or request.status != FINISHED:
            raise ValueError(f"only finished requests can be forgotten, {request_id!r} is "
                             f"{'unknown' if request is None else request.status}")
        del self.requests[request_id]
        self.finished.pop(request_id, None)

    # -- what the policy sees -----------------------------------------------------------------------------------
    def view(self, cost_model, now: float = 0.0, **options) -> SchedulerView:
        instances = tuple(map(InstanceView, range(self.num_instances), self.allocator.pages_per_instance,
                              self.allocator.pages_free_per_instance(), [u is not None for u in self._busy],
                              self._busy_until))
        return SchedulerView(
            instances=instances, waiting=self.prefix_hits.visible(self._waiting, self._waiting_edits),
            decoding=tuple(self.decoding.values()),
            prefilling=tuple(self.prefilling.values()), page_size=self.page_size, cost_model=cost_model, now=now,
            **options,
        )

    def is_busy(self, instance: int) -> bool:
        return self._busy[instance] is not None

    def in_flight_units(self) -> list[WorkUnit]:
        return list(self._in_flight)

    def step_inputs(self, plan: Plan, sampling_rows: Mapping[RequestId, SamplingRow]) -> StepInputs:
        """What the executor needs beside a dispatched plan: every request's sampling row (given by the
        engine, which knows prompts and parameters), page tables and KV layout; every migration's tickets."""
        allocator = self.allocator
        requests = {}
        for request_id, row in sampling_rows.items():
            layout = allocator.kv_layout(request_id)
            requests[request_id] = RequestInputs(row, {i: allocator.page_table(request_id, i) for i in layout},
                                                 layout)
        migrations = {unit: tuple(self._in_flight[unit].tickets)
                      for unit in plan.work_units() if isinstance(unit, MigrationBatch)}
        return StepInputs(requests, migrations)

    # -- dispatch -----------------------------------------------------------------------------------------------
    def on_dispatched(self, plan: Plan, now: float = 0.0) -> list[WorkUnit]:
        """Check the plan, apply its accounting, mark its units in flight; returns the units to execute."""
        units = list(plan.work_units())
        hits = check_plan(self, plan, units)
        for request_id, hit in hits.items():  # before any allocation of this plan could evict these pages
            self.allocator.attach_prefix(request_id, hit)
            self.requests[request_id].kv = self.allocator.kv_layout(request_id)
        for request_id in plan.rejections:
            self.counters["rejections"] += 1
            self._finish(self.requests[request_id], "rejected", now)
        for preemption in plan.preemptions:
            self._preempt(self.requests[preemption.request_id])
        for unit in units:
            record = _InFlight(unit, now)
            if isinstance(unit, MigrationBatch):
                for move in unit.migrations:
                    request = self.requests[move.request_id]
                    record.tickets.append(self.allocator.begin_migration(move.request_id, move.src_instance,
                                                                         move.dst_instance))
                    if request.master == move.src_instance:
                        request.master = move.dst_instance
                    request.kv = self.allocator.kv_layout(move.request_id)
                    request.in_flight = True
                    self.counters["migrations"] += 1
            elif isinstance(unit, PrefillBatch):
                self._dispatch_prefill(unit, now)
            else:
                if unit.fused_prefill is not None:
                    self._dispatch_prefill(unit.fused_prefill, now)
                for request_id, master in zip(unit.request_ids, unit.masters):
                    request = self.requests[request_id]
                    if master not in request.kv:
                        self.counters["scale_ups"] += 1
                    self.allocator.allocate(request_id, master, 1)
                    request.kv[master] = request.kv.get(master, 0) + 1
                    request.master = master
                    request.in_flight = True
            for instance in unit.group:
                self._busy[instance] = unit
                self._busy_until[instance] = now + unit.estimated_s
            self._in_flight[unit] = record
        return units

    def _dispatch_prefill(self, batch: PrefillBatch, now: float) -> None:
        if batch.leaving_instances:
            self.counters["scale_downs"] += 1
        for request_id, (start, _), segments in zip(batch.request_ids, batch.chunks, batch.placement):
            request = self.requests[request_id]
            if request.status == WAITING:
                self.prefix_hits.count_query(request, start)
                self.prefix_hits.track_computing(request, True)
                self._remove_waiting(request)
                request.status = PREFILLING
                self.prefilling[request_id] = request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            position = start
            for instance, n_tokens in segments:
                self.allocator.allocate(request_id, instance, n_tokens, start_position=position)
                position += n_tokens
            request.kv = self.allocator.kv_layout(request_id)
            request.master = segments[-1][0]
            request.in_flight = True

    # -- results ------------------------------------------------------------------------------------------------
    def apply(self, result: UnitResult) -> list[RequestState]:
        """Record a finished unit; returns the requests that finished with it (including aborted ones)."""
        record = self._in_flight.pop(result.unit, None)
        if record is None:
            raise PlanError(f"result for a unit that is not in flight: {result.unit}")
        unit = record.unit
        for instance in unit.group:
            self._busy[instance] = None
        now = result.finish_time
        touched: list[RequestState] = []
        if isinstance(unit, MigrationBatch):
            for ticket in record.tickets:
                self.allocator.finish_migration(ticket)
            touched = [self.requests[r] for r in unit.request_ids]
        else:
            prefill = unit if isinstance(unit, PrefillBatch) else unit.fused_prefill
            if prefill is not None:
                for request_id, (start, length) in zip(prefill.request_ids, prefill.chunks):
                    request = self.requests[request_id]
                    touched.append(request)
                    if start + length == request.prefill_target and request.ending is None:
                        self.allocator.cache_prompt_pages(request_id, request.block_hashes)
                        self.prefix_hits.track_computing(request, False)
                        self._take_token(request, result, now)
                        del self.prefilling[request_id]
                        request.status = DECODING
                        self.decoding[request_id] = request
            if isinstance(unit, DecodeBatch):
                for request_id in unit.request_ids:
                    request = self.requests[request_id]
                    touched.append(request)
                    if request.ending is None:
                        self._take_token(request, result, now)
        done: list[RequestState] = []
        for request in touched:
            request.in_flight = False
            if request.ending is not None:
                self._finish(request, request.ending, now)
                done.append(request)
            elif request.request_id in result.finished:
                self._finish(request, "finished", now)
                done.append(request)
        return done

    # -- asynchronous scheduling ------------------------------------------------------------------------------
    def release_early(self, unit: WorkUnit, now: float) -> "Release":
        """Account a just-dispatched decode unit as finished before its tokens are known, so that
        the next plan is made while it runs: its instances become idle, and each request it samples takes
        `PENDING_TOKEN` as its next token (the executor feeds the real one on the device; `resolve_token`
        writes it here when the result comes back). A request that reaches max_new_tokens finishes here,
        its last token still pending."""
        if not isinstance(unit, DecodeBatch):
            raise PlanError(f"only decode steps are released early, not a {type(unit).__name__}")
        requests = [self.requests[request_id] for request_id in unit.all_request_ids]
        before = [request.num_generated for request in requests]
        done = self.apply(UnitResult(unit, dict.fromkeys(unit.all_request_ids, PENDING_TOKEN), finish_time=now))
        for request in requests:
            if request.status != FINISHED and request.remaining_new_tokens(1) == 0:
                self._finish(request, "finished", now)
                done.append(request)
        pending = {request.request_id: index for request, index in zip(requests, before)
                   if request.num_generated > index}
        return Release(unit, pending, done)

    def resolve_token(self, request_id: RequestId, index: int, token: int, now: float) -> None:
        """The token a released unit sampled for output `index`, in place of its `PENDING_TOKEN`."""
        request = self.requests[request_id]
        if request.generated[index] != PENDING_TOKEN:
            raise PlanError(f"output {index} of {request_id!r} is {request.generated[index]}, not pending")
        request.generated[index] = int(token)
        if index == 0:
            request.first_token_time = now

    def _take_token(self, request: RequestState, result: UnitResult, now: float) -> None:
        try:
            token = result.new_tokens[request.request_id]
        except KeyError:
            raise PlanError(f"result of {type(result.unit).__name__} lacks a token for {request.request_id!r}") from None
        request.generated.append(int(token))
        request.num_generated += 1
        if request.first_token_time is None:
            request.first_token_time = now

    # -- state changes --------------------------------------------------------------------------------------------
    def _remove_waiting(self, request: RequestState) -> None:
        index = bisect.bisect_left(self._waiting, request.seq, key=lambda r: r.seq)
        if index >= len(self._waiting) or self._waiting[index] is not request:
            raise PlanError(f"request {request.request_id!r} is not waiting")
        del self._waiting[index]
        self._waiting_edits += 1

    def _preempt(self, request: RequestState) -> None:
        self.prefix_hits.track_computing(request, False)
        self.allocator.free_request(request.request_id)
        self.prefilling.pop(request.request_id, None)
        self.decoding.pop(request.request_id, None)
        request.kv = {}
        request.master = None
        request.status = WAITING
        request.num_preemptions += 1
        self.counters["preemptions"] += 1
        bisect.insort(self._waiting, request, key=lambda r: r.seq)
        self._waiting_edits += 1

    def _finish(self, request: RequestState, reason: str, now: float) -> None:
        self.prefix_hits.track_computing(request, False)
        self.allocator.free_request(request.request_id)
        if request.status == WAITING:
            self._remove_waiting(request)
        self.prefilling.pop(request.request_id, None)
        self.decoding.pop(request.request_id, None)
        request.kv = {}
        request.status = FINISHED
        request.finish_reason = reason
        request.finish_time = now
        self.finished[request.request_id] = request

    def check_invariants(self) -> None:
        """Cross-check the request records against the allocator (tests call this after every step)."""
        self.allocator.check_invariants()
        for request_id, request in self.requests.items():
            layout = self.allocator.kv_layout(request_id)
            assert request.kv == layout, f"{request_id!r}: view kv {request.kv} != allocator {layout}"
            if request.status in (WAITING, FINISHED):
                assert not layout, f"{request_id!r} is {request.status} but holds KV"
            if request.status == DECODING and not request.in_flight:
                assert request.num_computed == request.context_len - 1, f"{request_id!r}: decode KV count"
        units = {u for u in self._busy if u is not None}
        assert units == set(self._in_flight), "busy instances and in-flight units disagree"
        self.prefix_hits.check_invariants(self.requests.values(), self._waiting, self._waiting_edits)


def make_state_for(cost_model, num_instances: int, prefix_cache: PrefixCacheOptions | None = None) -> EngineState:
    """An EngineState with the KV geometry the cost model describes (same capacity for every policy)."""
    return EngineState(num_instances, cost_model.pages_per_instance, cost_model.page_size, prefix_cache)
