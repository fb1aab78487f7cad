"""ESP step 1, dispatching: the cluster snapshot, memory reservation for decode growth, FIFO admission.

Data flow:
  1. `ClusterSnapshot.build(view, ...)` reads the view once: free pages per instance (a working copy the later
     steps draw from), the pages reserved for the expected growth of every decoding request (on its master),
     each decoding request's home group, the idle decode groups (maximal homes whose instances are all idle)
     and the free instances (idle, holding no KV, inside no home).
  2. `admit_fifo` takes waiting requests in queue order (`esp.queue`) whose prompt plus expected growth fits
     the pages of the candidate prefill instances (minus reservations); one that does not fit is passed over
     (backfilling). `release` / `withhold` apply the head's reservation to the snapshot.
  3. `estimate_wait` is how long the queue would wait if no instance were taken from decoding now: the
     earliest moment a busy instance or a decode group is expected to come free (from each home's totals,
     added up in `build`'s pass over the decoding requests). It is the gain side of the delay-decode
     cost/gain test in `esp.allocation`, where a second of delay costs a request its `urgency`: 1 / its
     slack to a latency target of `slo_scale` x its isolated latency. Every idle decoding request is
     weighed in one pass when the first decode group is, and each group's sum is kept for the call
     (`group_urgency`).
  4. `defer_seconds` prices leaving an admitted request waiting this step (the batching DP may do so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loong_jax.scheduler.decode_planner import home_group
from loong_jax.scheduler.groups import is_power_of_two, outermost_groups, power_of_two_sizes
from loong_jax.scheduler.view import RequestView, SchedulerView, ceil_div


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
    slo_scale: float = 25.0  # latency target = slo_scale x isolated latency (urgency is slack to it)
    request_costs: dict = field(default_factory=dict)  # (id, prompt, max) -> (isolated s, instance-s) (policy-owned)
    max_prefill_degree: int | None = None  # widest prefill group allowed (None: the cluster)
    _prefill_sizes: tuple | None = None
    _wait: float | None = None
    _prompt_pages: dict = field(default_factory=dict)  # id(request) -> pages (cache for this call)
    _urgency: dict = field(default_factory=dict)  # id(request) -> its urgency now (cache)
    _group_urgency: dict = field(default_factory=dict)  # decode group -> urgency of its requests (cache)
    _best_prefill: dict = field(default_factory=dict)  # (id(request), dop) -> prefill seconds alone (cache)
    _smallest_pool: dict = field(default_factory=dict)  # group -> fewest pages_total of a member (cache)
    _defer: dict = field(default_factory=dict)  # (id(request), wait, age limit, dop) -> `defer_seconds` (cache)
    # home group -> [decoding requests living there, Σ their context, most output tokens one has still to come]
    _home_totals: dict = field(default_factory=dict)
    _decoding_per_instance: dict | None = None

    @classmethod
    def build(cls, view: SchedulerView, growth_horizon: int, slo_scale: float = 25.0,
              request_costs: dict | None = None, max_prefill_degree: int | None = None) -> "ClusterSnapshot":
        n = view.num_instances
        snapshot = cls(view, growth_horizon, [i.pages_free for i in view.instances], [0] * n)
        snapshot.slo_scale = slo_scale
        snapshot.max_prefill_degree = max_prefill_degree
        if request_costs is not None:
            snapshot.request_costs = request_costs
        snapshot.idle = set(view.idle_instances)
        claimed: set[int] = set()
        idle_homes: dict[tuple[int, ...], list[RequestView]] = {}
        busy_members: set[int] = set()  # instances holding KV of a decode in flight
        idle, homes, reserve = snapshot.idle, snapshot.homes, snapshot.reserve
        page_size, horizon, default_output = view.page_size, growth_horizon, view.default_output_tokens
        home_totals = snapshot._home_totals
        one_instance = view.group_family  # its first n groups are (0,), (1,), ...: shared, not built per request
        # The hot loop of every schedule() call (hundreds of decoding requests): `home_group` and
        # `reserve_growth` inlined for the common single-instance request, and the homes' totals that
        # `estimate_wait` drains (`remaining_new_tokens` and `context_len` inlined).
        for request in view.decoding:
            kv, master = request.kv, request.master
            if len(kv) == 1 and (master is None or master in kv):
                home = one_instance[master if master is not None else next(iter(kv))]
            else:
                home = home_group(request, n)
            homes[request.request_id] = home
            cap, generated = request.max_new_tokens, request.num_generated
            remaining = default_output if cap is None else cap - generated
            totals = home_totals.get(home)
            if totals is None:
                home_totals[home] = [1, request.prompt_len + generated, max(0, remaining)]
            else:
                totals[0] += 1
                totals[1] += request.prompt_len + generated
                if remaining > totals[2]:
                    totals[2] = remaining
            if master is not None:
                beyond_tail = min(remaining, horizon) - (-kv.get(master, 0)) % page_size
                if beyond_tail > 0:
                    reserve[master] += -(-beyond_tail // page_size)
            if request.in_flight:
                busy_members.update(home)
            elif idle.issuperset(home):
                living = idle_homes.get(home)  # (not `setdefault`: a new list per request)
                if living is None:
                    idle_homes[home] = [request]
                else:
                    living.append(request)
        for home in home_totals:
            claimed.update(home)
        for request in view.prefilling:
            claimed.update(request.kv)
        outer_of = outermost_groups(idle_homes)
        for home, outer in outer_of.items():
            if home == outer:
                snapshot.decode_groups[outer] = []
        for home, requests in idle_homes.items():
            snapshot.decode_groups[outer_of[home]].extend(requests)
        # A decode group is only usable if no busy request also lives in it.
        for group in list(snapshot.decode_groups):
            if busy_members.intersection(group):
                del snapshot.decode_groups[group]
        snapshot.free = snapshot.idle - claimed
        return snapshot

    def release(self, group) -> None:
        """The members of `group` prefill this step (a ready reservation): they count as free instances and
        the decode groups they touch are no longer lendable (those decodes wait a step)."""
        self.free |= set(group)
        self._drop_decode_groups_touching(group)

    def withhold(self, group) -> None:
        """No new prompt goes to the members of `group` this step (a reservation holds or drains them)."""
        self.free -= set(group)
        self._drop_decode_groups_touching(group)

    def _drop_decode_groups_touching(self, group) -> None:
        members = set(group)
        for touched in [g for g in self.decode_groups if not members.isdisjoint(g)]:
            del self.decode_groups[touched]

    def decoding_per_instance(self) -> dict[int, int]:
        """Instance -> decoding requests whose home group contains it (computed once per snapshot)."""
        if self._decoding_per_instance is None:
            counts: dict[int, int] = {}
            for home, (requests, _, _) in self._home_totals.items():
                for instance in home:
                    counts[instance] = counts.get(instance, 0) + requests
            self._decoding_per_instance = counts
        return self._decoding_per_instance

    def reserve_growth(self, request: RequestView, master: int, master_tokens: int) -> None:
        """Keep pages on the master for the request's expected growth beyond its last, partly filled page."""
        page_size = self.view.page_size
        tail = (-master_tokens) % page_size
        self.reserve[master] += ceil_div(max(0, self.growth(request) - tail), page_size)

    def growth(self, request: RequestView) -> int:
        """Decode tokens to keep room for (expected output, capped by the horizon)."""
        return min(request.remaining_new_tokens(self.view.default_output_tokens), self.growth_horizon)

    def usable_pages(self, instance: int) -> int:
        return max(0, self.pages_free[instance] - self.reserve[instance])

    def usable_by_instance(self, instances) -> dict[int, int]:
        """`usable_pages` of each of `instances` (one pass: placement reads a whole group per request)."""
        pages_free, reserve = self.pages_free, self.reserve
        return {i: (left if (left := pages_free[i] - reserve[i]) > 0 else 0) for i in instances}

    def smallest_pool(self, group) -> int:
        """The fewest pages any member of `group` holds in all (cached: placement asks per request)."""
        pages = self._smallest_pool.get(group)
        if pages is None:
            pages = self._smallest_pool[group] = min(self.view.instances[i].pages_total for i in group)
        return pages

    def pages_for_prompt(self, request: RequestView) -> int:
        """Pages the prompt and its expected growth take (one spare for the partly filled last pages)."""
        pages = self._prompt_pages.get(id(request))
        if pages is None:
            pages = ceil_div(request.prefill_target + self.growth(request), self.view.page_size) + 1
            self._prompt_pages[id(request)] = pages
        return pages

    def prefill_seconds(self, request: RequestView, dop: int) -> float:
        """Prefill time of the request alone on `dop` instances (cached)."""
        key = (id(request), dop)
        seconds = self._best_prefill.get(key)
        if seconds is None:
            length = request.prefill_target
            seconds = self.view.cost_model.prefill_time_from_sums(dop, length, length * length)
            self._best_prefill[key] = seconds
        return seconds

    def defer_seconds(self, request: RequestView, wait: float, age_limit: float, dop_now: int) -> float:
        """Latency a request takes on if left waiting this step: until instances free up (at most its own
        best prefill time, since every finishing unit is a new chance), then its prefill alone at `dop_now`
        (the widest group it could have had now). Deferring thus pays off when running now would drag it
        into a worse batch, not merely because a wider group might come. Infinite once it has waited
        `age_limit` times its isolated latency (no request is deferred forever)."""
        key = (id(request), wait, age_limit, dop_now)  # each candidate prefill set asks again
        seconds = self._defer.get(key)
        if seconds is None:
            waited = self.view.now - request.arrival
            if waited > age_limit * self.isolated(request):
                seconds = math.inf
            else:
                seconds = min(wait, self.fastest_prefill_seconds(request)) + self.prefill_seconds(request, dop_now)
            self._defer[key] = seconds
        return seconds

    def fastest_prefill_seconds(self, request: RequestView) -> float:
        """Prefill time of the request alone on the widest group a prefill may use (`prefill_sizes`)."""
        return self.prefill_seconds(request, self.prefill_sizes()[-1])

    def prefill_sizes(self) -> tuple[int, ...]:
        """Sizes of the family groups a prefill may use, smallest first: powers of two and the whole cluster,
        those the cost model prices (a 64-instance cluster under a model of degrees 1-16 prefills on at most
        16), up to `max_prefill_degree`; at least the smallest degree the model prices."""
        if self._prefill_sizes is None:
            n, priced = self.view.num_instances, self.view.cost_model.prefill
            family = list(power_of_two_sizes(n)) + ([] if is_power_of_two(n) else [n])
            limit = self.max_prefill_degree or n
            self._prefill_sizes = tuple(s for s in family if s in priced and s <= limit) or (min(priced),)
        return self._prefill_sizes

    def urgency(self, requests) -> float:
        """Σ over requests of what one second of delay costs each, from its slack to a latency target of
        `slo_scale` x its isolated latency: 1 / slack (earliest deadline first), at least 1 / its whole
        budget; a request already past its target weighs 1 / budget. Weighs decode delays against prefill
        gains: a decode far from its deadline is cheap to delay, a prompt close to its deadline is not."""
        total, cache = 0.0, self._urgency
        for request in requests:
            value = cache.get(id(request))
            if value is None:
                value = self._urgency_of(request)
            total += value
        return total

    def isolated(self, request: RequestView) -> float:
        """`isolated_seconds`, memoised across calls in `request_costs` (it never changes for a request)."""
        return self._costs_of(request)[0]

    def work(self, request: RequestView) -> float:
        """`instance_seconds` of a waiting request, memoised like `isolated`."""
        return self._costs_of(request)[1]

    def _costs_of(self, request: RequestView) -> tuple[float, float]:
        key = (request.request_id, request.prompt_len, request.max_new_tokens)
        costs = self.request_costs.get(key)
        if costs is None:
            costs = self.request_costs[key] = (isolated_seconds(self.view, request),
                                                instance_seconds(self.view, request))
        return costs

    def wait(self) -> float:
        """`estimate_wait`, computed once per snapshot."""
        if self._wait is None:
            self._wait = estimate_wait(self)
        return self._wait

    def group_urgency(self, group) -> float:
        """`urgency` of a decode group's requests (`decode_groups[group]`), once per snapshot: choosing the
        prefill and consolidation both weigh every group."""
        value = self._group_urgency.get(group)
        if value is None:
            if not self._group_urgency:  # the first group: weigh the requests of every group in one pass
                for requests in self.decode_groups.values():
                    self._weigh(requests)
            value = self._group_urgency[group] = self.urgency(self.decode_groups[group])
        return value

    def _urgency_of(self, request: RequestView) -> float:
        self._weigh((request,))
        return self._urgency[id(request)]

    def _weigh(self, requests) -> None:
        """The urgency of each request, into the cache (see `urgency`). What is left of a decoding request
        (KV and a master) is its remaining output at one decode step alone on one instance,
        `decode_time(1, 1, context)`; of a waiting one, its isolated latency. (Inlined: this loop runs over
        every decoding request on every call, and the value changes with every token, so it is not kept
        across calls.)"""
        view, cache, costs = self.view, self._urgency, self.request_costs
        now, slo_scale, default = view.now, self.slo_scale, view.default_output_tokens
        coefficients = view.cost_model.decode_coefficients(1)
        fixed, per_token = coefficients.constant + coefficients.per_request * 1, coefficients.per_context_token
        for request in requests:  # (`isolated`'s memo read inline)
            entry = costs.get((request.request_id, request.prompt_len, request.max_new_tokens))
            isolated = entry[0] if entry is not None else self.isolated(request)
            if request.kv and request.master is not None:
                cap, generated = request.max_new_tokens, request.num_generated
                tokens = default if cap is None else max(0, cap - generated)
                remaining = tokens * (fixed + per_token * (request.prompt_len + generated))
            else:
                remaining = isolated
            budget = slo_scale * isolated
            slack = budget - (now - request.arrival) - remaining  # to the latency target
            cache[id(request)] = 1.0 / budget if slack <= 0 else 1.0 / min(slack, budget)


def group_pages(snapshot: ClusterSnapshot, group) -> int:
    return sum(snapshot.usable_pages(i) for i in group)


def admit_fifo(snapshot: ClusterSnapshot, waiting, pages_available: int, largest_group_pages: int,
               max_admit: int, force_head: bool = False, backfill: bool = True) -> list[RequestView]:
    """Waiting requests, in queue order, whose KV (prompt + expected growth) fits the pages available.

    A request that does not fit is passed over so later ones may use the room (backfilling: a 300K prompt
    waiting for instances must not hold up every chat behind it); the head of the queue is protected by its
    reservation (`esp.queue`), not by stopping admission. Without `backfill` (a fifo queue) admission stops
    at the first request that does not fit. With `force_head`, a head that only fits without its growth
    room is admitted on its bare prompt.
    """
    def bare_pages(k: int) -> int:
        return ceil_div(waiting[k].prefill_target, snapshot.view.page_size)

    needs = [snapshot.pages_for_prompt(r) for r in waiting]
    admitted = admit_by_pages(needs, pages_available, largest_group_pages, max_admit, backfill,
                              bare_pages if force_head else None)
    return [waiting[k] for k in admitted]


def admit_by_pages(needs: list[int], pages_available: int, largest_group_pages: int, max_admit: int,
                   backfill: bool = True, bare_pages=None) -> list[int]:
    """`admit_fifo` on the requests' page needs (positions admitted); `bare_pages(k)`, when given, is what
    request k needs without its growth room, for a head that only fits so."""
    admitted, used = [], 0
    for k, need in enumerate(needs):
        if len(admitted) >= max_admit:
            break
        if need > largest_group_pages or used + need > pages_available:
            if bare_pages is not None and not admitted:
                bare = bare_pages(k)
                if bare <= largest_group_pages and bare <= pages_available:
                    admitted.append(k)
                    used += bare
                    continue
            if not backfill:
                break
            continue
        admitted.append(k)
        used += need
    return admitted


def isolated_seconds(view: SchedulerView, request: RequestView) -> float:
    """Expected latency of the request alone on the cluster: prefill at the fastest of DoP 1 and all
    instances, then its expected output at one decode step per token on one instance."""
    cost, length = view.cost_model, max(1, request.prompt_len)
    widest = view.num_instances if view.num_instances in cost.prefill else 1
    prefill = min(cost.prefill_time_from_sums(d, length, length * length) for d in {1, widest})
    outputs = request.max_new_tokens if request.max_new_tokens is not None else view.default_output_tokens
    return prefill + outputs * cost.decode_time(1, 1, length + outputs // 2)


def instance_seconds(view: SchedulerView, request: RequestView) -> float:
    """Instance-seconds the request will occupy: its prefill on one instance (prefill work barely depends on
    the DoP) plus the marginal cost of its expected output tokens in a shared decode batch."""
    cost, length = view.cost_model, max(1, request.prompt_len)
    outputs = request.max_new_tokens if request.max_new_tokens is not None else view.default_output_tokens
    one = min(cost.prefill)
    per_token = cost.decode[min(cost.decode)]
    prefill = one * cost.prefill_time_from_sums(one, length, length * length)
    return prefill + outputs * (per_token.per_request + per_token.per_context_token * (length + outputs // 2))


def estimate_wait(snapshot: ClusterSnapshot) -> float:
    """Seconds until some instance not free now is expected to become free for prefill (inf if never)."""
    view, cost = snapshot.view, snapshot.view.cost_model
    drain_by_instance: dict[int, float] = {}  # the longest drain of a home holding the instance
    for home, (count, context, steps) in snapshot._home_totals.items():  # (`build` adds them up)
        drain = steps * cost.decode_time(len(home), count, context)
        for instance in home:
            if drain > drain_by_instance.get(instance, -math.inf):
                drain_by_instance[instance] = drain
    best = math.inf
    for instance in view.instances:
        if instance.index in snapshot.free:
            continue
        until = max(0.0, instance.busy_until - view.now) if instance.busy else 0.0
        drain = drain_by_instance.get(instance.index)
        if drain is not None:
            until = max(until, drain)
        elif not instance.busy:
            continue  # idle but held by a partial prefill: not a candidate
        best = min(best, until)
    return best
