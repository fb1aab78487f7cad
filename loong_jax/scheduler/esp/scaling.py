"""ESP step 4, the scaling plan for prefill: where each prompt's KV stays (proactive scale-down).

During a ring prefill every KV block passes every member of the group, so any member can keep any token at
no extra cost. The plan keeps each request on as few members as can hold its prompt plus its expected decode
growth; members keeping nothing leave the group when the prefill ends.

Data flow, per batch (longest request first):
  1. Try sub-groups of the batch group from size 1 upwards (aligned, so the request's decode group stays in
     the family), no wider than the fewest instances whose whole pools hold the request; among those of the
     smallest size that fit, prefer instances that already hold decodes, then the most free pages.
  2. Split the prompt over that sub-group in balanced page-aligned shares; the member with the most room
     becomes the master (its segment is last), and it keeps room for the growth.
  3. A request that fits nowhere with its growth room is placed without it (decode scale-up finds the room
     later); one that fits nowhere at all, or only spread wider than it needs, stays waiting.
  4. A request whose cached prefix (`scheduler.prefix`) lies inside the batch group places only its suffix,
     first on the smallest aligned sub-group around the prefix (its KV stays compact for decoding), and
     takes the idle cached pages it reuses out of the free pages; its chunk starts at the cached length.
Decode scale-up (a master out of pages) lives in `decode_planner`.
"""

from __future__ import annotations

from loong_jax.scheduler.esp.dispatch import ClusterSnapshot
from loong_jax.scheduler.groups import power_of_two_sizes
from loong_jax.scheduler.prefix import charge_pins, prefill_chunk
from loong_jax.scheduler.view import RequestView, ceil_div


def split_tokens(n_tokens: int, capacities: list[int], growth: int, page_size: int) -> list[int] | None:
    """Tokens per member (page-aligned balanced shares; the last member is the master and keeps `growth`
    slots free); None if the members cannot hold them."""
    members = len(capacities)
    share = ceil_div(ceil_div(n_tokens, members), page_size) * page_size
    limits = [c * page_size for c in capacities]
    limits[-1] -= growth
    if limits[-1] < 1 or sum(max(0, x) for x in limits) < n_tokens:
        return None
    shares = [0] * members
    remaining = n_tokens
    for k in range(members - 1):  # non-masters take their balanced share first
        shares[k] = max(0, min(share, limits[k], remaining - 1))
        remaining -= shares[k]
    shares[-1] = min(remaining, limits[-1])
    remaining -= shares[-1]
    for k in range(members - 1):  # overflow of the master spills back onto the others
        extra = min(remaining, limits[k] - shares[k])
        if extra > 0:
            shares[k] += extra
            remaining -= extra
    return shares if remaining == 0 else None


def place_request(snapshot: ClusterSnapshot, group: tuple[int, ...], request: RequestView, scale_down: bool = True):
    """Segments (instance, n_tokens) for the whole prompt of `request` inside `group`, or None. Without
    `scale_down` (an ablation) the KV stays spread over the whole group, as on a static layout."""
    full_growth = snapshot.growth(request)
    for growth in (full_growth, 0) if full_growth else (0,):
        segments = _place(snapshot, group, request.prefill_target, growth, scale_down)
        if segments is not None:
            return segments
    return None


def _place(snapshot: ClusterSnapshot, group: tuple[int, ...], n_tokens: int, growth: int, scale_down: bool = True):
    page_size = snapshot.view.page_size
    per_instance = snapshot.smallest_pool(group)
    widest = compact_size(ceil_div(n_tokens + growth, page_size) + 1, per_instance, len(group))
    usable = snapshot.usable_by_instance(group)
    for size in power_of_two_sizes(widest) if scale_down else (len(group),):
        if size == 1:  # one member always takes the whole prompt: the best key wins (the first among equal)
            best = _roomiest_single(group, usable, snapshot.free, -(-(n_tokens + growth) // page_size))
            if best is not None:
                return ((best, n_tokens),)
            continue
        candidates = []
        for start in range(0, len(group) - size + 1, size):
            members = group[start:start + size]
            room = sum(usable[i] for i in members)
            if room * page_size >= n_tokens + growth:
                # Instances already holding decodes first, so that free ones stay free for the next prefill.
                candidates.append(((not snapshot.free.intersection(members), room), members))
        # The best key whose split works (the first such sub-group among equal keys).
        for _, members in sorted(candidates, key=lambda c: c[0], reverse=True):
            ordered = sorted(members, key=usable.__getitem__)  # most room last: the master
            shares = split_tokens(n_tokens, [usable[i] for i in ordered], growth, page_size)
            if shares is not None:
                ordered_members = [i for i in group if i in ordered[:-1]] + [ordered[-1]]
                by_instance = dict(zip(ordered, shares))
                return tuple((i, by_instance[i]) for i in ordered_members if by_instance[i] > 0)
    return None


def _roomiest_single(group, usable: dict[int, int], free: set, pages: int) -> int | None:
    """The member with room for `pages` that holds decodes (so free ones stay free), then has the most
    usable pages; the first among equals. (`_place`'s key (not free, usable) over one-member groups,
    without a tuple per member: it runs for every prompt of a batch.)"""
    held, held_room, spare, spare_room = None, -1, None, -1
    for i in group:
        room = usable[i]
        if room >= pages:
            if i in free:
                if room > spare_room:
                    spare, spare_room = i, room
            elif room > held_room:
                held, held_room = i, room
    return held if held is not None else spare


def compact_size(pages: int, per_instance: int, limit: int) -> int:
    """Fewest instances (a power of two, at most `limit`) whose whole pools hold `pages`: a placement never
    spreads a prompt wider, since its decode group would then claim instances it does not need."""
    size = 1
    while size * per_instance < pages and size * 2 <= limit:
        size *= 2
    return size


def commit_placement(snapshot: ClusterSnapshot, request: RequestView, segments) -> None:
    page_size = snapshot.view.page_size
    for instance, n_tokens in segments:
        snapshot.pages_free[instance] -= ceil_div(n_tokens, page_size)
    master, master_tokens = segments[-1]
    snapshot.reserve_growth(request, master, master_tokens)


def prefix_subgroup(group: tuple[int, ...], instances) -> tuple[int, ...]:
    """The smallest aligned sub-group of `group` (sizes 1, 2, 4, ...) that contains `instances`."""
    size = 1
    while size < len(group):
        for start in range(0, len(group) - size + 1, size):
            if set(instances) <= set(group[start:start + size]):
                return group[start:start + size]
        size *= 2
    return group


def place_suffix(snapshot: ClusterSnapshot, group: tuple[int, ...], request: RequestView, scale_down: bool = True):
    """(start, segments) for the tokens of `request` its prefill computes on `group` (only the suffix when
    its cached prefix lies inside the group; see the module docstring), or None."""
    start, length = prefill_chunk(request, group)
    if start and charge_pins(request, snapshot.pages_free):
        full_growth = snapshot.growth(request)
        for members in (prefix_subgroup(group, request.cached_kv), group):
            for growth in (full_growth, 0) if full_growth else (0,):
                segments = _place(snapshot, members, length, growth, scale_down)
                if segments is not None:
                    return start, segments
        for instance, pins in request.cached_pins.items():  # give the pins back: a full prefill instead
            snapshot.pages_free[instance] += pins
    segments = place_request(snapshot, group, request, scale_down)
    return None if segments is None else (0, segments)


def place_batch(snapshot: ClusterSnapshot, group: tuple[int, ...], requests: list[RequestView], scale_down: bool = True):
    """(placed [(request, start, segments)], left waiting [request]) for one prefill batch on `group`."""
    placed, left = [], []
    for request in sorted(requests, key=lambda r: -r.prefill_target):
        chosen = place_suffix(snapshot, group, request, scale_down)
        if chosen is None:
            left.append(request)
            continue
        start, segments = chosen
        commit_placement(snapshot, request, segments)
        placed.append((request, start, segments))
    return placed, left
