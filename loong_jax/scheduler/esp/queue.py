"""ESP queue discipline: deadline order, overload triage, rejection of never-fitting requests, the head's reservation.

Data flow:
  1. `never_fitting(view, max_tokens_per_instance)` splits off the waiting requests no group may ever hold:
     KV peak larger than the cluster, or a prompt larger than every instance's token limit times the
     instances. They are rejected (the engine finishes them with that reason) instead of waiting forever.
  2. `OfferedLoad` tracks the work (instance-seconds) of the last arrivals. When it exceeds what the cluster
     can serve, it names a work limit: serving the smallest requests first serves the most of them.
  3. `deadline_order(snapshot, waiting, work_limit)` orders the rest by latency deadline, arrival +
     slo_scale x isolated latency (earliest deadline first: a chat request is due long before a
     300K-token document that arrived at the same time). Late, behind every timely request: those over the
     work limit, then those that can no longer meet their deadline even if started now (oldest first):
     serving them first would only make others miss too. A request that has waited `starvation_limit` x
     its latency budget goes first (no request waits forever).
  4. `reserve_for_head(snapshot, head, max_prefill_seconds)`: when the head of that order does not fit the
     free instances, it gets a family group of the smallest size whose pool can hold it and that prefills
     it within a typical request's latency (a 300K prompt alone on two instances would stall their
     decodes for a minute), the one that frees soonest, then the one holding the fewest decoding requests.
     If the group has the pages now it is *held*: its idle members start nothing new (only a decode step
     that ends before the busy members free), and when every member is idle the head prefills there. If
     it lacks the pages the group *drains*: its decodes go on (they free pages as they finish) but no new
     prompt is placed on it. Shorter requests meanwhile backfill the instances the reservation does not
     need.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.groups import power_of_two_sizes
from loong_jax.scheduler.view import RequestView, SchedulerView, ceil_div


def never_fitting(view: SchedulerView, max_tokens_per_instance: int | None) -> tuple[tuple, list[RequestView]]:
    """(ids to reject, the other waiting requests in their order)."""
    pages_total = sum(i.pages_total for i in view.instances)
    prompt_limit = math.inf if max_tokens_per_instance is None else view.num_instances * max_tokens_per_instance
    rejected, kept = [], []
    for request in view.waiting:
        peak = request.prefill_target + max(1, request.remaining_new_tokens(1)) - 1
        too_big = ceil_div(peak, view.page_size) > pages_total or request.prefill_target > prompt_limit
        (rejected if too_big else kept).append(request)
    return tuple(r.request_id for r in rejected), kept


class OfferedLoad:
    """The work arriving per second, from the last `window` arrivals, and the largest request size the
    cluster can take on while serving every smaller one (shortest-job-first triage under overload).

    Each arrival is (arrival time, instance-seconds). If the arriving work of all requests up to some size
    exceeds `utilization` x the instances, requests above that size are *late*: they start only when no
    timely request waits. Serving the most requests within their SLOs under overload means serving the
    smallest ones (a 300K-token prompt costs the cluster as much as hundreds of chats); the late ones are
    still served once the load allows (at the latest when the queue drains), never rejected. No limit from
    fewer than `min_arrivals` arrivals, nor one that would make more than half of them late (a burst of
    equal requests has no largest ones to put off)."""

    def __init__(self, window: int = 256, utilization: float = 0.8, min_arrivals: int = 32):
        self.utilization, self.min_arrivals = utilization, min_arrivals
        self._arrivals: deque[tuple[float, float, float]] = deque(maxlen=window)  # (arrival, work, isolated s)
        self._last_seq = -1
        self._limit: float | None = None

    def observe(self, snapshot: ClusterSnapshot, waiting: list[RequestView]) -> None:
        new = sorted((r for r in waiting if r.seq > self._last_seq), key=lambda r: r.seq)
        for request in new:
            self._arrivals.append((request.arrival, snapshot.work(request), snapshot.isolated(request)))
            self._last_seq = request.seq
        if new:
            self._limit = None

    def work_limit(self, num_instances: int) -> float:
        """Instance-seconds above which a request is late now (inf when the load is within capacity)."""
        if self._limit is None:
            self._limit = self._compute_limit(num_instances)
        return self._limit

    def typical_latency(self) -> float:
        """Median isolated latency of the recent arrivals (inf before any)."""
        if not self._arrivals:
            return math.inf
        latencies = sorted(isolated for _, _, isolated in self._arrivals)
        return latencies[len(latencies) // 2]

    def _compute_limit(self, num_instances: int) -> float:
        if len(self._arrivals) < self.min_arrivals:  # too few to tell a sustained overload from a burst
            return math.inf
        span = self._arrivals[-1][0] - self._arrivals[0][0]
        if span <= 0:
            return math.inf
        budget = self.utilization * num_instances * span  # instance-seconds the window's arrivals may use
        works = sorted(work for _, work, _ in self._arrivals)
        used = 0.0
        for work in works:
            if used + work > budget:  # at most half late: among equal requests none is "largest"
                return max(work * (1 - 1e-9), works[len(works) // 2])
            used += work
        return math.inf


def deadline_order(snapshot: ClusterSnapshot, waiting: list[RequestView], work_limit: float = math.inf,
                   starvation_limit: float = math.inf) -> tuple[list[RequestView], list[RequestView]]:
    """(timely requests, late requests).

    Timely: first those that have waited `starvation_limit` x their latency budget (oldest first: no request
    waits forever under sustained overload), then earliest latency deadline first. Late: larger than
    `work_limit` instance-seconds (by deadline), then those that can no longer meet their deadline even if
    started now (oldest first): serving them first would only make others miss too."""
    now, scale = snapshot.view.now, snapshot.slo_scale
    overdue, timely, large, hopeless = [], [], [], []
    for request in waiting:
        isolated = snapshot.isolated(request)
        deadline = request.arrival + scale * isolated
        if now - request.arrival > starvation_limit * scale * isolated:
            overdue.append((request.arrival, request.seq, request))
        elif now + isolated > deadline:
            hopeless.append((request.arrival, request.seq, request))
        elif snapshot.work(request) > work_limit:
            large.append((deadline, request.seq, request))
        else:
            timely.append((deadline, request.seq, request))
    overdue, timely, large, hopeless = ([entry[-1] for entry in sorted(tier, key=lambda e: e[:2])]
                                        for tier in (overdue, timely, large, hopeless))
    return overdue + timely, large + hopeless


@dataclass(frozen=True)
class Reservation:
    group: tuple[int, ...]
    fits: bool  # the group has the pages for the head now (held); otherwise it drains
    ready_in: float  # seconds until its busy members are expected to be idle (0: all idle now)

    @property
    def ready(self) -> bool:
        return self.fits and self.ready_in <= 0.0


def _family_sizes(num_instances: int) -> list[int]:
    sizes = list(power_of_two_sizes(num_instances))
    if sizes[-1] != num_instances:
        sizes.append(num_instances)
    return sizes


def head_pages(snapshot: ClusterSnapshot, head: RequestView) -> tuple[int | None, int]:
    """(smallest family size whose whole pool holds the head, the pages it asks of such a group): its prompt
    and expected growth, or only the prompt when the growth would not fit even an empty group (decode
    scale-up finds that room later)."""
    view = snapshot.view
    per_instance = min(i.pages_total for i in view.instances)
    bare = ceil_div(head.prefill_target, view.page_size) + 1
    for size in _family_sizes(view.num_instances):
        if size * per_instance >= bare:
            return size, min(snapshot.pages_for_prompt(head), size * per_instance)
    return None, bare


def fits_free_instances(snapshot: ClusterSnapshot, head: RequestView) -> bool:
    """Does some family group made only of free instances have the pages for the head now?"""
    _, need = head_pages(snapshot, head)
    free = snapshot.free
    return any(free.issuperset(g) and sum(snapshot.usable_pages(i) for i in g) >= need
               for g in snapshot.view.group_family)


def reserve_for_head(snapshot: ClusterSnapshot, head: RequestView,
                     max_prefill_seconds: float = math.inf) -> Reservation | None:
    """The group reserved for the head: of the smallest size that holds it and prefills it within
    `max_prefill_seconds` (the widest that holds it if none does), so that a long prompt does not sit
    on two instances for a minute stalling every decode there."""
    view = snapshot.view
    smallest, _ = head_pages(snapshot, head)
    if smallest is None:
        return None
    wider = [s for s in _family_sizes(view.num_instances) if s >= smallest]
    size = next((s for s in wider if s in view.cost_model.prefill
                 and snapshot.prefill_seconds(head, s) <= max_prefill_seconds), wider[-1])
    need = min(snapshot.pages_for_prompt(head), size * min(i.pages_total for i in view.instances))
    homed: dict[int, int] = {}
    for home in snapshot.homes.values():
        for instance in home:
            homed[instance] = homed.get(instance, 0) + 1
    claimed_by_prefill = {i for r in view.prefilling for i in r.kv}
    best, best_key = None, None
    for group in view.group_family:
        if len(group) != size or claimed_by_prefill.intersection(group):
            continue
        usable = sum(snapshot.usable_pages(i) for i in group)
        fits = usable >= need
        ready_in = max((max(1e-9, view.instances[i].busy_until - view.now) for i in group
                        if view.instances[i].busy), default=0.0)  # a busy member is never "ready now"
        held_pages = sum(view.instances[i].pages_total - snapshot.pages_free[i] for i in group)
        key = (not fits, ready_in if fits else held_pages, sum(homed.get(i, 0) for i in group), -usable, group)
        if best_key is None or key < best_key:
            best, best_key = Reservation(group, fits, ready_in), key
    return best
