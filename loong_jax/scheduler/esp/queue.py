"""Queue disciplines: ESP's deadline order, overload triage, rejection of never-fitting requests, the head's
reservation; and `QueueDiscipline`, which every policy uses (`queue=fifo|deadline`, `admission=on|off`).

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
     need. On a fixed layout (the baselines) `reserve_fixed_group` picks one of the policy's own groups.
  5. `QueueDiscipline` puts these together for any policy: `order` / `head` (ESP, incremental through
     `esp.deadline_index`) give the queue, `admit` offers it to the policy's placement (fifo stops at the
     first request that does not fit, deadline backfills), `fixed_layout_queue` adds the reservation for a
     baseline; with admission control, requests past their deadline are rejected instead of deferred.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loong_jax.scheduler.esp.deadline_index import DeadlineIndex
from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.groups import free_blocks
from loong_jax.scheduler.view import RequestView, SchedulerView, ceil_div


def never_fitting(view: SchedulerView, max_tokens_per_instance: int | None,
                  prefill_width: int | None = None) -> tuple[tuple, list[RequestView]]:
    """(ids to reject, the other waiting requests in their order): see `never_fits_test`."""
    never_fits, _ = never_fits_test(view, max_tokens_per_instance, prefill_width)
    rejected, kept = [], []
    for request in view.waiting:
        (rejected if never_fits(request) else kept).append(request)
    return tuple(r.request_id for r in rejected), kept


def never_fits_test(view: SchedulerView, max_tokens_per_instance: int | None, prefill_width: int | None = None):
    """(test, the cluster facts it depends on): is a request one no group may ever hold? Its KV peak is
    larger than the cluster, or its prompt larger than every instance's token limit times the instances, or
    (with `prefill_width` narrower than the cluster) than the pools of that many instances (the widest
    prefill group)."""
    pages_total = sum(i.pages_total for i in view.instances)
    prompt_limit = math.inf if max_tokens_per_instance is None else view.num_instances * max_tokens_per_instance
    prompt_pages = math.inf
    if prefill_width is not None and prefill_width < view.num_instances:
        prompt_pages = prefill_width * min(i.pages_total for i in view.instances)
    page_size = view.page_size

    def never_fits(request: RequestView) -> bool:
        peak = request.prefill_target + max(1, request.remaining_new_tokens(1)) - 1
        return (ceil_div(peak, page_size) > pages_total or request.prefill_target > prompt_limit
                or ceil_div(request.prefill_target, page_size) > prompt_pages)

    return never_fits, (pages_total, prompt_limit, prompt_pages, page_size)


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
        self._typical: float | None = None  # `typical_latency`, until the next arrival

    def observe(self, snapshot: ClusterSnapshot, waiting: list[RequestView]) -> None:
        new = sorted((r for r in waiting if r.seq > self._last_seq), key=lambda r: r.seq)
        for request in new:
            self._arrivals.append((request.arrival, snapshot.work(request), snapshot.isolated(request)))
            self._last_seq = request.seq
        if new:
            self._limit = self._typical = None

    def work_limit(self, num_instances: int) -> float:
        """Instance-seconds above which a request is late now (inf when the load is within capacity)."""
        if self._limit is None:
            self._limit = self._compute_limit(num_instances)
        return self._limit

    def typical_latency(self) -> float:
        """Median isolated latency of the recent arrivals (inf before any)."""
        if not self._arrivals:
            return math.inf
        if self._typical is None:
            latencies = sorted(isolated for _, _, isolated in self._arrivals)
            self._typical = latencies[len(latencies) // 2]
        return self._typical

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


QUEUE_DISCIPLINES = ("fifo", "deadline")
ADMISSION_VALUES = {"on": True, "off": False, True: True, False: False}  # 1 / 0 count as True / False


class QueueDiscipline:
    """The order in which a policy offers its waiting requests, and what becomes of one that does not fit
    now: one implementation for every policy (the policy option `queue=fifo|deadline`).

    fifo: arrival order; admission stops at the first request that does not fit (no backfilling, no
    reservation). deadline (ESP's): overload triage and deadline order (`OfferedLoad`, `deadline_order`);
    a request that does not fit is passed over so that later ones backfill, and the head of the queue gets
    a reservation (`reserve_for_head` on ESP's group family, `reserve_fixed_group` on a fixed layout).

    With `admission` on (admission control, either discipline), a waiting request that has produced no
    token and can no longer meet its deadline even if started now (`past_deadline`) is refused: rejected
    (the plan's `rejections`), not deferred until the queue drains, so the backlog stays bounded."""

    def __init__(self, kind: str = "deadline", slo_scale: float = 25.0, target_utilization: float = 0.8,
                 starvation_limit: float = 4.0, admission: bool | str = False):
        if kind not in QUEUE_DISCIPLINES:
            raise ValueError(f"queue must be one of {', '.join(QUEUE_DISCIPLINES)}, got {kind!r}")
        if admission not in ADMISSION_VALUES:
            raise ValueError(f"admission must be on or off, got {admission!r}")
        self.admission = ADMISSION_VALUES[admission]
        if slo_scale <= 0 or target_utilization <= 0 or starvation_limit <= 0:
            raise ValueError("queue: slo_scale, target_utilization and starvation_limit must be > 0")
        self.kind = kind
        self.slo_scale = slo_scale  # latency target = slo_scale x isolated latency (deadlines, urgency)
        self.load = OfferedLoad(utilization=target_utilization)  # under overload the largest requests go late
        self.starvation_limit = starvation_limit  # x its latency budget: a request waiting so long goes first
        self.request_costs: dict = {}  # isolated latency and work per request: constant, kept across calls
        self.late_requests = 0  # waiting requests in the late tiers at the last step (a server metric)
        self._index = DeadlineIndex(slo_scale, starvation_limit)  # `order` kept across calls, for `head`

    @property
    def backfills(self) -> bool:
        """Is a request that does not fit passed over (True), or does admission stop there (False)?"""
        return self.kind == "deadline"

    def snapshot(self, view: SchedulerView, growth_horizon: int, max_prefill_degree: int | None = None) -> ClusterSnapshot:
        if len(self.request_costs) > 4 * (len(view.waiting) + len(view.decoding)) + 1024:
            self.request_costs.clear()  # forget finished requests now and then
        return ClusterSnapshot.build(view, growth_horizon, self.slo_scale, self.request_costs, max_prefill_degree)

    def order(self, snapshot: ClusterSnapshot, servable: list[RequestView]) -> list[RequestView]:
        """The queue this step. fifo: `servable` as it is (arrival order). deadline: timely requests in
        deadline order; when none waits, the late ones. While anything runs, a late request over the
        overload work limit only starts if its prefill holds its instances no longer than a typical
        request's whole latency (a 300K prompt, 12 s on every instance, waits for an idle cluster; a long
        chat does not)."""
        if self.kind == "fifo":
            return list(servable)
        view = snapshot.view
        self.load.observe(snapshot, servable)
        limit = self.load.work_limit(view.num_instances)
        timely, late = deadline_order(snapshot, servable, limit, self.starvation_limit)
        self.late_requests = len(late)
        return timely or self._late_queue(snapshot, late, limit)

    def _late_queue(self, snapshot: ClusterSnapshot, late: list[RequestView], work_limit: float) -> list[RequestView]:
        """The queue when no request is timely: the late ones, but while anything runs not one over the work
        limit whose prefill would hold its instances longer than a typical request's whole latency."""
        view = snapshot.view
        if not (view.decoding or view.prefilling):
            return late
        typical = self.load.typical_latency()
        return [r for r in late if snapshot.work(r) <= work_limit or snapshot.fastest_prefill_seconds(r) <= typical]

    def head(self, snapshot: ClusterSnapshot, never_fits, cluster_facts, limit: int) -> tuple[tuple, list[RequestView]]:
        """(ids of the waiting requests that can never fit (`never_fits_test`), the first `limit` requests of
        the queue): `order` of the others, kept incrementally across calls for the deadline discipline
        (`DeadlineIndex`: the same order without rescanning every waiting request)."""
        view = snapshot.view
        if self.kind == "fifo":
            rejected, servable = [], []
            for request in view.waiting:
                refused = never_fits(request) or (self.admission and self._past_deadline(snapshot, request))
                (rejected if refused else servable).append(request)
            return tuple(r.request_id for r in rejected), servable[:limit]
        arrived = self._index.step(snapshot, view.waiting, never_fits, cluster_facts)
        if self.admission:
            self._index.refuse_past_deadline()
        rejections = self._index.rejections(view.waiting)
        self.load.observe(snapshot, arrived)
        work_limit = self.load.work_limit(view.num_instances)
        queue, self.late_requests = self._index.queue(work_limit, limit)
        if not queue:
            queue = self._late_queue(snapshot, self._index.late_tiers(work_limit), work_limit)[:limit]
        return rejections, queue

    def admit(self, queue, place: Callable[[RequestView], bool]) -> None:
        """Offer the requests of `queue` in order to `place` (True: admitted). fifo stops at the first one
        not admitted; deadline passes over it (backfilling)."""
        for request in queue:
            if not place(request) and not self.backfills:
                return

    def fixed_layout_queue(self, view: SchedulerView, servable: list[RequestView], growth_horizon: int,
                           groups, idle: set) -> tuple[list[RequestView], tuple[int, ...] | None, tuple]:
        """(the queue, the group no new prompt may use this step, the ids refused by admission control) for
        a policy on the fixed prefill `groups`: fifo leaves `servable` in its order and reserves nothing (no
        snapshot is built unless admission control needs one)."""
        if self.kind == "fifo" and not self.admission:
            return list(servable), None, ()
        snapshot = self.snapshot(view, growth_horizon)
        refused = ()
        if self.admission:
            refused_requests = [r for r in servable if self._past_deadline(snapshot, r)]
            refused = tuple(r.request_id for r in refused_requests)
            servable = [r for r in servable if r not in refused_requests] if refused else servable
        if self.kind == "fifo":
            return servable, None, refused
        queue = self.order(snapshot, servable)
        reserved = reserve_fixed_group(snapshot, queue[0], groups, idle) if queue else None
        return queue, reserved, refused

    def _past_deadline(self, snapshot: ClusterSnapshot, request: RequestView) -> bool:
        """Admission control refuses it: no token yet, and past its deadline even if started now (the
        hopeless and overdue tiers of `deadline_order`)."""
        if request.num_generated:
            return False
        now, scale, isolated = snapshot.view.now, snapshot.slo_scale, snapshot.isolated(request)
        return (now - request.arrival > self.starvation_limit * scale * isolated
                or now + isolated > request.arrival + scale * isolated)


@dataclass(frozen=True)
class Reservation:
    group: tuple[int, ...]
    fits: bool  # the group has the pages for the head now (held); otherwise it drains
    ready_in: float  # seconds until its busy members are expected to be idle (0: all idle now)

    @property
    def ready(self) -> bool:
        return self.fits and self.ready_in <= 0.0


def head_pages(snapshot: ClusterSnapshot, head: RequestView) -> tuple[int | None, int]:
    """(smallest prefill group size whose whole pool holds the head, the pages it asks of such a group): its
    prompt and expected growth, or only the prompt when the growth would not fit even an empty group (decode
    scale-up finds that room later)."""
    view = snapshot.view
    per_instance = min(i.pages_total for i in view.instances)
    bare = ceil_div(head.prefill_target, view.page_size) + 1
    for size in snapshot.prefill_sizes():
        if size * per_instance >= bare:
            return size, min(snapshot.pages_for_prompt(head), size * per_instance)
    return None, bare


def fits_free_instances(snapshot: ClusterSnapshot, head: RequestView) -> bool:
    """Does some prefill group made only of free instances have the pages for the head now?"""
    _, need = head_pages(snapshot, head)
    usable = snapshot.usable_pages
    # Every family group made of free instances lies inside one of the maximal free blocks.
    for block in free_blocks(snapshot.free, snapshot.view.num_instances):
        for size in snapshot.prefill_sizes():
            for start in range(0, len(block) - size + 1, size):
                if sum(usable(i) for i in block[start:start + size]) >= need:
                    return True
    return False


def reserve_for_head(snapshot: ClusterSnapshot, head: RequestView,
                     max_prefill_seconds: float = math.inf) -> Reservation | None:
    """The group reserved for the head: of the smallest size that holds it and prefills it within
    `max_prefill_seconds` (the widest that holds it if none does), so that a long prompt does not sit
    on two instances for a minute stalling every decode there."""
    view = snapshot.view
    smallest, _ = head_pages(snapshot, head)
    if smallest is None:
        return None
    wider = [s for s in snapshot.prefill_sizes() if s >= smallest]
    size = next((s for s in wider if snapshot.prefill_seconds(head, s) <= max_prefill_seconds), wider[-1])
    need = min(snapshot.pages_for_prompt(head), size * min(i.pages_total for i in view.instances))
    claimed_by_prefill = {i for r in view.prefilling for i in r.kv}
    candidates = [g for g in view.group_family if len(g) == size and not claimed_by_prefill.intersection(g)]
    return best_reservation(snapshot, candidates, need)


def best_reservation(snapshot: ClusterSnapshot, groups, need: int) -> Reservation | None:
    """Of `groups`, the one to reserve for a head asking `need` pages: one with the pages now (the soonest
    idle), else the one holding the fewest pages (it drains first); then the fewest decoding requests
    living on it, the most usable pages."""
    view = snapshot.view
    homed = snapshot.decoding_per_instance()
    best, best_key = None, None
    for group in groups:
        usable = sum(snapshot.usable_pages(i) for i in group)
        fits = usable >= need
        ready_in = max((max(1e-9, view.instances[i].busy_until - view.now) for i in group
                        if view.instances[i].busy), default=0.0)  # a busy member is never "ready now"
        held_pages = sum(view.instances[i].pages_total - snapshot.pages_free[i] for i in group)
        key = (not fits, ready_in if fits else held_pages, sum(homed.get(i, 0) for i in group), -usable, group)
        if best_key is None or key < best_key:
            best, best_key = Reservation(group, fits, ready_in), key
    return best


def reserve_fixed_group(snapshot: ClusterSnapshot, head: RequestView, groups, idle: set) -> tuple[int, ...] | None:
    """On a fixed layout, the group held for the queue's head when no idle one of `groups` has the usable
    pages for it now (`best_reservation` among those whose whole pool holds it); None when one has."""
    per_instance = min(i.pages_total for i in snapshot.view.instances)
    bare = ceil_div(head.prefill_target, snapshot.view.page_size) + 1

    def need(group) -> int:
        return min(snapshot.pages_for_prompt(head), len(group) * per_instance)

    if any(idle.issuperset(g) and sum(snapshot.usable_pages(i) for i in g) >= need(g) for g in groups):
        return None
    holding = [g for g in groups if len(g) * per_instance >= bare]
    if not holding:
        return None
    reservation = best_reservation(snapshot, holding, need(holding[0]))
    return None if reservation is None else reservation.group
