"""Prefix cache: content-addressed full KV pages that outlive their requests.

A page that holds the positions [k·page_size, (k+1)·page_size) of a prompt is named by its *block hash*:
a hash chain over the model's identity and the tokens of blocks 0..k, so equal prefixes name equal pages
whichever request computed them and on whichever instance they live (a ring prefill with scale-down leaves
a prompt's blocks on several instances; each cached page records its instance).

Data flow (the `KVAllocator` drives it; it owns the reference counts, the cache holds one reference to each
page it indexes):
  1. `chain_hashes(token_ids, ...)` (engine) or `document_hashes(document, ...)` (simulated workloads, which
     carry no token ids) give a request's block hashes once, when it is queued.
  2. `lookup(hashes, max_blocks)` walks the blocks from 0 and returns the (instance, page) of each block
     while one is cached: a hit is always a contiguous run of positions from 0. The caller caps
     `max_blocks` so that the last prompt token is always computed (it samples the first output token).
  3. `add(instance, page, key)` indexes a full page after the prefill that filled it finished.
  4. Pages no request holds are *idle*: they keep their KV and count as free for allocation; the allocator
     takes the least recently used idle page (`oldest_idle`) when its free list is empty, and the cache
     forgets it (`remove`). A page a running request holds is never evicted.
  5. `stats` counts prefills queried, hits and tokens reused (the engine's metrics read it).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Hashable, Sequence

import numpy as np

BlockHash = bytes

_DIGEST_BYTES = 16


@dataclasses.dataclass(frozen=True)
class PrefixCacheOptions:
    """How large the cache may grow (a share of each instance's pages) and what names its blocks."""

    enabled: bool = True
    max_fraction: float = 1.0  # of each instance's pages the cache may index (pages in use by requests included)
    model_identity: str = ""  # equal prompts of different models never share pages

    def __post_init__(self):
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"prefix cache max_fraction must be in [0, 1], got {self.max_fraction}")

    def capacity(self, num_pages: int) -> int:
        return int(num_pages * self.max_fraction) if self.enabled else 0


def _root(namespace: str) -> bytes:
    return hashlib.blake2b(namespace.encode(), digest_size=_DIGEST_BYTES).digest()


def chain_hashes(token_ids: Sequence[int], page_size: int, model_identity: str = "") -> tuple[BlockHash, ...]:
    """Block hash of every full page of `token_ids`: hash(previous block hash, this block's tokens)."""
    blocks = len(token_ids) // page_size
    data = np.asarray(token_ids[:blocks * page_size], dtype=np.int64).tobytes()
    width = 8 * page_size
    parent, hashes = _root(f"model:{model_identity}"), []
    for k in range(blocks):
        parent = hashlib.blake2b(parent + data[k * width:(k + 1) * width], digest_size=_DIGEST_BYTES).digest()
        hashes.append(parent)
    return tuple(hashes)


def document_hashes(document: Hashable, n_tokens: int, page_size: int) -> tuple[BlockHash, ...]:
    """Block hashes of the first `n_tokens` of a simulated document (equal documents hash equally)."""
    parent, hashes = _root(f"document:{document!r}"), []
    for k in range(n_tokens // page_size):
        parent = hashlib.blake2b(parent + k.to_bytes(8, "little"), digest_size=_DIGEST_BYTES).digest()
        hashes.append(parent)
    return tuple(hashes)


@dataclasses.dataclass
class PrefixCacheStats:
    queries: int = 0  # prefills of waiting requests that looked the cache up
    query_tokens: int = 0  # their prompt tokens
    hits: int = 0  # of them, those that reused at least one page
    hit_tokens: int = 0  # tokens they did not compute
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of queried prompt tokens whose KV came from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCache:
    """The index of cached pages per instance and the LRU order of the idle ones (see the module docstring)."""

    def __init__(self, num_pages: Sequence[int], options: PrefixCacheOptions | None = None):
        options = options or PrefixCacheOptions()
        self.options = options
        self.capacity = [options.capacity(n) for n in num_pages]
        self._index: dict[BlockHash, dict[int, int]] = {}  # block hash -> {instance: page}
        self._key_of: list[dict[int, BlockHash]] = [{} for _ in num_pages]  # page -> block hash, per instance
        self._idle: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in num_pages]
        self.version = 0  # changes whenever a lookup (or which of its pages are idle) could answer differently
        self.stats = PrefixCacheStats()

    # -- queries --------------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return any(self.capacity)

    def is_cached(self, instance: int, page: int) -> bool:
        return page in self._key_of[instance]

    def num_cached(self, instance: int) -> int:
        return len(self._key_of[instance])

    def num_idle(self, instance: int) -> int:
        return len(self._idle[instance])

    def idle_counts(self) -> list[int]:
        return [len(idle) for idle in self._idle]

    def is_idle(self, instance: int, page: int) -> bool:
        return page in self._idle[instance]

    def cached_pages(self, instance: int) -> list[int]:
        return list(self._key_of[instance])

    def idle_pages(self, instance: int) -> list[int]:
        return list(self._idle[instance])

    def has(self, instance: int, key: BlockHash) -> bool:
        return instance in self._index.get(key, ())

    def lookup(self, hashes: Sequence[BlockHash], max_blocks: int) -> tuple[tuple[int, int], ...]:
        """(instance, page) of blocks 0, 1, ... while each is cached (at most `max_blocks`). A block cached on
        several instances is taken from the instance of the block before it when it can be."""
        hit: list[tuple[int, int]] = []
        previous = None
        for key in hashes[:max(0, max_blocks)]:
            holders = self._index.get(key)
            if not holders:
                break
            instance = previous if previous in holders else min(holders)
            hit.append((instance, holders[instance]))
            previous = instance
        return tuple(hit)

    # -- changes (the allocator keeps reference counts in step) ------------------------------------------------
    def add(self, instance: int, page: int, key: BlockHash, idle: bool) -> None:
        if page in self._key_of[instance] or self.has(instance, key):
            raise ValueError(f"instance {instance}: page {page} or its block is already cached")
        self._index.setdefault(key, {})[instance] = page
        self._key_of[instance][page] = key
        if idle:
            self._idle[instance][page] = None
        self.version += 1

    def remove(self, instance: int, page: int) -> None:
        key = self._key_of[instance].pop(page)
        holders = self._index[key]
        del holders[instance]
        if not holders:
            del self._index[key]
        self._idle[instance].pop(page, None)
        self.version += 1

    def mark_idle(self, instance: int, pages: Sequence[int]) -> None:
        """The last request holding these pages let them go; the first listed is evicted last."""
        idle = self._idle[instance]
        for page in reversed(pages):
            idle[page] = None
        self.version += 1

    def mark_held(self, instance: int, page: int) -> None:
        """A request took the page again: it cannot be evicted while held; its LRU age restarts on release."""
        self._idle[instance].pop(page, None)
        self.version += 1

    def oldest_idle(self, instance: int) -> int | None:
        idle = self._idle[instance]
        return next(iter(idle)) if idle else None

    def check(self, refcount: Sequence[Sequence[int]]) -> None:
        """Index and LRU lists agree with each other and with the allocator's reference counts."""
        for instance, keys in enumerate(self._key_of):
            assert len(keys) <= self.capacity[instance], f"instance {instance}: cache over its capacity"
            for page, key in keys.items():
                assert self._index[key][instance] == page, f"instance {instance}: index of page {page} wrong"
                assert refcount[instance][page] >= 1, f"instance {instance}: cached page {page} not referenced"
            idle = {page for page in keys if refcount[instance][page] == 1}
            assert set(self._idle[instance]) == idle, f"instance {instance}: idle cached pages wrong"
        assert sum(len(h) for h in self._index.values()) == sum(len(k) for k in self._key_of), "index size"
