"""`EngineSnapshot`: the engine's state at one instant, as plain immutable values (like vLLM's `make_stats`).

Data flow:
  1. `Engine.snapshot()` calls `capture(...)` with the engine state, the policy, the DoP counters and the
     executor's statistics. It may run on any thread while the engine thread steps: it only reads sizes
     and copies (`state.waiting` is a tuple copied in one operation, a Counter copied in one `dict(...)`,
     the program cache answers under its own lock), never iterates a container the engine mutates, and
     reads the clock only when a request waits (a logical clock advances on every reading).
  2. `LLM.snapshot()` / `AsyncLLM.snapshot()` hand it out; the server turns it into Prometheus metrics,
     the GetServerInfo answer and its admission limits, and never looks at the engine's insides.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple


class TokenLimits(NamedTuple):
    """What one request can ever get here, in tokens (KV capacity and the policy's groups)."""

    longest_prompt: int
    largest_peak: int  # prompt + max_tokens - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineSnapshot:
    """The engine's state and cumulative counts at one instant (what a scrape or GetServerInfo shows)."""

    policy: str = ""
    page_size: int = 0
    token_limits: TokenLimits = TokenLimits(0, 0)
    running: int = 0
    waiting: int = 0
    queued_tokens: int = 0  # prompt tokens of the waiting requests
    oldest_waiting_seconds: float = 0.0  # how long the longest-waiting request has waited (0: none waits)
    late: int = 0  # waiting requests the policy holds behind every timely one (ESP's overload triage)
    kv_pages_total: tuple[int, ...] = ()  # per instance
    kv_pages_used: tuple[int, ...] = ()  # per instance (idle cached pages count as free)
    kv_pages_cached: tuple[int, ...] = ()  # per instance: pages the prefix cache holds (in use or idle)
    prefix_cache_queries: int = 0  # prefills of waiting requests that looked their prompt up
    prefix_cache_hits: int = 0  # of them, those that reused cached pages
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens not computed thanks to the cache
    prefill_dop_counts: Mapping[int, int] = dataclasses.field(default_factory=dict)  # DoP -> batches
    decode_dop_counts: Mapping[int, int] = dataclasses.field(default_factory=dict)
    scale_downs: int = 0
    scale_ups: int = 0
    migrations: int = 0
    preemptions: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    programs_ready: int = 0

    @property
    def num_instances(self) -> int:
        return len(self.kv_pages_total)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of queried prompt tokens whose KV came from the prefix cache."""
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0

    @property
    def kv_pages_free(self) -> tuple[int, ...]:
        return tuple(total - used for total, used in zip(self.kv_pages_total, self.kv_pages_used))


def capture(state, clock: Callable[[], float], *, policy, prefill_dops: Mapping[int, int],
            decode_dops: Mapping[int, int], executor_stats: Mapping[str, float],
            token_limits: tuple[int, int]) -> EngineSnapshot:
    """One snapshot of `state` (an `EngineState`) and the counters beside it (see the module docstring)."""
    waiting = state.waiting  # one tuple, copied at once
    allocator = state.allocator
    instances = range(allocator.num_instances)
    counters = dict(state.counters)
    cache_stats = dataclasses.replace(state.prefix_cache.stats)  # one copy: its fields stay consistent
    oldest = max(0.0, clock() - min(request.arrival for request in waiting)) if waiting else 0.0
    return EngineSnapshot(
        policy=policy.name, page_size=state.page_size, token_limits=TokenLimits(*token_limits),
        running=len(state.prefilling) + len(state.decoding), waiting=len(waiting),
        queued_tokens=sum(request.prompt_len for request in waiting), oldest_waiting_seconds=oldest,
        late=policy.late_requests,
        kv_pages_total=tuple(allocator.num_pages(i) for i in instances),
        kv_pages_used=tuple(allocator.pages_used(i) for i in instances),
        kv_pages_cached=tuple(allocator.pages_cached(i) for i in instances),
        prefix_cache_queries=cache_stats.queries, prefix_cache_hits=cache_stats.hits,
        prefix_cache_query_tokens=cache_stats.query_tokens, prefix_cache_hit_tokens=cache_stats.hit_tokens,
        prefill_dop_counts=MappingProxyType(dict(prefill_dops)), decode_dop_counts=MappingProxyType(dict(decode_dops)),
        scale_downs=counters.get("scale_downs", 0), scale_ups=counters.get("scale_ups", 0),
        migrations=counters.get("migrations", 0), preemptions=counters.get("preemptions", 0),
        compiles=int(executor_stats.get("programs_compiles", 0)),
        compile_seconds=float(executor_stats.get("programs_compile_seconds", 0.0)),
        programs_ready=int(executor_stats.get("programs_ready", 0)))
