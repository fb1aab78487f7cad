"""Host-side KV page allocator: which pages of which instance hold which request's tokens.

Every instance owns a pool of `num_pages` pages of `page_size` token slots. A request may keep KV on
several instances (after a ring prefill with scale-down, after a decode scale-up, after migration).

Data flow:
  1. `allocate(request, instance, n_tokens, start_position)` appends n tokens to the request's share on that
     instance. Tokens of a share are stored densely in slot order: slot s lives in page
     `page_table[s // page_size]` at offset `s % page_size`; `token_ranges` records which global positions
     the slots hold (a share may hold several position runs, e.g. prompt part + decode tail).
  2. Pages are reference counted: `fork(parent, child)` shares every page of the parent; appending to a shared,
     partly filled last page copies it first (copy-on-write) and queues a `PageCopy` for the executor
     (`take_page_copies()`).
  3. `begin_migration(request, src, dst)` moves a whole share: destination pages are allocated at once and the
     source pages stay held (still counted used) until `finish_migration(ticket)`, because the executor reads
     them while the move runs.
  4. `free_request(request)` drops every reference; pages whose count reaches zero return to the free list.
  5. `check_invariants()` recounts everything from scratch; `assert_all_free()` is what tests call after a
     workload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

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


@dataclass(frozen=True)
class PageCopy:
    """Copy the first `n_slots` slots of page `src_page` into `dst_page` on `instance` (copy-on-write)."""

    instance: int
    src_page: int
    dst_page: int
    n_slots: int


class KVAllocator:
    def __init__(self, pages_per_instance: Sequence[int] | int, page_size: int, num_instances: int | None = None):
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
        self._page_copies: list[PageCopy] = []

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def num_instances(self) -> int:
        return len(self._num_pages)

    def num_pages(self, instance: int) -> int:
        return self._num_pages[instance]

    def pages_free(self, instance: int) -> int:
        return len(self._free[instance])

    def pages_used(self, instance: int) -> int:
        return self._num_pages[instance] - len(self._free[instance])

    @property
    def total_pages(self) -> int:
        return sum(self._num_pages)

    @property
    def total_pages_free(self) -> int:
        return sum(len(f) for f in self._free)

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
        """instance -> pages only this request references (what freeing it would return; forks share)."""
        return {
            instance: sum(1 for page in share.pages if self._refcount[instance][page] == 1)
            for instance, share in self._shares.get(request_id, {}).items()
        }

    def pages_needed(self, request_id: RequestId, instance: int, n_tokens: int) -> int:
        """Pages an `allocate(request_id, instance, n_tokens)` would take from the free list."""
        if n_tokens <= 0:
            return 0
        share = self._shares.get(request_id, {}).get(instance)
        have = share.n_tokens if share else 0
        needed = ceil_div(have + n_tokens, self.page_size) - ceil_div(have, self.page_size)
        if share and have % self.page_size and self._refcount[instance][share.pages[-1]] > 1:
            needed += 1  # copy-on-write of the shared, partly filled last page
        return needed

    def can_fit(self, request_id: RequestId, instance: int, n_tokens: int) -> bool:
        return self.pages_needed(request_id, instance, n_tokens) <= len(self._free[instance])

    def room_for_tokens(self, request_id: RequestId, instance: int) -> int:
        """How many more tokens of this request the instance can take (free slots of its last page + free pages)."""
        share = self._shares.get(request_id, {}).get(instance)
        have = share.n_tokens if share else 0
        tail = (-have) % self.page_size
        if share and tail and self._refcount[instance][share.pages[-1]] > 1:
            return max(0, len(self._free[instance]) - 1) * self.page_size + (tail if self._free[instance] else 0)
        return tail + len(self._free[instance]) * self.page_size

    # -- mutation -----------------------------------------------------------------------------------------------
    def allocate(self, request_id: RequestId, instance: int, n_tokens: int, start_position: int | None = None) -> list[int]:
        """Append n_tokens of the request to its share on `instance`; returns the newly taken page ids.

        `start_position` is the global position of the first appended token (default: right after every token
        the request holds anywhere, which is what a decode step appends).
        """
        if n_tokens <= 0:
            raise ValueError(f"allocate: n_tokens must be positive, got {n_tokens}")
        needed = self.pages_needed(request_id, instance, n_tokens)
        free = self._free[instance]
        if needed > len(free):
            raise OutOfPages(
                f"instance {instance}: request {request_id!r} needs {needed} pages for {n_tokens} tokens, "
                f"{len(free)} free"
            )
        if start_position is None:
            start_position = self.tokens_total(request_id)
        share = self._shares.setdefault(request_id, {}).setdefault(instance, _Share())
        refcount = self._refcount[instance]
        taken: list[int] = []
        partial = share.n_tokens % self.page_size
        if partial and refcount[share.pages[-1]] > 1:
            shared_page = share.pages[-1]
            private = free.pop()
            refcount[private] = 1
            refcount[shared_page] -= 1
            share.pages[-1] = private
            taken.append(private)
            self._page_copies.append(PageCopy(instance, shared_page, private, partial))
        for _ in range(needed - len(taken)):
            page = free.pop()
            refcount[page] = 1
            share.pages.append(page)
            taken.append(page)
        share.n_tokens += n_tokens
        if share.ranges and share.ranges[-1][0] + share.ranges[-1][1] == start_position:
            share.ranges[-1][1] += n_tokens
        else:
            share.ranges.append([start_position, n_tokens])
        return taken

    def _release(self, instance: int, pages: Iterable[int]) -> int:
        refcount, free, released = self._refcount[instance], self._free[instance], 0
        for page in pages:
            refcount[page] -= 1
            if refcount[page] == 0:
                free.append(page)
                released += 1
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

    def fork(self, parent: RequestId, child: RequestId) -> None:
        """Give `child` the same KV as `parent` by sharing pages (reference counts, copy-on-write on append)."""
        if child in self._shares:
            raise ValueError(f"fork: request {child!r} already holds KV")
        copies: dict[int, _Share] = {}
        for instance, share in self._shares.get(parent, {}).items():
            for page in share.pages:
                self._refcount[instance][page] += 1
            copies[instance] = _Share(list(share.pages), share.n_tokens, [list(r) for r in share.ranges])
        if copies:
            self._shares[child] = copies

    def take_page_copies(self) -> list[PageCopy]:
        """Copy-on-write copies the executor must perform before running the step that triggered them."""
        copies, self._page_copies = self._page_copies, []
        return copies

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
        if needed > len(self._free[dst]):
            raise OutOfPages(f"migration of {request_id!r}: instance {dst} needs {needed} pages, {len(self._free[dst])} free")
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
            assert counted == self._refcount[instance], f"instance {instance}: reference counts disagree"
            free = self._free[instance]
            assert len(set(free)) == len(free), f"instance {instance}: page freed twice"
            assert set(free) == {p for p in range(num_pages) if counted[p] == 0}, f"instance {instance}: free list wrong"

    def assert_all_free(self) -> None:
        self.check_invariants()
        assert not self._shares, f"requests still hold KV: {sorted(map(str, self._shares))}"
        assert not self._tickets, f"{len(self._tickets)} migrations still hold source pages"
        for instance in range(self.num_instances):
            assert self.pages_free(instance) == self._num_pages[instance], f"instance {instance} has pages in use"
