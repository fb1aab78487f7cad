"""ESP step 2, elastic instance allocation: which idle instances prefill now, and consolidation by migration.

Data flow:
  1. Candidate prefill sets: the free instances, then that set plus the idle decode groups whose requests are
     cheapest to delay, one more group each time (stopping when one more made it worse).
  2. For each candidate: admission in queue order against its pages, then the batching DP (which minimises summed
     normalised latency; a request whose cached prefix lies on the candidate's instances costs its suffix
     attending to the prefix, normalised by its whole prompt). Candidates are compared in one currency, urgency-weighted delay (a second costs a
     request 1 / its isolated latency, as SLOs are multiples of it): the batches' time for their requests,
     the delay inflicted on the lent decode groups (they wait for the longest batch), and the requests a
     wider candidate would admit that this one leaves waiting until its first batch ends.
  3. Lending decode instances is the cost/gain test: with no free instance, "do nothing" costs the queue the
     expected wait until an instance frees (plus the same prefill later); a candidate is taken only if
     cheaper.
  4. Consolidation: moving every share held on one instance x of an idle decode group to another member y
     (or, for a one-instance group, to another idle one-instance decode group) frees x for prefill. When
     nothing is taken it is planned if the queue's gain from x, U·(wait − t_mig), exceeds the decode delay
     t_mig·U_decode it costs (U: urgency); when decode groups would be lent, it replaces the lending if
     t_mig·(U_decode + U_queue) is less than the lending's delay cost.
  5. Evacuation (`plan_evacuation`): before the queue head prefills on its reserved group, the decodes whose
     home is one member of it move to idle instances outside, so they keep decoding during the prefill.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from loong_jax.scheduler.decode_planner import home_group
from loong_jax.scheduler.esp.batching import BatchingResult, plan_batches
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot, admit_by_pages, admit_fifo, group_pages
from loong_jax.scheduler.esp.multiset_dp import CoverReuse
from loong_jax.scheduler.groups import capacity_by_threshold, covering_group, free_blocks
from loong_jax.scheduler.plan import Migration
from loong_jax.scheduler.prefix import prefill_chunk
from loong_jax.scheduler.view import RequestView


@dataclass(frozen=True)
class BatchingLimits:
    max_batches: int = 8
    max_boundaries: int = 24
    max_admit: int = 256
    max_tokens_per_instance: int | None = None
    defer_age_limit: float = 4.0  # a request may be left waiting until it has waited this x its isolated latency
    backfill: bool = True  # pass over a request that does not fit (deadline queue); False: stop there (fifo)


@dataclass
class PrefillOption:
    instances: frozenset
    lent_groups: tuple  # decode groups whose instances prefill now (their decodes wait)
    admitted: list
    batching: BatchingResult
    cost: float = math.inf
    lend_cost: float = 0.0  # urgency-weighted delay the lent decode groups suffer


class PrefillChoice(NamedTuple):
    best: PrefillOption | None  # the cheapest way to prefill now (None: waiting is cheaper)
    free_only: PrefillOption | None  # the free instances alone: the choice with `max_lent_groups=0`


def _groups_inside(blocks, size: int):
    for block in blocks:
        if len(block) >= size:
            for start in range(0, len(block) - size + 1, size):
                yield block[start:start + size]


def evaluate_instances(snapshot: ClusterSnapshot, instances, waiting, limits: BatchingLimits,
                       force_head: bool, wait: float, must_run: frozenset = frozenset(),
                       reuse: CoverReuse | None = None) -> tuple[list, BatchingResult | None, list]:
    """(admitted, batching, blocks) for prefilling the head of `waiting` on `instances`; admitted requests
    the DP defers (see `ClusterSnapshot.defer_seconds`) stay waiting, except those named in `must_run`.
    `reuse` carries the batching DP's tables from one candidate to the next."""
    view = snapshot.view
    n = view.num_instances
    blocks = free_blocks(instances, n)
    if not blocks:
        return [], None, blocks
    sizes = [s for s in snapshot.prefill_sizes() if s <= len(blocks[0])]
    if not sizes:
        return [], None, blocks
    pages_capacity = {d: max(group_pages(snapshot, g) for g in _groups_inside(blocks, d)) for d in sizes}
    available = sum(snapshot.usable_pages(i) for i in instances)
    admitted = admit_fifo(snapshot, waiting, available, max(pages_capacity.values()), limits.max_admit, force_head,
                          limits.backfill)
    if not admitted:
        return [], None, blocks
    penalty = None
    if view.ready_programs is not None:
        def penalty(d: int, tokens: int) -> float:
            ready = any(view.program_ready("prefill", g, tokens) for g in _groups_inside(blocks, d))
            return 0.0 if ready else view.compile_cost_s
    thresholds = capacity_by_threshold(blocks, sizes)
    largest = max(pages_capacity.values())
    while admitted:
        defer_costs = None
        if not force_head:
            widest = max(sizes)
            defer_costs = [math.inf if r.request_id in must_run else
                           snapshot.defer_seconds(r, wait, limits.defer_age_limit, widest) / max(1, r.prefill_target)
                           for r in admitted]
        # A forced head (nothing else can run) is admitted on its bare prompt: cap its demand to what fits.
        # A prefix-cache hit on these instances computes its suffix and attends to the cached prefix.
        chunks = [prefill_chunk(r, instances) for r in admitted]
        result = plan_batches(
            [length for _, length in chunks], [min(snapshot.pages_for_prompt(r), largest) for r in admitted],
            view.cost_model, sizes, thresholds, pages_capacity, max_batches=limits.max_batches,
            max_boundaries=limits.max_boundaries, penalty=penalty,
            max_tokens_per_instance=limits.max_tokens_per_instance, defer_costs=defer_costs,
            squares=[(start + length) ** 2 - start ** 2 for start, length in chunks],
            normalizers=[max(1, r.prefill_target) for r in admitted], reuse=reuse,
        )
        if result is not None:
            return admitted, (result if result.batches else None), blocks
        admitted = admitted[: len(admitted) // 2]
    return [], None, blocks


def choose_prefill(snapshot: ClusterSnapshot, waiting, limits: BatchingLimits, max_lent_groups: int,
                   nothing_running: bool, must_run: frozenset = frozenset()) -> PrefillChoice:
    """`best`: the cheapest way to prefill now, or None when waiting is cheaper (see module docstring);
    requests in `must_run` (a ready reservation's head) are never deferred. `free_only`: what the free
    instances alone would prefill (the first candidate, which a consolidation falls back to), kept so that
    it is not evaluated twice."""
    if not waiting:
        return PrefillChoice(None, None)
    group_weight = {g: snapshot.group_urgency(g) for g in snapshot.decode_groups}
    wait = snapshot.wait()
    n = snapshot.view.num_instances

    def weighed(option: PrefillOption) -> float:
        """Urgency-weighted seconds of the option's batches and deferrals (the DP itself minimises
        normalised latency)."""
        deferred = sum(snapshot.urgency([option.admitted[i]])
                       * snapshot.defer_seconds(option.admitted[i], wait, limits.defer_age_limit,
                                                max(len(b) for b in free_blocks(option.instances, n)))
                       for i in option.batching.deferred)
        return deferred + sum(b.seconds * snapshot.urgency(option.admitted[i] for i in b.indices)
                              for b in option.batching.batches)

    def left_behind(option: PrefillOption, wider: PrefillOption) -> float:
        """Requests `wider` admits that `option` leaves waiting (at least until its first batch ends)."""
        mine = {id(r) for r in option.admitted}
        extra = [r for r in wider.admitted if id(r) not in mine]
        return snapshot.urgency(extra) * min(wait, option.batching.shortest_seconds)

    options: list[PrefillOption] = []
    free_only = None
    pool: set[int] = set(snapshot.free)
    lent: list = []
    candidates = [(frozenset(pool), ())] if pool else []
    for group in sorted(snapshot.decode_groups, key=lambda g: group_weight[g])[:max_lent_groups]:
        pool |= set(group)
        lent.append(group)
        candidates.append((frozenset(pool), tuple(lent)))
    reuse = CoverReuse()  # a wider candidate often has the narrower one's DP tables (same costs)
    for instances, lent_groups in candidates:
        admitted, result, _ = evaluate_instances(snapshot, instances, waiting, limits,
                                                 nothing_running and not lent_groups, wait, must_run, reuse)
        if result is None:
            continue
        option = PrefillOption(instances, lent_groups, admitted, result)
        option.lend_cost = option.batching.longest_seconds * sum(group_weight[g] for g in lent_groups)
        option.cost = weighed(option) + option.lend_cost
        if not lent_groups:
            free_only = dataclasses.replace(option)  # before `left_behind` below adds to the cost
        if options and option.cost >= options[-1].cost + left_behind(options[-1], option):
            break  # lending one more group made things worse: lending further will not help either
        options.append(option)
    if not options:
        return PrefillChoice(None, free_only)
    widest = max(options, key=lambda o: len(o.admitted))
    for option in options:
        option.cost += left_behind(option, widest)
    best = min(options, key=lambda o: o.cost)
    if any(not o.lent_groups for o in options):
        # Free instances delay nobody: use them unless lending decode instances as well is cheaper.
        return PrefillChoice(best, free_only)
    idle_cost = snapshot.urgency(widest.admitted) * wait + weighed(widest)
    return PrefillChoice(best if best.cost < idle_cost else None, free_only)


def plan_consolidation(snapshot: ClusterSnapshot, waiting, limits: BatchingLimits,
                       lend_cost: float | None = None, across_singles: bool = True) -> list[Migration]:
    """Migrations that free one decode instance for prefill when worth it (empty list otherwise).

    With `lend_cost=None` the alternative is waiting: the queue gains U·(wait − t_mig). Otherwise the
    alternative is lending decode groups at that delay cost: migrating instead costs t_mig to the group's
    decodes and to the queue, and saves the lending. `across_singles=False` keeps moves inside wider groups."""
    if not waiting:
        return []
    view = snapshot.view
    n, page_size, cost = view.num_instances, view.page_size, view.cost_model
    wait = snapshot.wait()
    best_net, best_moves = 0.0, []
    singles = [g[0] for g in snapshot.decode_groups if len(g) == 1] if across_singles else []
    single_urgency = {y: snapshot.group_urgency((y,)) for y in singles}
    roomiest_singles = sorted(singles, key=lambda y: -snapshot.usable_pages(y))  # stable: first among equals
    gain_by_freed: dict[int, float] = {}  # pages freed -> urgency of the queue requests they admit
    needs = [snapshot.pages_for_prompt(r) for r in waiting]

    def queue_gain(freed: int) -> float:
        if freed not in gain_by_freed:
            gainers = admit_by_pages(needs, freed, freed, limits.max_admit, limits.backfill)
            gain_by_freed[freed] = snapshot.urgency(waiting[k] for k in gainers)
        return gain_by_freed[freed]

    for group, requests in snapshot.decode_groups.items():
        delayed = snapshot.group_urgency(group)
        for x in group:
            moving = [r for r in requests if x in r.kv]
            if not moving:
                continue
            seconds = cost.migration_time(sum(r.kv[x] for r in moving))
            if lend_cost is None and wait <= seconds:
                continue
            # Inside a wider group onto a member with room; a one-instance group onto another one-instance
            # decode group (both then wait for the move), so x leaves the decode homes altogether.
            if len(group) > 1:
                targets = [(y, 0.0) for y in group if y != x]
            else:
                # A one-instance group's requests live on x alone: the pages they ask of y do not depend on
                # y, so only the target with the most room (the first of them) can take them.
                roomiest = next((y for y in roomiest_singles if y != x), None)
                targets = [] if roomiest is None else [(roomiest, single_urgency[roomiest])]
            if targets:
                pages_on_x, growth_pages = _pages_moving(moving, x, snapshot)
            for y, also_delayed in sorted(targets, key=lambda t: -snapshot.usable_pages(t[0])):
                if len(group) > 1 and not _frees_instance(requests, moving, x, y, n):
                    continue  # (a one-instance group's requests all move: x always comes free)
                need = _pages_asked_of(y, moving, x, pages_on_x, page_size) + growth_pages
                if need > snapshot.usable_pages(y):
                    continue
                freed = snapshot.pages_free[x] + pages_on_x
                if lend_cost is None:
                    net = queue_gain(freed) * (wait - seconds) - seconds * (delayed + also_delayed)
                else:
                    net = lend_cost - seconds * (delayed + also_delayed + queue_gain(freed))
                if net > best_net:
                    best_net = net
                    best_moves = [Migration(r.request_id, x, y, r.kv[x], estimated_s=cost.migration_time(r.kv[x]))
                                  for r in moving]
                break  # y with the most room was checked; others have less
    return best_moves


def _pages_moving(moving: list[RequestView], x: int, snapshot: ClusterSnapshot) -> tuple[int, int]:
    """(pages their shares fill on x, pages the growth of those mastered on x asks of their new master) of
    the requests moving off x, in one pass (counted once for every target tried)."""
    page_size, horizon, default = snapshot.view.page_size, snapshot.growth_horizon, snapshot.view.default_output_tokens
    pages = growth_pages = 0
    for request in moving:
        pages += -(-request.kv[x] // page_size)
        if request.master == x:  # `snapshot.growth`, inlined (every decoding request of the cluster passes here)
            cap = request.max_new_tokens
            growth = min(default if cap is None else max(0, cap - request.num_generated), horizon)
            growth_pages += -(-growth // page_size)
    return pages, growth_pages


def _pages_asked_of(y: int, moving: list[RequestView], x: int, pages_on_x: int, page_size: int) -> int:
    """Pages y takes when every share on x joins y's part of its request: as many as the shares fill on x
    (`pages_on_x`), less what joining a part already on y saves (their last pages merge)."""
    return pages_on_x + sum(-(-(r.kv[y] + r.kv[x]) // page_size) + (-r.kv[y] // page_size) + (-r.kv[x] // page_size)
                            for r in moving if y in r.kv)


def _frees_instance(requests: list[RequestView], moving: list[RequestView], x: int, y: int, n: int) -> bool:
    """After moving every share on x to y, is x outside every request's home?"""
    moving_ids = {id(r) for r in moving}
    for request in requests:
        if id(request) in moving_ids:
            instances = (set(request.kv) - {x}) | {y}
            master = y if request.master == x else request.master
            instances.add(master)
            home = covering_group(instances, n)
        else:
            home = home_group(request, n)
        if x in home:
            return False
    return True


def plan_evacuation(snapshot: ClusterSnapshot, group, prefill_seconds: float) -> tuple[list[Migration], float]:
    """(migrations, seconds to wait) that move the decodes living on the members of a reserved `group` to
    instances outside it, so that they keep decoding instead of stalling for the head's whole prefill.

    Only requests whose home is one member move (all of them, so the member leaves every home), and only
    when the move is much shorter than the prefill it avoids. A move needs both ends idle: when a member
    has decodes to move but no destination is idle now, the second value says how soon one is expected
    to be (inf when none will do; 0 when nothing is left to move). Destinations prefer instances that
    already hold decodes (free ones stay free), then the most usable pages."""
    view, cost, page_size = snapshot.view, snapshot.view.cost_model, snapshot.view.page_size
    members = set(group)
    by_member: dict[int, list[RequestView]] = {}
    for request in view.decoding:
        home = snapshot.homes[request.request_id]
        if len(home) == 1 and home[0] in members:
            by_member.setdefault(home[0], []).append(request)
    shared = {i for h in snapshot.homes.values() if len(h) > 1 for i in h}  # in a multi-instance home
    taken: set[int] = set()
    moves: list[Migration] = []
    wait = 0.0
    for x, requests in sorted(by_member.items()):
        tokens = sum(r.kv[x] for r in requests)
        if 10 * cost.migration_time(tokens) > prefill_seconds:
            continue
        need = sum(-(-(r.kv[x] + snapshot.growth(r)) // page_size) for r in requests)
        outside = [y for y in range(view.num_instances) if y not in members and y not in taken and y not in shared
                   and snapshot.usable_pages(y) >= need]
        targets = [y for y in outside if y in snapshot.idle]
        if x not in snapshot.idle or any(r.in_flight for r in requests) or not targets:
            soonest = min((view.instances[y].busy_until - view.now for y in outside if view.instances[y].busy),
                          default=math.inf)
            wait = max(wait, max(0.0, soonest) if outside else math.inf)
            continue
        y = max(targets, key=lambda i: (i not in snapshot.free, snapshot.usable_pages(i), -i))
        taken.update((x, y))
        snapshot.pages_free[y] -= need
        moves.extend(Migration(r.request_id, x, y, r.kv[x], estimated_s=cost.migration_time(r.kv[x]))
                     for r in requests)
    return moves, wait
