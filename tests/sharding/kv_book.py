"""Host-side book-keeping of paged KV for the decode and migration tests.

Records, per (request, member), the pages that member holds of the request
(in order) and how many tokens they contain, the way the engine's page tables
do. Tokens of a request on a member are stored densely: its i-th kept token is
at slot `pages[i // page_size] * page_size + i % page_size`.
"""

from __future__ import annotations

from loong_jax.sharding.decode_program import DecodeRow


class KVBook:
    def __init__(self, members: int, pages: int, page_size: int):
        self.members = members
        self.page_size = page_size
        self.free = [list(range(pages)) for _ in range(members)]  # free pages per member
        self.pages: dict[tuple[int, int], list[int]] = {}  # (request, member) -> pages
        self.held: dict[tuple[int, int], int] = {}  # (request, member) -> tokens

    def reserve_slot(self, request: int, member: int) -> int:
        """Flat slot for the next token of `request` kept on `member` (allocates a page when full)."""
        key = (request, member)
        pages = self.pages.setdefault(key, [])
        held = self.held.get(key, 0)
        if held == len(pages) * self.page_size:
            pages.append(self.free[member].pop(0))
        self.held[key] = held + 1
        return pages[held // self.page_size] * self.page_size + held % self.page_size

    def decode_row(self, request: int, token: int, position: int, master: int) -> DecodeRow:
        """Reserves the new token's slot on `master` and describes the request for this step."""
        slot = self.reserve_slot(request, master)
        return DecodeRow(token=token, position=position, master=master, append_slot=slot,
                         pages=self.request_pages(request), kv_lens=self.request_lens(request))

    def request_pages(self, request: int) -> dict[int, list[int]]:
        return {m: list(p) for (r, m), p in self.pages.items() if r == request}

    def request_lens(self, request: int) -> dict[int, int]:
        return {m: n for (r, m), n in self.held.items() if r == request}

    def move(self, request: int, source: int, destination: int) -> tuple[list[int], list[int]]:
        """Books moving all of `request`'s pages from `source` to `destination`, appended after the
        destination's own pages (which must be full). Returns (source pages, destination pages);
        the source pages become free and are handed out next."""
        moved = self.pages.pop((request, source))
        moved_tokens = self.held.pop((request, source))
        kept = self.held.get((request, destination), 0)
        assert kept % self.page_size == 0, "destination's last page must be full to append pages"
        targets = [self.free[destination].pop(0) for _ in moved]
        self.pages.setdefault((request, destination), []).extend(targets)
        self.held[(request, destination)] = kept + moved_tokens
        self.free[source][:0] = moved  # reused first
        return moved, targets
