"""ESP queue discipline: deadline order, rejection of never-fitting requests, the reservation for the head.

Data flow:
  1. `never_fitting(view, max_tokens_per_instance)` splits off the waiting requests no group may ever hold:
     KV peak larger than the cluster, or a prompt larger than every instance's token limit times the
     instances. They are rejected (the engine finishes them with that reason) instead of waiting forever.
  2. `deadline_order(snapshot, waiting)` orders the rest by latency deadline, arrival + slo_scale x isolated
     latency (earliest deadline first: a chat request is due long before a 300K-token document that
     arrived at the same time). A request that can no longer meet its deadline even if it started now goes
     behind every request that still can (oldest first): serving it first would only make others miss too.
  3. `reserve_for_head(snapshot, head)`: when the head of that order does not fit the free instances, it
     gets a family group of the smallest size whose pool can hold it (the one that frees soonest, then the
     one holding the fewest decoding requests). If the group has the pages now it is *held*: its idle
     members start nothing new (only a decode step that ends before the busy members free), and when every
     member is idle the head prefills there. If it lacks the pages the group *drains*: its decodes go on
     (they free pages as they finish) but no new prompt is placed on it. Shorter requests meanwhile
     backfill the instances the reservation does not need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loong_jax.scheduler.esp_dispatch import ClusterSnapshot
from loong_jax.scheduler.groups import power_of_two_sizes
from loong_jax.scheduler.view import RequestView, SchedulerView


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def never_fitting(view: SchedulerView, max_tokens_per_instance: int | None) -> tuple[tuple, list[RequestView]]:
    """(ids to reject, the other waiting requests in their order)."""
    pages_total = sum(i.pages_total for i in view.instances)
    prompt_limit = math.inf if max_tokens_per_instance is None else view.num_instances * max_tokens_per_instance
    rejected, kept = [], []
    for request in view.waiting:
        peak = request.prefill_target + max(1, request.remaining_new_tokens(1)) - 1
        too_big = _ceil_div(peak, view.page_size) > pages_total or request.prefill_target > prompt_limit
        (rejected if too_big else kept).append(request)
    return tuple(r.request_id for r in rejected), kept


def deadline_order(snapshot: ClusterSnapshot, waiting: list[RequestView]) -> list[RequestView]:
    """Earliest latency deadline first; requests already unable to meet theirs last, oldest first."""
    now, scale = snapshot.view.now, snapshot.slo_scale

    def key(request: RequestView):
        isolated = snapshot.isolated(request)
        deadline = request.arrival + scale * isolated
        if now + isolated > deadline:
            return (1, request.arrival, request.seq)
        return (0, deadline, request.seq)

    return sorted(waiting, key=key)


@dataclass(frozen=True)
class Reservation:
    group: tuple[int, ...]
    fits: bool  # the group has the pages for the head now (held); otherwise it drains
    ready_in: float  # seconds until its busy members are expected to be idle (0: all idle now)

    @property
    def ready(self) -> bool:
        return self.fits and self.ready_in <= 0.0


def head_pages(snapshot: ClusterSnapshot, head: RequestView) -> tuple[int | None, int]:
    """(smallest family size whose whole pool holds the head, the pages it asks of such a group): its prompt
    and expected growth, or only the prompt when the growth would not fit even an empty group (decode
    scale-up finds that room later)."""
    view = snapshot.view
    per_instance = min(i.pages_total for i in view.instances)
    bare = _ceil_div(head.prefill_target, view.page_size) + 1
    sizes = list(power_of_two_sizes(view.num_instances))
    if sizes[-1] != view.num_instances:
        sizes.append(view.num_instances)
    for size in sizes:
        if size * per_instance >= bare:
            return size, min(snapshot.pages_for_prompt(head), size * per_instance)
    return None, bare


def fits_free_instances(snapshot: ClusterSnapshot, head: RequestView) -> bool:
    """Does some family group made only of free instances have the pages for the head now?"""
    _, need = head_pages(snapshot, head)
    free = snapshot.free
    return any(free.issuperset(g) and sum(snapshot.usable_pages(i) for i in g) >= need
               for g in snapshot.view.group_family)


def reserve_for_head(snapshot: ClusterSnapshot, head: RequestView) -> Reservation | None:
    view = snapshot.view
    size, need = head_pages(snapshot, head)
    if size is None:
        return None
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
