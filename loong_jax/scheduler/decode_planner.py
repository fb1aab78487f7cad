"""Decode planning shared by the policies: masters, scale-up, recompute-preemption, decode batches.

Data flow:
  1. A decoding request's home is the smallest family group holding its KV and its master. Requests whose
     home is not entirely inside the instances the caller allows this step wait.
  2. Master: a request keeps its master while the master has a free slot (tail of its last page, or a free
     page). Otherwise it scales up: the new master is the allowed instance with the most free pages inside its
     home, then inside the parent group, and so on (old KV stays where it is).
  3. When no allowed instance in reach has a page, the newest request in reach (possibly the request itself)
     is preempted by recompute, oldest requests first served, until the request gets its slot.
  4. Homes are aligned groups, so two of them are nested or disjoint: each request joins the batch of the
     largest home containing its own, and those batches run side by side on disjoint groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Sequence

from loong_jax.scheduler.cost.estimates import decode_seconds
from loong_jax.scheduler.groups import (
    aligned_block, covering_group, outermost_groups, parent_group, power_of_two_sizes,
)
from loong_jax.scheduler.plan import DecodeBatch, Preemption
from loong_jax.scheduler.view import RequestView, SchedulerView


_by_seq = attrgetter("seq")


@dataclass
class DecodePlan:
    batches: list[DecodeBatch] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    waiting_requests: list[RequestView] = field(default_factory=list)  # could not run this step
    scale_ups: int = 0


def home_group(request: RequestView, num_instances: int) -> tuple[int, ...]:
    """The smallest family group holding the request's KV and its master."""
    if len(request.kv) == 1:  # the common case, without building sets
        (only,) = request.kv
        if request.master is None or request.master == only:
            return (only,)
    instances = set(request.kv)
    if request.master is not None:
        instances.add(request.master)
    return covering_group(instances, num_instances)


def scale_up_scope(view: SchedulerView, scale_up: bool = True):
    """`scope_of` for `plan_decodes` on the family groups: None (the whole cluster) when the cost model
    prices a decode group of every family size; else the widest aligned group it prices around the home
    (a 64-instance cluster under a model of degrees 1-16 decodes on at most 16). Without `scale_up` (an
    ablation) a request never leaves its master: out of pages, the newest request there is preempted."""
    if not scale_up:
        return lambda request, home: home if request.master is None else (request.master,)
    n, priced = view.num_instances, view.cost_model.decode
    if n in priced and all(size in priced for size in power_of_two_sizes(n)):
        return None
    widest = max((size for size in power_of_two_sizes(n) if size in priced), default=1)
    return lambda request, home: home if len(home) >= widest else aligned_block(home[0], widest)


def exclusive_page_counts(request: RequestView, page_size: int) -> dict[int, int]:
    """Pages per instance that the request's tokens fill (what preempting it returns, cached prefix pages aside)."""
    return {i: -(-n // page_size) for i, n in request.kv.items()}


def plan_decodes(
    view: SchedulerView,
    requests: Sequence[RequestView],
    allowed: set[int],
    pages_free: list[int],
    scope_of: Callable[[RequestView, tuple[int, ...]], tuple[int, ...]] | None = None,
    homes: dict | None = None,
) -> DecodePlan:
    """Decode batches for `requests` (idle decoding requests) on `allowed` instances.

    `pages_free` is the caller's running count per instance; the pages this step takes are subtracted from
    it. `scope_of(request, home)` bounds where a scale-up may look (default: the whole allowed cluster,
    searched from the home outwards). `homes` may give precomputed home groups by request id.
    """
    n = view.num_instances
    page_size = view.page_size
    plan = DecodePlan()
    # Parallel lists rather than a tuple per request: thousands of live tuples a call would set off the
    # garbage collector (which then walks every young container) once or twice per call.
    candidates, candidate_homes = [], []
    for request in sorted(requests, key=_by_seq):  # oldest first
        home = homes[request.request_id] if homes is not None else home_group(request, n)
        if allowed.issuperset(home):
            candidates.append(request)
            candidate_homes.append(home)
        else:
            plan.waiting_requests.append(request)
    preempted: set = set()
    chosen: list[RequestView] = []
    masters: list[int] = []
    chosen_homes: list[tuple[int, ...]] = []  # each chosen request's home after this step
    for index, request in enumerate(candidates):
        if preempted and request.request_id in preempted:
            continue
        home, master = candidate_homes[index], request.master
        if master is not None:  # the common case, `_find_slot`'s first test inlined: room on its master
            room = request.kv.get(master, 0) % page_size
            if room or pages_free[master] > 0:
                if not room:
                    pages_free[master] -= 1
                chosen.append(request)
                masters.append(master)
                chosen_homes.append(home)
                continue
        while True:
            master, new_home = _find_slot(request, home, allowed, pages_free, page_size, n, scope_of)
            if master is not None or new_home == "wait":
                break
            victim = _newest_in_reach(candidates[index:], preempted, request, home, allowed, n, scope_of)
            preempted.add(victim.request_id)
            plan.preemptions.append(Preemption(victim.request_id))
            for instance, pages in exclusive_page_counts(victim, page_size).items():
                pages_free[instance] += pages
            if victim is request:
                break
        if request.request_id in preempted:
            continue
        if master is None:
            plan.waiting_requests.append(request)
            continue
        if master != request.master:
            plan.scale_ups += 1
        chosen.append(request)
        masters.append(master)
        chosen_homes.append(new_home)
    plan.batches = _batches(view, chosen, masters, chosen_homes)
    return plan


def _has_tail_slot(request: RequestView, instance: int, page_size: int) -> bool:
    return request.kv.get(instance, 0) % page_size != 0


def _find_slot(request, home, allowed, pages_free, page_size, n, scope_of):
    """(master, home after the step) for one more token, taking a page from `pages_free` if needed.

    Returns (None, "wait") when the nearest room is on an instance that is not allowed now (busy or lent to
    prefill: the request waits a step) and (None, "full") when nothing in reach has room (preempt).
    """
    master = request.master
    if master is not None:
        if _has_tail_slot(request, master, page_size):
            return master, home
        if pages_free[master] > 0:
            pages_free[master] -= 1
            return master, home
    limit = set(scope_of(request, home) if scope_of else range(n))
    search: tuple[int, ...] | None = home
    while search is not None and set(search) <= limit:
        with_room = [i for i in search if pages_free[i] > 0 or _has_tail_slot(request, i, page_size)]
        if with_room:
            if not allowed.issuperset(search):
                return None, "wait"  # the decode group would include an instance not available now
            best = max(with_room, key=lambda i: (_has_tail_slot(request, i, page_size), pages_free[i], -i))
            if not _has_tail_slot(request, best, page_size):
                pages_free[best] -= 1
            return best, covering_group(set(home) | {best}, n)
        search = parent_group(search, n)
    return None, "full"


def _newest_in_reach(remaining, preempted, request, home, allowed, n, scope_of):
    """Newest not-yet-served request whose KV lies where `request` could find a slot (itself if none newer)."""
    limit = set(scope_of(request, home) if scope_of else range(n)) & allowed
    newest = request
    for other in remaining:
        if other.request_id in preempted or other is request:
            continue
        if other.seq > newest.seq and limit.intersection(other.kv):
            newest = other
    return newest


def _batches(view: SchedulerView, chosen: list[RequestView], masters: list[int],
             homes: list[tuple[int, ...]]) -> list[DecodeBatch]:
    """One batch per outermost home: its chosen requests (in order) and their masters."""
    outer_of = outermost_groups(set(homes))  # home -> the widest home containing it
    members: dict[tuple[int, ...], tuple[list, list]] = {
        outer: ([], []) for home, outer in outer_of.items() if home == outer}
    for request, master, home in zip(chosen, masters, homes):
        requests, their_masters = members[outer_of[home]]
        requests.append(request)
        their_masters.append(master)
    batches = []
    for group, (requests, their_masters) in members.items():
        contexts = [r.prompt_len + r.num_generated for r in requests]  # `context_len`, inlined (every request)
        estimate = decode_seconds(view.cost_model, len(group), contexts)
        estimate += view.compile_penalty_s("decode", group, len(requests))
        batches.append(DecodeBatch(group, tuple(r.request_id for r in requests), tuple(their_masters),
                                   estimated_s=estimate))
    return batches
