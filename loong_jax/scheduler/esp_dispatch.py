"""ESP step 1, dispatching: the cluster snapshot, memory reservation for decode growth, FIFO admission.

Data flow:
  1. `ClusterSnapshot.build(view, ...)` reads the view once: free pages per instance (a working copy the later
     steps draw from), the pages reserved for the expected growth of every decoding request (on its master),
     each decoding request's home group, the idle decode groups (maximal homes whose instances are all idle)
     and the free instances (idle, holding no KV, inside no home).
  2. `admit_fifo` takes waiting requests in arrival order while their prompt plus expected growth fits the
     pages of the candidate prefill instances (minus reservations), stopping at the first that does not fit
     (strict FIFO: a long request is never overtaken forever).
  3. `estimate_wait` is how long the queue would wait if no instance were taken from decoding now: the
     earliest moment a busy instance or a decode group is expected to come free. It is the gain side of the
     delay-decode cost/gain test in `esp_allocation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loong_jax.scheduler.decode_planner import home_group
from loong_jax.scheduler.view import RequestView, SchedulerView


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class ClusterSnapshot:
    view: SchedulerView
    growth_horizon: int
    pages_free: list[int]  # working copy: placement and decode planning take pages from it
    reserve: list[int]  # pages kept for the decode growth of requests mastered on each instance
    homes: dict = field(default_factory=dict)  # request id -> home group (every decoding request)
    decode_groups: dict = field(default_factory=dict)  # maximal idle home group -> its idle requests
    free: set = field(default_factory=set)  # idle instances no decoding request needs
    idle: set = field(default_factory=set)

    @classmethod
    def build(cls, view: SchedulerView, growth_horizon: int) -> "ClusterSnapshot":
        n, page_size = view.num_instances, view.page_size
        snapshot = cls(view, growth_horizon, [i.pages_free for i in view.instances], [0] * n)
        snapshot.idle = set(view.idle_instances)
        claimed: set[int] = set()
        idle_homes: dict[tuple[int, ...], list[RequestView]] = {}
        for request in view.decoding:
            home = home_group(request, n)
            snapshot.homes[request.request_id] = home
            claimed.update(home)
            if request.master is not None:
                tail = (-request.kv.get(request.master, 0)) % page_size
                snapshot.reserve[request.master] += _ceil_div(max(0, snapshot.growth(request) - tail), page_size)
            if not request.in_flight and snapshot.idle.issuperset(home):
                idle_homes.setdefault(home, []).append(request)
        for request in view.prefilling:
            claimed.update(request.kv)
        outer: list[tuple[int, ...]] = []
        for home in sorted(idle_homes, key=lambda g: (-len(g), g)):
            if not any(set(home) <= set(g) for g in outer):
                outer.append(home)
        for group in outer:
            snapshot.decode_groups[group] = [r for home, rs in idle_homes.items() if set(home) <= set(group) for r in rs]
        # A decode group is only usable if no busy request also lives in it.
        busy_homes = [snapshot.homes[r.request_id] for r in view.decoding if r.in_flight]
        for group in list(snapshot.decode_groups):
            if any(set(group) & set(h) for h in busy_homes):
                del snapshot.decode_groups[group]
        snapshot.free = snapshot.idle - claimed
        return snapshot

    def growth(self, request: RequestView) -> int:
        """Decode tokens to keep room for (expected output, capped by the horizon)."""
        return min(request.remaining_new_tokens(self.view.default_output_tokens), self.growth_horizon)

    def usable_pages(self, instance: int) -> int:
        return max(0, self.pages_free[instance] - self.reserve[instance])

    def pages_for_prompt(self, request: RequestView) -> int:
        return _ceil_div(request.prefill_target + self.growth(request), self.view.page_size) + 1


def group_pages(snapshot: ClusterSnapshot, group) -> int:
    return sum(snapshot.usable_pages(i) for i in group)


def admit_fifo(snapshot: ClusterSnapshot, waiting, pages_available: int, largest_group_pages: int,
               max_admit: int, force_head: bool = False) -> list[RequestView]:
    """Waiting requests, in arrival order, whose KV (prompt + expected growth) fits the pages available."""
    admitted, used = [], 0
    for request in waiting:
        if len(admitted) >= max_admit:
            break
        need = snapshot.pages_for_prompt(request)
        if need > largest_group_pages or used + need > pages_available:
            if force_head and not admitted:
                bare = _ceil_div(request.prefill_target, snapshot.view.page_size)
                if bare <= largest_group_pages and bare <= pages_available:
                    admitted.append(request)
            break
        admitted.append(request)
        used += need
    return admitted


def normalised_weight(requests) -> float:
    """Σ 1/input length: what one second of delay costs these requests in summed normalised latency."""
    return sum(1.0 / max(1, r.prompt_len) for r in requests)


def estimate_wait(snapshot: ClusterSnapshot) -> float:
    """Seconds until some instance not free now is expected to become free for prefill (inf if never)."""
    view, cost = snapshot.view, snapshot.view.cost_model
    drain_by_home: dict[tuple[int, ...], float] = {}
    members: dict[tuple[int, ...], list[RequestView]] = {}
    for request in view.decoding:
        members.setdefault(snapshot.homes[request.request_id], []).append(request)
    for home, requests in members.items():
        steps = max(r.remaining_new_tokens(view.default_output_tokens) for r in requests)
        step_time = cost.decode_time(len(home), len(requests), sum(r.context_len for r in requests))
        drain_by_home[home] = steps * step_time
    best = math.inf
    for instance in view.instances:
        if instance.index in snapshot.free:
            continue
        until = max(0.0, instance.busy_until - view.now) if instance.busy else 0.0
        covering = [t for home, t in drain_by_home.items() if instance.index in home]
        if covering:
            until = max(until, max(covering))
        elif not instance.busy:
            continue  # idle but held by a partial prefill: not a candidate
        best = min(best, until)
    return best

