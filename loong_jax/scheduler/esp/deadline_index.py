"""The deadline queue kept across `schedule()` calls: ESP's order without rescanning 10,000 waiting requests.

`esp.queue.deadline_order` sorts every waiting request into four tiers each call (overdue, timely, large,
hopeless). This index gives the same answer for the head of the queue, incrementally.

Data flow of `DeadlineIndex.step(snapshot, waiting, never_fits, ...)`:
  1. Diff the waiting requests against the last call: when the last call's requests are still the head of
     the list (the common case: nothing left, perhaps arrivals at the tail) the tail is new; otherwise sets
     of object ids (C speed) tell which requests left (dropped) and which are new. New ones get an entry
     (deadline, isolated latency, work) and are checked once by `never_fits` (rejected, never queued). A
     request is the same object for as long as it waits (the index holds it, so its id is not reused); a
     preempted one comes back as a new entry.
  2. Time only moves forward, and a request only moves down the tiers as it does: timely (not yet hopeless)
     -> hopeless (now + isolated > deadline) -> overdue (waited `starvation_limit` x its budget). Heaps of
     the (approximate) moments each entry crosses them hand the index the entries to re-check; the exact
     comparisons of `deadline_order` decide, so the order is the same to the last bit.
  3. The queue: overdue entries (oldest first), then the not-hopeless entries in deadline order whose work
     is within the overload limit, up to `limit` of them; the count of late requests comes from a sorted
     list of the not-hopeless entries' works. When no request is timely, the late tiers are built in full
     (`late_tiers`): the rare, already overloaded case.
  4. With admission control, `refuse_past_deadline` sets the hopeless and overdue entries aside as
     rejections (`rejections`), like the never-fitting ones.
A clock running backwards or a different cluster (`signature`) rebuilds the index from nothing.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.view import RequestView

_MARGIN = 1e-6  # seconds: heap keys are computed differently from the exact tests, so look a little early


@dataclass(eq=False, slots=True)
class _Entry:
    request: RequestView
    isolated: float
    work: float
    deadline: float

    @property
    def by_deadline(self) -> tuple:
        return (self.deadline, self.request.seq, id(self.request))

    @property
    def by_age(self) -> tuple:
        return (self.request.arrival, self.request.seq, id(self.request))


class DeadlineIndex:
    def __init__(self, slo_scale: float, starvation_limit: float):
        self.slo_scale, self.starvation_limit = slo_scale, starvation_limit
        self._reset(None)

    def _reset(self, signature: Hashable) -> None:
        self._signature, self._now = signature, -math.inf
        self._entries: dict[int, _Entry] = {}  # id(request) -> entry, every waiting request that may be served
        self._rejected: dict[int, RequestView] = {}  # never fitting: reported until they leave
        self._timely: list[tuple] = []  # by_deadline keys of entries neither hopeless nor overdue, sorted
        self._works: list[float] = []  # works of those entries, sorted
        self._hopeless: set[int] = set()
        self._overdue: list[tuple] = []  # by_age keys, sorted
        self._to_hopeless: list[tuple] = []  # heap of (moment, seq, id)
        self._to_overdue: list[tuple] = []  # heap of (moment, seq, id)
        self._state: dict[int, str] = {}  # id -> "timely" | "hopeless" | "overdue"
        self._waiting: tuple = ()  # the waiting requests of the last call (holding them keeps their ids)

    def step(self, snapshot: ClusterSnapshot, waiting, never_fits: Callable[[RequestView], bool],
             signature: Hashable) -> list[RequestView]:
        """The new servable requests, by seq (never-fitting ones are set aside for `rejections`)."""
        now = snapshot.view.now
        if signature != self._signature or now < self._now:
            self._reset(signature)
        self._now = now
        waiting, previous = tuple(waiting), self._waiting
        if waiting[:len(previous)] == previous:  # none of them left (requests compare by identity)
            new = list(reversed(waiting[len(previous):]))  # arrivals at the tail only, or no change
        else:
            new = self._diff(waiting)
        self._waiting = waiting
        for request in new:
            if never_fits(request):
                self._rejected[id(request)] = request
            else:
                self._add(snapshot, request)
        self._advance(now)
        return sorted((r for r in new if id(r) in self._entries), key=lambda r: r.seq)

    def _diff(self, waiting: tuple) -> list[RequestView]:
        """Drop the entries of requests that left; the new requests, the latest first."""
        current = set(map(id, waiting))
        for key in self._entries.keys() - current:
            self._remove(key)
        for key in self._rejected.keys() - current:
            del self._rejected[key]
        new_ids = current - self._entries.keys() - self._rejected.keys()
        new = []
        if new_ids:
            for request in reversed(waiting):  # arrivals are at the tail
                if id(request) in new_ids:
                    new.append(request)
                    if len(new) == len(new_ids):
                        break
        return new

    def rejections(self, waiting) -> tuple:
        """Ids of the waiting requests set aside (never fitting, or refused), in waiting order."""
        if not self._rejected:
            return ()
        return tuple(r.request_id for r in waiting if id(r) in self._rejected)

    def refuse_past_deadline(self) -> None:
        """Admission control: set aside every request that can no longer meet its deadline (hopeless or
        overdue) and has produced no token yet."""
        for key in [k for k, state in self._state.items() if state != "timely"]:
            request = self._entries[key].request
            if request.num_generated == 0:
                self._remove(key)
                self._rejected[key] = request

    def queue(self, work_limit: float, limit: int) -> tuple[list[RequestView], int]:
        """(up to `limit` timely requests in order, the number of late ones); an empty list when none is
        timely."""
        entries = self._entries
        head = [entries[key[-1]].request for key in self._overdue[:limit]]
        for key in self._timely:
            if len(head) >= limit:
                break
            entry = entries[key[-1]]
            if entry.work <= work_limit:
                head.append(entry.request)
        within = bisect.bisect_right(self._works, work_limit)
        late = len(self._hopeless) + len(self._works) - within
        if not self._overdue and not within:
            head = []
        return head, late

    def late_tiers(self, work_limit: float) -> list[RequestView]:
        """The late requests in order: over the work limit (by deadline), then hopeless (oldest first)."""
        entries = self._entries
        large = [entries[key[-1]].request for key in self._timely if entries[key[-1]].work > work_limit]
        hopeless = sorted((entries[key] for key in self._hopeless), key=lambda e: e.by_age)
        return large + [e.request for e in hopeless]

    def _add(self, snapshot: ClusterSnapshot, request: RequestView) -> None:
        isolated = snapshot.isolated(request)
        entry = _Entry(request, isolated, snapshot.work(request), request.arrival + self.slo_scale * isolated)
        key = id(request)
        self._entries[key] = entry
        self._state[key] = "timely"
        bisect.insort(self._timely, entry.by_deadline)
        bisect.insort(self._works, entry.work)
        scale = self.slo_scale
        heapq.heappush(self._to_hopeless, (request.arrival + (scale - 1) * isolated, request.seq, key))
        heapq.heappush(self._to_overdue, (request.arrival + self.starvation_limit * scale * isolated,
                                          request.seq, key))

    def _remove(self, key: int) -> None:
        entry, state = self._entries.pop(key), self._state.pop(key)
        if state == "timely":
            self._drop_timely(entry)
        elif state == "hopeless":
            self._hopeless.discard(key)
        else:
            del self._overdue[bisect.bisect_left(self._overdue, entry.by_age)]
        # Heap items of removed entries are skipped when they come up.

    def _drop_timely(self, entry: _Entry) -> None:
        del self._timely[bisect.bisect_left(self._timely, entry.by_deadline)]
        del self._works[bisect.bisect_left(self._works, entry.work)]

    def _advance(self, now: float) -> None:
        """Move the entries whose moment has come down the tiers (the exact tests of `deadline_order`)."""
        scale, starvation = self.slo_scale, self.starvation_limit
        self._pop_due(self._to_overdue, now, lambda e: now - e.request.arrival > starvation * scale * e.isolated,
                      self._make_overdue)
        self._pop_due(self._to_hopeless, now, lambda e: now + e.isolated > e.deadline, self._make_hopeless)

    def _pop_due(self, heap: list, now: float, exact, move) -> None:
        not_yet = []
        while heap and heap[0][0] <= now + _MARGIN * (1.0 + abs(now)):
            item = heapq.heappop(heap)
            entry = self._entries.get(item[2])
            if entry is None or entry.request.seq != item[1]:
                continue  # left the queue (or a new request under a reused id has its own item)
            if exact(entry):
                move(item[2], entry)
            else:
                not_yet.append(item)  # within the margin: look again next call
        for item in not_yet:
            heapq.heappush(heap, item)

    def _make_hopeless(self, key: int, entry: _Entry) -> None:
        if self._state[key] == "timely":  # an overdue entry stays overdue
            self._drop_timely(entry)
            self._hopeless.add(key)
            self._state[key] = "hopeless"

    def _make_overdue(self, key: int, entry: _Entry) -> None:
        state = self._state[key]
        if state == "overdue":
            return
        if state == "timely":
            self._drop_timely(entry)
        else:
            self._hopeless.discard(key)
        bisect.insort(self._overdue, entry.by_age)
        self._state[key] = "overdue"
