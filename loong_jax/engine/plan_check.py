"""Checking a plan before the engine state books it: a plan the state cannot carry out is a policy bug,
reported as `PlanError` before anything changes.

`check_plan(state, plan, units)`, called first by `EngineState.on_dispatched`:
  1. Units: non-empty, on existing, idle instances, no instance in two units.
  2. Requests: known, once per plan, not in flight, in the phase the unit needs (waiting or prefilling for
     a prefill, decoding for a decode, prefilling or decoding for a preemption or a migration); a prefill
     chunk starts where the request's KV ends, or at a prefix-cache hit still usable on the chunk's group
     (`PrefixHits.usable_hit`); a decode's group holds all of its KV; a migration moves a whole share.
  3. Pages: per instance, the pages the plan appends (and the idle cached pages its hits take out of the
     free pool) fit the free pages plus what its preemptions free.
"""

from __future__ import annotations

from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, RequestId, WorkUnit
from loong_jax.scheduler.view import DECODING, PREFILLING, WAITING


class PlanError(ValueError):
    """A policy produced a plan the state cannot carry out (a policy bug, never a user error)."""


def check_plan(state, plan: Plan, units: list[WorkUnit]) -> dict[RequestId, tuple[tuple[int, int], ...]]:
    """Raises PlanError unless `state` (an `EngineState`) can carry `plan` out (see the module docstring);
    returns the prefix-cache hits its prefills reuse, request -> (instance, page) per cached block."""
    owner: dict[int, WorkUnit] = {}
    for unit in units:
        if not unit.request_ids and not (isinstance(unit, DecodeBatch) and unit.fused_prefill):
            raise PlanError(f"empty unit {unit}")
        for instance in unit.group:
            if not 0 <= instance < state.num_instances:
                raise PlanError(f"instance {instance} does not exist ({state.num_instances} instances)")
            if state._busy[instance] is not None:
                raise PlanError(f"instance {instance} is busy but the plan uses it in {type(unit).__name__}")
            if instance in owner:
                raise PlanError(f"instance {instance} is in two units of one plan")
            owner[instance] = unit
    seen: set = set()

    def claim(request_id, allowed: tuple[str, ...], what: str) :
        request = state.requests.get(request_id)
        if request is None:
            raise PlanError(f"{what}: unknown request {request_id!r}")
        if request_id in seen:
            raise PlanError(f"{what}: request {request_id!r} appears twice in the plan")
        if request.in_flight:
            raise PlanError(f"{what}: request {request_id!r} is already in flight")
        if request.status not in allowed:
            raise PlanError(f"{what}: request {request_id!r} is {request.status}, expected {allowed}")
        seen.add(request_id)
        return request

    freed = [0] * state.num_instances
    released_by_preemption: dict[tuple[int, int], int] = {}  # (instance, page) -> references dropped
    for request_id in plan.rejections:
        claim(request_id, (WAITING,), "rejection")
    for preemption in plan.preemptions:
        claim(preemption.request_id, (PREFILLING, DECODING), "preemption")
        for instance, pages in state.allocator.exclusive_pages(preemption.request_id).items():
            freed[instance] += pages
        for instance in state.allocator.kv_layout(preemption.request_id):
            for page in state.allocator.page_table(preemption.request_id, instance):
                released_by_preemption[(instance, page)] = released_by_preemption.get((instance, page), 0) + 1
    hits: dict[RequestId, tuple[tuple[int, int], ...]] = {}
    demand: dict[tuple, int] = {}  # (request, instance) -> tokens appended there by this plan

    def check_prefill(batch: PrefillBatch) -> None:
        for request_id, (start, length), segments in zip(batch.request_ids, batch.chunks, batch.placement):
            request = claim(request_id, (WAITING, PREFILLING), "prefill")
            if start != request.num_computed:
                hits[request_id] = state.prefix_hits.usable_hit(request, start, batch.group)
            if start + length > request.prefill_target:
                raise PlanError(f"prefill of {request_id!r} runs to {start + length} > prompt {request.prefill_target}")
            for instance, n_tokens in segments:
                demand[(request_id, instance)] = demand.get((request_id, instance), 0) + n_tokens

    for unit in units:
        if isinstance(unit, MigrationBatch):
            for move in unit.migrations:
                request = claim(move.request_id, (PREFILLING, DECODING), "migration")
                held = request.kv.get(move.src_instance, 0)
                if held != move.n_tokens:
                    raise PlanError(f"migration of {move.request_id!r} moves {move.n_tokens} tokens from "
                                    f"{move.src_instance} which holds {held} (a migration moves a whole share)")
                key = (move.request_id, move.dst_instance)
                demand[key] = demand.get(key, 0) + move.n_tokens
        elif isinstance(unit, PrefillBatch):
            check_prefill(unit)
        else:
            if unit.fused_prefill is not None:
                check_prefill(unit.fused_prefill)
            group = set(unit.group)
            for request_id, master in zip(unit.request_ids, unit.masters):
                request = claim(request_id, (DECODING,), "decode")
                if not group.issuperset(request.kv):
                    raise PlanError(f"decode of {request_id!r}: KV on {sorted(request.kv)} not inside group {unit.group}")
                demand[(request_id, master)] = demand.get((request_id, master), 0) + 1
    needed = [0] * state.num_instances
    for (request_id, instance), n_tokens in demand.items():
        needed[instance] += state.allocator.pages_needed(request_id, instance, n_tokens)
    refcount = state.allocator.refcount
    for instance, page in {block for hit in hits.values() for block in hit}:
        # an idle cached page (only the cache holds it, after this plan's preemptions) leaves the free pool
        if refcount(instance, page) - released_by_preemption.get((instance, page), 0) == 1:
            needed[instance] += 1
    for instance, need in enumerate(needed):
        if need and need > (available := state.allocator.pages_free(instance) + freed[instance]):
            raise PlanError(f"instance {instance}: plan needs {need} pages, {available} available")
    return hits
