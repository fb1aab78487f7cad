"""Host-side KV page allocator: which pages of which instance hold which request's tokens.

Every instance owns a pool of `num_pages` pages of `page_size` token slots. A request may keep KV on
several instances (after a ring prefill with scale-down, after a decode scale-up, after migration).

Data flow:
  1. `allocate(request, instance, n_tokens, start_position)` appends n tokens to the request's share on that
     instance. Tokens of a share are stored densely in slot order: slot s lives in page
     `page_table[s // page_size]` at offset `s % page_size`; `token_ranges` records which global positions
     the slots hold (a share may hold several position runs, e.g. prompt part + decode tail).
  2. Pages are reference counted: the prefix cache and every request whose prompt starts with the same
     cached blocks share a page. Shared pages are always full, so a request only ever appends to pages it
     holds alone (no copy-on-write).
  3. `begin_migration(request, src, dst)` moves a whole share: destination pages are allocated at once and the
     source pages stay held (still counted used) until `finish_migration(ticket)`, because the executor reads
     them while the move runs.
  4. `free_request(request)` drops every reference; pages whose count reaches zero return to the free list.
  5. Prefix cache (`prefix_cache.PrefixCache`, one reference per cached page): `attach_prefix(request, hit)`
     makes a new request's shares start with cached full pages; `cache_prompt_pages(request, hashes)` indexes
     the full, position-aligned pages a finished prefill filled. Cached pages no request holds are *idle*:
     they count as free (`pages_free`) and `allocate` takes the least recently used one when the free list is
     empty (eviction). `clear_prefix_cache()` drops every cached page.
  6. `check_invariants()` recounts everything from scratch; `assert_all_free()` is what tests call after a
     workload (every page free or held only by the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from loong_jax.engine.prefix_cache import BlockHash, PrefixCache, PrefixCacheOptions
from loong_jax.executor.protocol import MigrationTicket
from loong_jax.scheduler.plan import RequestId
from loong_jax.scheduler.view import ceil_div



class OutOfPages(RuntimeError):
    """An allocation asked for more pages than the instance has free."""


@dataclass
class _Share:
    """One request's tokens on one instance."""

    pages: list[int] = field(default_factory=list)
    n_tokens: int = 0
    ranges: list[list[int]] = field(default_factory=list)  # [start_position, n] runs, in slot order


class KVAllocator:
    def __init__(self, pages_per_instance: Sequence[int] | int, page_size: int, num_instances: int | None = None,
                 prefix_cache: PrefixCacheOptions | None = None):
        if isinstance(pages_per_instance, int):
            if num_instances is None:
                raise ValueError("num_instances is required when pages_per_instance is a single number")
            pages_per_instance = [pages_per_instance] * num_instances
        pages = [int(p) for p in pages_per_instance]
        if not pages or any(p <= 0 for p in pages):
            raise ValueError(f"pages_per_instance must be positive for every instance, got {pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.page_size = int(page_size)
        self._num_pages = pages
        # Free lists are stacks with low page ids on top, so fresh pools hand out 0, 1, 2, ...
        self._free: list[list[int]] = [list(range(p - 1, -1, -1)) for p in pages]
        self._refcount: list[list[int]] = [[0] * p for p in pages]
        self._shares: dict[RequestId, dict[int, _Share]] = {}
        self._tickets: dict[int, tuple[int, list[int]]] = {}  # ticket id -> (source instance, held pages)
        self._next_ticket = 0
        self.prefix_cache = PrefixCache(pages, prefix_cache)

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def num_instances(self) -> int:
        return len(self._num_pages)

    def num_pages(self, instance: int) -> int:
        return self._num_pages[instance]

    def pages_free(self, instance: int) -> int:
        """Pages an allocation can take: free ones and idle cached ones (evicted on demand)."""
        return len(self._free[instance]) + self.prefix_cache.num_idle(instance)

    @property
    def pages_per_instance(self) -> tuple[int, ...]:
        return tuple(self._num_pages)

    def pages_free_per_instance(self) -> list[int]:
        """`pages_free` of every instance, in instance order (one call where a view needs them all)."""
        return [len(free) + idle for free, idle in zip(self._free, self.prefix_cache.idle_counts())]

    def pages_used(self, instance: int) -> int:
        """Pages some request holds (idle cached pages count as free)."""
        return self._num_pages[instance] - self.pages_free(instance)

    def pages_cached(self, instance: int) -> int:
        """Pages the prefix cache indexes (held by requests or idle)."""
        return self.prefix_cache.num_cached(instance)

    @property
    def total_pages(self) -> int:
        return sum(self._num_pages)

    @property
    def total_pages_free(self) -> int:
        return sum(self.pages_free(i) for i in range(self.num_instances))

    def refcount(self, instance: int, page: int) -> int:
        """References to a page: requests holding it, the prefix cache, a migration in flight."""
        return self._refcount[instance][page]

    def has_request(self, request_id: RequestId) -> bool:
        return request_id in self._shares

    def requests(self) -> list[RequestId]:
        return list(self._shares)

    def tokens_on(self, request_id: RequestId, instance: int) -> int:
        share = self._shares.get(request_id, {}).get(instance)
        return share.n_tokens if share else 0

    def tokens_total(self, request_id: RequestId) -> int:
        return sum(s.n_tokens for s in self._shares.get(request_id, {}).values())

    def kv_layout(self, request_id: RequestId) -> dict[int, int]:
        """instance -> number of tokens of this request held there."""
        return {i: s.n_tokens for i, s in self._shares.get(request_id, {}).items() if s.n_tokens}

    def page_table(self, request_id: RequestId, instance: int) -> tuple[int, ...]:
        share = self._shares.get(request_id, {}).get(instance)
        return tuple(share.pages) if share else ()

    def token_ranges(self, request_id: RequestId, instance: int) -> tuple[tuple[int, int], ...]:
        """(start_position, n) runs held on the instance, in slot order."""
        share = self._shares.get(request_id, {}).get(instance)
        return tuple((s, n) for s, n in share.ranges) if share else ()

    def positions(self, request_id: RequestId, instance: int) -> list[int]:
        """Global token position of every slot of the share, in slot order."""
        return [p for start, n in self.token_ranges(request_id, instance) for p in range(start, start + n)]

    def exclusive_pages(self, request_id: RequestId) -> dict[int, int]:
        """instance -> pages only this request references besides the prefix cache (what freeing it would make
        available; cached prefixes share)."""
        cache = self.prefix_cache
        return {
            instance: sum(1 for page in share.pages
                          if self._refcount[instance][page] - cache.is_cached(instance, page) == 1)
            for instance, share in self._shares.get(request_id, {}).items()
        }

    def pages_needed(self, request_id: RequestId, instance: int, n_tokens: int) -> int:
        """Pages an `allocate(request_id, instance, n_tokens)` would take from the free list."""
        if n_tokens <= 0:
            return 0
        share = self._shares.get(request_id, {}).get(instance)
        have = share.n_tokens if share else 0
        return ceil_div(have + n_tokens, self.page_size) - ceil_div(have, self.page_size)

    def can_fit(self, request_id: RequestId, instance: int, n_tokens: int) -> bool:
        return self.pages_needed(request_id, instance, n_tokens) <= self.pages_free(instance)

    def room_for_tokens(self, request_id: RequestId, instance: int) -> int:
        """How many more tokens of this request the instance can take (free slots of its last page + free pages)."""
        share = self._shares.get(request_id, {}).get(instance)
        have = share.n_tokens if share else 0
        tail = (-have) % self.page_size
        free = self.pages_free(instance)
        if share and tail and self._refcount[instance][share.pages[-1]] > 1:
            return max(0, free - 1) * self.page_size + (tail if free else 0)
        return tail + free * self.page_size

    # -- mutation -----------------------------------------------------------------------------------------------
    def allocate(self, request_id: RequestId, instance: int, n_tokens: int, start_position: int | None = None) -> list[int]:
        """Append n_tokens of the request to its share on `instance`; returns the newly taken page ids.

        `start_position` is the global position of the first appended token (default: right after every token
        the request holds anywhere, which is what a decode step appends).
        """
        if n_tokens <= 0:
            raise ValueError(f"allocate: n_tokens must be positive, got {n_tokens}")
        needed = self.pages_needed(request_id, instance, n_tokens)
        if needed > self.pages_free(instance):
            raise OutOfPages(
                f"instance {instance}: request {request_id!r} needs {needed} pages for {n_tokens} tokens, "
                f"{self.pages_free(instance)} free"
            )
        if start_position is None:
            start_position = self.tokens_total(request_id)
        share = self._shares.setdefault(request_id, {}).setdefault(instance, _Share())
        refcount = self._refcount[instance]
        taken: list[int] = []
        for _ in range(needed):
            page = self._take_page(instance)
            refcount[page] = 1
            share.pages.append(page)
            taken.append(page)
        share.n_tokens += n_tokens
        if share.ranges and share.ranges[-1][0] + share.ranges[-1][1] == start_position:
            share.ranges[-1][1] += n_tokens
        else:
            share.ranges.append([start_position, n_tokens])
        return taken

    def _take_page(self, instance: int) -> int:
        """A page for new KV: a free one, else the least recently used idle cached page (evicted)."""
        free = self._free[instance]
        if free:
            return free.pop()
        page = self.prefix_cache.oldest_idle(instance)
        if page is None:
            raise OutOfPages(f"instance {instance}: no free page")
        self._evict(instance, page)
        return self._free[instance].pop()

    def _evict(self, instance: int, page: int) -> None:
        self.prefix_cache.remove(instance, page)
        self.prefix_cache.stats.evictions += 1
        self._release(instance, [page])

    def _hold(self, instance: int, page: int) -> None:
        """One more reference to a page that is already referenced (a prefix-cache hit)."""
        self._refcount[instance][page] += 1
        if self._refcount[instance][page] == 2 and self.prefix_cache.is_cached(instance, page):
            self.prefix_cache.mark_held(instance, page)

    def _release(self, instance: int, pages: Iterable[int]) -> int:
        refcount, free, released = self._refcount[instance], self._free[instance], 0
        cache, idle = self.prefix_cache, []
        for page in pages:
            refcount[page] -= 1
            if refcount[page] == 0:
                free.append(page)
                released += 1
            elif refcount[page] == 1 and cache.is_cached(instance, page):
                idle.append(page)
        if idle:
            cache.mark_idle(instance, idle)
        return released

    def free_on(self, request_id: RequestId, instance: int) -> int:
        """Drop the request's share on one instance; returns the pages that became free."""
        shares = self._shares.get(request_id)
        if not shares or instance not in shares:
            return 0
        released = self._release(instance, shares.pop(instance).pages)
        if not shares:
            del self._shares[request_id]
        return released

    def free_request(self, request_id: RequestId) -> int:
        """Drop every share of the request; returns the number of pages that became free."""
        shares = self._shares.pop(request_id, {})
        return sum(self._release(instance, share.pages) for instance, share in shares.items())

    def begin_migration(self, request_id: RequestId, src: int, dst: int) -> MigrationTicket:
        """Move the request's whole share from `src` to `dst`: destination pages are taken now, source pages
        stay held until `finish_migration`."""
        shares = self._shares.get(request_id, {})
        if src not in shares:
            raise ValueError(f"begin_migration: request {request_id!r} holds nothing on instance {src}")
        if src == dst:
            raise ValueError("begin_migration: source and destination are the same instance")
        moving = shares[src]
        dst_first_slot = self.tokens_on(request_id, dst)
        needed = self.pages_needed(request_id, dst, moving.n_tokens)
        if needed > self.pages_free(dst):
            raise OutOfPages(f"migration of {request_id!r}: instance {dst} needs {needed} pages, "
                             f"{self.pages_free(dst)} free")
        for start, n in moving.ranges:
            self.allocate(request_id, dst, n, start_position=start)
        del shares[src]
        self._next_ticket += 1
        ticket = MigrationTicket(
            self._next_ticket, request_id, src, dst, moving.n_tokens, tuple(moving.pages), dst_first_slot,
            self.page_table(request_id, dst),
        )
        self._tickets[ticket.ticket_id] = (src, moving.pages)
        return ticket

    def finish_migration(self, ticket: MigrationTicket) -> int:
        """Release the source pages of a completed move; returns how many became free."""
        instance, pages = self._tickets.pop(ticket.ticket_id)
        return self._release(instance, pages)

    # -- prefix cache -------------------------------------------------------------------------------------------
    def attach_prefix(self, request_id: RequestId, hit: Sequence[tuple[int, int]]) -> None:
        """Start a request that holds no KV with cached full pages: block k of `hit` is (instance, page) of
        positions [k·page_size, (k+1)·page_size)."""
        if request_id in self._shares:
            raise ValueError(f"attach_prefix: request {request_id!r} already holds KV")
        shares: dict[int, _Share] = {}
        for block, (instance, page) in enumerate(hit):
            if not self.prefix_cache.is_cached(instance, page):
                raise ValueError(f"attach_prefix: page {page} of instance {instance} is not cached")
            share = shares.setdefault(instance, _Share())
            self._hold(instance, page)
            share.pages.append(page)
            share.n_tokens += self.page_size
            position = block * self.page_size
            if share.ranges and sum(share.ranges[-1]) == position:
                share.ranges[-1][1] += self.page_size
            else:
                share.ranges.append([position, self.page_size])
        if shares:
            self._shares[request_id] = shares

    def _aligned_full_pages(self, share: _Share) -> Iterable[tuple[int, int]]:
        """(block, page) of the share's full pages that hold exactly the positions of one block."""
        size, slot = self.page_size, 0
        for start, n in share.ranges:
            first = -(-slot // size) * size  # first page boundary at or after this run's first slot
            for page_slot in range(first, slot + n - size + 1, size):
                position = start + page_slot - slot
                if position % size == 0:
                    yield position // size, share.pages[page_slot // size]
            slot += n

    def cache_prompt_pages(self, request_id: RequestId, hashes: Sequence[BlockHash]) -> int:
        """Index the request's full pages whose block has a hash; returns how many pages were added."""
        cache, added = self.prefix_cache, 0
        if not cache.enabled:
            return 0
        for instance, share in self._shares.get(request_id, {}).items():
            for block, page in self._aligned_full_pages(share):
                if block >= len(hashes) or cache.is_cached(instance, page) or cache.has(instance, hashes[block]):
                    continue
                if cache.num_cached(instance) >= cache.capacity[instance]:
                    oldest = cache.oldest_idle(instance)
                    if oldest is None:
                        break  # full of pages running requests hold
                    self._evict(instance, oldest)
                self._refcount[instance][page] += 1
                cache.add(instance, page, hashes[block], idle=False)
                added += 1
        return added

    def clear_prefix_cache(self) -> int:
        """Forget every cached page; returns the pages that became free (idle ones: held ones stay held)."""
        cache, released = self.prefix_cache, 0
        for instance in range(self.num_instances):
            for page in cache.cached_pages(instance):
                cache.remove(instance, page)
                released += self._release(instance, [page])
        return released

    # -- accounting checks --------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Recount every reference from scratch; raise AssertionError on any inconsistency."""
        for instance, num_pages in enumerate(self._num_pages):
            counted = [0] * num_pages
            for request_id, shares in self._shares.items():
                share = shares.get(instance)
                if share is None:
                    continue
                expected_pages = ceil_div(share.n_tokens, self.page_size)
                assert len(share.pages) == expected_pages, (
                    f"request {request_id!r} on {instance}: {len(share.pages)} pages for {share.n_tokens} tokens")
                assert sum(n for _, n in share.ranges) == share.n_tokens, f"ranges of {request_id!r} on {instance}"
                for page in share.pages:
                    counted[page] += 1
            for held_instance, pages in self._tickets.values():
                if held_instance == instance:
                    for page in pages:
                        counted[page] += 1
            for page in self.prefix_cache.cached_pages(instance):
                counted[page] += 1
            assert counted == self._refcount[instance], f"instance {instance}: reference counts disagree"
            free = self._free[instance]
            assert len(set(free)) == len(free), f"instance {instance}: page freed twice"
            assert set(free) == {p for p in range(num_pages) if counted[p] == 0}, f"instance {instance}: free list wrong"
        self.prefix_cache.check(self._refcount)

    def assert_all_free(self) -> None:
        """No request holds KV: every page is free or held only by the prefix cache (clear it for a bare pool)."""
        self.check_invariants()
        assert not self._shares, f"requests still hold KV: {sorted(map(str, self._shares))}"
        assert not self._tickets, f"{len(self._tickets)} migrations still hold source pages"
        for instance in range(self.num_instances):
            assert self.pages_free(instance) == self._num_pages[instance], f"instance {instance} has pages in use"
