"""The waiting requests' side of the prefix cache: what each one finds cached, which ones the policy sees,
and which prompt blocks running prefills are computing.

`EngineState` holds one `PrefixHits` (over its allocator's `PrefixCache`) and calls it at these points:
  1. `view`: `visible(waiting, edits)` runs `refresh(request)` for every waiting request (a lookup only
     when the cache changed since the request's last one), which sets its `cached_tokens`, `cached_kv` and
     `cached_pins`, then `schedulable(waiting)`, which holds back a request whose uncached prompt is at
     least half being computed already (by a running prefill, or first by an earlier waiting request with
     the same start), so a document's questions sent together compute it once. Both walk the queue in
     order, so their answer is kept until the queue is edited (`edits`: a request left or was put back),
     the cache or the blocks being computed change; arrivals appended meanwhile are walked alone, from
     where the last walk stopped (a step that only decodes changes nothing, one with arrivals walks them).
  2. `check_plan`: `usable_hit(request, start, group)` re-checks a prefill that starts at a cached length.
  3. A prefill starts: `count_query(request, start)` (hit statistics) and `track_computing(request, True)`;
     it ends, is preempted or the request finishes: `track_computing(request, False)`.
  4. `check_invariants(requests, waiting, version)` (tests): the counted blocks are recounted from the
     requests, and the kept `visible` answer is compared with a fresh one.
"""

from __future__ import annotations

from loong_jax.engine.plan_check import PlanError
from loong_jax.engine.prefix_cache import BlockHash, PrefixCache
from loong_jax.scheduler.view import PREFILLING, WAITING


class PrefixHits:
    def __init__(self, cache: PrefixCache, page_size: int):
        self.cache = cache
        self.page_size = page_size
        self._computing: dict[BlockHash, int] = {}  # blocks of the prompts whose prefill runs -> how many
        self._computing_version = 0
        self._visible_key: tuple | None = None  # (queue edits, cache version, computing version) of:
        self._walked = _Walk()  # the walk of the queue's first `_walked.length` requests

    def check_invariants(self, requests, waiting: list, waiting_edits: int) -> None:
        """The blocks counted as being computed are exactly those of the prefilling requests that count them,
        and the kept `visible` answer, while its key holds, is what computing it afresh gives."""
        if self._visible_key == (waiting_edits, self.cache.version, self._computing_version):
            walked = waiting[:self._walked.length]
            assert tuple(self._walked.shown) == self.schedulable(walked), "kept waiting view is stale"
        computing: dict[BlockHash, int] = {}
        for request in requests:
            assert not request.computing_prefix or request.status == PREFILLING, f"{request.request_id!r} computing"
            for key in request.block_hashes if request.computing_prefix else ():
                computing[key] = computing.get(key, 0) + 1
        assert computing == self._computing, "prompt blocks counted as being computed disagree"

    def visible(self, waiting: list, waiting_edits: int) -> tuple:
        """The waiting requests the policy sees, each refreshed (see the module docstring, step 1)."""
        key = (waiting_edits, self.cache.version, self._computing_version)
        if key != self._visible_key:
            self._walked, self._visible_key = _Walk(), key
        walk = self._walked
        if walk.length < len(waiting):
            for request in waiting[walk.length:]:
                self.refresh(request)
                walk.step(request, *self._shows(request, walk.first_of))
            walk.length = len(waiting)
        return walk.answer()

    def refresh(self, request) -> tuple[tuple[int, int], ...]:
        """Look the waiting request's prompt up (again, if the cache changed) and set its view fields."""
        cache = self.cache
        if not request.block_hashes or request.prefix_hit_version == cache.version:
            return request.prefix_hit
        hit = cache.lookup(request.block_hashes, (request.prompt_len - 1) // self.page_size)
        request.prefix_hit, request.prefix_hit_version = hit, cache.version
        tokens: dict[int, int] = {}
        pins: dict[int, int] = {}
        for instance, page in hit:
            tokens[instance] = tokens.get(instance, 0) + self.page_size
            if cache.is_idle(instance, page):
                pins[instance] = pins.get(instance, 0) + 1
        request.cached_tokens, request.cached_kv, request.cached_pins = len(hit) * self.page_size, tokens, pins
        return hit

    def schedulable(self, waiting: list) -> tuple:
        """The waiting requests the policy sees: a request whose uncached blocks making up at least half of its
        prompt are being computed (by a running prefill, or first by an earlier waiting request that shares
        them) waits for them to be cached instead of computing them again beside it (a document's questions
        arriving together)."""
        walk = _Walk()
        for request in waiting:
            walk.step(request, *self._shows(request, walk.first_of))
        return walk.answer()

    def _shows(self, request, first_of: dict) -> tuple[bool, BlockHash | None]:
        """(whether `schedulable` shows the request after the earlier ones, its first uncached block that it
        computes); `first_of`: first uncached block -> the earliest shown request starting there."""
        hashes, start = request.block_hashes, len(request.prefix_hit)
        usable = min(len(hashes), (request.prompt_len - 1) // self.page_size)
        if start >= usable:
            return True, None
        end = start
        while end < usable and hashes[end] in self._computing:
            end += 1
        earlier = first_of.get(hashes[start])
        if earlier is not None:
            other = earlier.block_hashes
            shared = start
            while shared < min(usable, len(other)) and other[shared] == hashes[shared]:
                shared += 1
            end = max(end, shared)
        return (end - start) * self.page_size * 2 < request.prompt_len, hashes[start]

    def track_computing(self, request, running: bool) -> None:
        """Count (or uncount) the request's prompt blocks as being computed by a running prefill."""
        if running == request.computing_prefix or not request.block_hashes:
            return
        request.computing_prefix = running
        self._computing_version += 1
        computing = self._computing
        for key in request.block_hashes:
            if running:
                computing[key] = computing.get(key, 0) + 1
            elif computing[key] == 1:
                del computing[key]
            else:
                computing[key] -= 1

    def usable_hit(self, request, start: int, group: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """The cached pages a prefill of a waiting request starting at `start` reuses (a `PlanError` if the
        cache does not hold them, or they are not on the chunk's group)."""
        if request.status != WAITING or request.kv or start % self.page_size:
            raise PlanError(f"prefill of {request.request_id!r} starts at {start} but {request.num_computed} "
                            "tokens are computed")
        hit = self.refresh(request)[:start // self.page_size]
        if len(hit) * self.page_size != start:
            raise PlanError(f"prefill of {request.request_id!r} starts at {start} but only "
                            f"{len(hit) * self.page_size} tokens of its prompt are cached")
        if not set(group).issuperset(instance for instance, _ in hit):
            raise PlanError(f"prefill of {request.request_id!r} reuses cached pages on "
                            f"{sorted({i for i, _ in hit})}, outside its group {group}")
        return hit

    def count_query(self, request, start: int) -> None:
        stats = self.cache.stats
        if self.cache.enabled:
            stats.queries += 1
            stats.query_tokens += request.prefill_target
            stats.hits += start > 0
            stats.hit_tokens += start
        request.prefix_hit, request.prefix_hit_version = (), -1
        request.cached_tokens, request.cached_kv, request.cached_pins = 0, {}, {}


class _Walk:
    """`schedulable`'s walk over a queue prefix: the requests shown and the earliest shown request per first
    uncached block; it goes on where it stopped when arrivals are appended."""

    def __init__(self):
        self.length = 0  # requests walked
        self.shown: list = []
        self.first_of: dict[BlockHash, object] = {}
        self._answer: tuple | None = ()

    def step(self, request, shows: bool, first_uncached: BlockHash | None) -> None:
        if shows:
            if first_uncached is not None:
                self.first_of.setdefault(first_uncached, request)
            self.shown.append(request)
            self._answer = None

    def answer(self) -> tuple:
        if self._answer is None:
            self._answer = tuple(self.shown)
        return self._answer
