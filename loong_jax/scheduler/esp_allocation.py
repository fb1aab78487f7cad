"""ESP step 2, elastic instance allocation: which idle instances prefill now, and consolidation by migration.

Data flow:
  1. Candidate prefill sets: the free instances, then that set plus the idle decode groups whose requests are
     cheapest to delay (smallest Σ 1/input length), one more group each time.
  2. For each candidate: FIFO admission against its pages, then the batching DP. Its cost is the DP's summed
     normalised latency, plus the delay it inflicts — the lent decode groups' requests wait for the longest
     batch — plus the admitted-elsewhere requests that it leaves waiting until its first batch ends.
  3. Lending decode instances is the cost/gain test: with no free instance, "do nothing" costs the queue the
     expected wait until an instance frees (plus the same prefill later); a candidate is taken only if
     cheaper.
  4. When nothing is taken, consolidation: moving every share held on one instance x of an idle decode group
     to another member y frees x for prefill; it is planned when the queue's gain from x, W·(wait − t_mig),
     exceeds the decode delay t_mig·W_decode it costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loong_jax.scheduler.decode_planner import home_group
from loong_jax.scheduler.esp_batching import BatchingResult, plan_batches
from loong_jax.scheduler.esp_dispatch import (
    ClusterSnapshot, admit_fifo, estimate_wait, group_pages, normalised_weight,
)
from loong_jax.scheduler.groups import capacity_by_threshold, covering_group, free_blocks, power_of_two_sizes
from loong_jax.scheduler.plan import Migration
from loong_jax.scheduler.view import RequestView


@dataclass(frozen=True)
class BatchingLimits:
    max_batches: int = 8
    max_boundaries: int = 24
    max_admit: int = 256
    max_tokens_per_instance: int | None = None


@dataclass
class PrefillOption:
    instances: frozenset
    lent_groups: tuple  # decode groups whose instances prefill now (their decodes wait)
    admitted: list
    batching: BatchingResult
    cost: float = math.inf


def _groups_inside(blocks, size: int):
    for block in blocks:
        if len(block) >= size:
            for start in range(0, len(block) - size + 1, size):
                yield block[start:start + size]


def evaluate_instances(snapshot: ClusterSnapshot, instances, waiting, limits: BatchingLimits,
                       force_head: bool) -> tuple[list, BatchingResult | None, list]:
    """(admitted, batching, blocks) for prefilling the FIFO head of `waiting` on `instances`."""
    view = snapshot.view
    n = view.num_instances
    blocks = free_blocks(instances, n)
    if not blocks:
        return [], None, blocks
    sizes = [s for s in power_of_two_sizes(n) if s <= len(blocks[0])]
    if len(blocks[0]) not in sizes:  # the whole cluster when n is not a power of two
        sizes.append(len(blocks[0]))
    pages_capacity = {d: max(group_pages(snapshot, g) for g in _groups_inside(blocks, d)) for d in sizes}
    available = sum(snapshot.usable_pages(i) for i in instances)
    admitted = admit_fifo(snapshot, waiting, available, max(pages_capacity.values()), limits.max_admit, force_head)
    if not admitted:
        return [], None, blocks
    penalty = None
    if view.ready_programs is not None:
        def penalty(d: int, tokens: int) -> float:
            ready = any(view.program_ready("prefill", g, tokens) for g in _groups_inside(blocks, d))
            return 0.0 if ready else view.compile_cost_s
    thresholds = capacity_by_threshold(blocks, sizes)
    while admitted:
        result = plan_batches(
            [r.prefill_target for r in admitted], [snapshot.pages_for_prompt(r) for r in admitted],
            view.cost_model, sizes, thresholds, pages_capacity, max_batches=limits.max_batches,
            max_boundaries=limits.max_boundaries, penalty=penalty,
            max_tokens_per_instance=limits.max_tokens_per_instance,
        )
        if result is not None:
            return admitted, result, blocks
        admitted = admitted[: len(admitted) // 2]
    return [], None, blocks


def choose_prefill(snapshot: ClusterSnapshot, waiting, limits: BatchingLimits, max_lent_groups: int,
                   nothing_running: bool) -> PrefillOption | None:
    """The cheapest way to prefill now, or None when waiting is cheaper (see module docstring)."""
    if not waiting:
        return None
    lendable = sorted(snapshot.decode_groups.items(), key=lambda item: normalised_weight(item[1]))
    candidates: list[tuple[frozenset, tuple]] = []
    if snapshot.free:
        candidates.append((frozenset(snapshot.free), ()))
    pool, lent = set(snapshot.free), []
    for group, _ in lendable[:max_lent_groups]:
        pool |= set(group)
        lent.append(group)
        candidates.append((frozenset(pool), tuple(lent)))
    options = []
    for instances, lent_groups in candidates:
        force = nothing_running and not lent_groups
        admitted, result, _ = evaluate_instances(snapshot, instances, waiting, limits, force)
        if result is not None:
            options.append(PrefillOption(instances, lent_groups, admitted, result))
    if not options:
        return None
    widest = max(options, key=lambda o: len(o.admitted))
    wait = estimate_wait(snapshot)
    for option in options:
        delayed = sum(normalised_weight(snapshot.decode_groups[g]) for g in option.lent_groups)
        left_behind = normalised_weight(widest.admitted[len(option.admitted):])
        next_chance = min(wait, option.batching.shortest_seconds)
        option.cost = option.batching.cost + option.batching.longest_seconds * delayed + left_behind * next_chance
    best = min(options, key=lambda o: o.cost)
    if any(not o.lent_groups for o in options):
        # Free instances delay nobody: use them unless lending decode instances as well is cheaper.
        return best
    idle_cost = normalised_weight(widest.admitted) * wait + widest.batching.cost
    return best if best.cost < idle_cost else None


def plan_consolidation(snapshot: ClusterSnapshot, waiting, limits: BatchingLimits) -> list[Migration]:
    """Migrations that free one decode instance for prefill when worth it (empty list otherwise)."""
    if not waiting:
        return []
    view = snapshot.view
    n, page_size, cost = view.num_instances, view.page_size, view.cost_model
    wait = estimate_wait(snapshot)
    best_net, best_moves = 0.0, []
    for group, requests in snapshot.decode_groups.items():
        if len(group) < 2:
            continue
        delayed = normalised_weight(requests)
        for x in group:
            moving = [r for r in requests if x in r.kv]
            if not moving:
                continue
            tokens = sum(r.kv[x] for r in moving)
            seconds = cost.migration_time(tokens)
            if wait <= seconds:
                continue
            for y in sorted(group, key=lambda i: -snapshot.usable_pages(i)):
                if y == x or not _frees_instance(requests, moving, x, y, n):
                    continue
                need = sum(-(-(r.kv.get(y, 0) + r.kv[x]) // page_size) - (-(-r.kv.get(y, 0) // page_size))
                           for r in moving)
                need += sum(-(-snapshot.growth(r) // page_size) for r in moving if r.master == x)
                if need > snapshot.usable_pages(y):
                    continue
                freed = snapshot.pages_free[x] + sum(-(-r.kv[x] // page_size) for r in moving)
                gainers = admit_fifo(snapshot, waiting, freed, freed, limits.max_admit)
                net = normalised_weight(gainers) * (wait - seconds) - seconds * delayed
                if net > best_net:
                    best_net = net
                    best_moves = [Migration(r.request_id, x, y, r.kv[x], estimated_s=cost.migration_time(r.kv[x]))
                                  for r in moving]
                break  # y with the most room was checked; others have less
    return best_moves


def _frees_instance(requests: list[RequestView], moving: list[RequestView], x: int, y: int, n: int) -> bool:
    """After moving every share on x to y, is x outside every request's home?"""
    for request in requests:
        if request in moving:
            instances = (set(request.kv) - {x}) | {y}
            master = y if request.master == x else request.master
            instances.add(master)
            home = covering_group(instances, n)
        else:
            home = home_group(request, n)
        if x in home:
            return False
    return True

