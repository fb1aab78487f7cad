"""What a scheduling policy sees: numbers only (no JAX, no token ids, no device handles).

Data flow:
  1. `EngineState.view(cost_model, now, ...)` builds a `SchedulerView` from its live records; tests build one
     by hand from `InstanceView` / `RequestView` values.
  2. A policy reads instances (free pages, busy or idle), waiting requests (FIFO), partly prefilled requests
     (chunked prefill), decoding requests (where their KV is, their master), the cost model, and which
     programs are ready (compiled), and returns a `Plan`.
  3. The view is read-only by contract: policies never mutate it (EngineState owns every change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

from loong_jax.scheduler.groups import aligned_groups

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass(slots=True)
class InstanceView:
    index: int
    pages_total: int
    pages_free: int
    busy: bool = False
    busy_until: float = 0.0  # estimate: dispatch time + the plan's estimated_s of the unit running there


@dataclass(slots=True, eq=False)
class RequestView:
    """One request as the scheduler sees it. `EngineState` keeps a live subclass of this per request."""

    request_id: Hashable
    seq: int  # arrival order (ties of `arrival` broken by it); preempted requests keep theirs
    arrival: float
    prompt_len: int  # original prompt tokens
    num_generated: int = 0  # output tokens produced so far
    max_new_tokens: int | None = None  # cap on output tokens, None when unknown
    kv: dict[int, int] = field(default_factory=dict)  # instance -> KV tokens held there
    master: int | None = None  # instance that appended the latest KV token (decode master)
    in_flight: bool = False  # part of a unit that is running now
    status: str = WAITING
    # Prefix cache, for a waiting request that holds no KV: the first `cached_tokens` of its prompt are cached
    # as `cached_kv` (instance -> tokens there); a prefill chunk may start at `cached_tokens` on a group that
    # contains those instances (`scheduler.prefix`), taking `cached_pins` (instance -> pages) of the pages the
    # view counts as free (idle cached pages) out of the free pool.
    cached_tokens: int = 0
    cached_kv: dict[int, int] = field(default_factory=dict)
    cached_pins: dict[int, int] = field(default_factory=dict)

    @property
    def prefill_target(self) -> int:
        """Tokens a (re)prefill computes: the prompt plus, after a recompute-preemption, the generated tokens."""
        return self.prompt_len + self.num_generated

    @property
    def num_computed(self) -> int:
        """KV tokens held (all instances)."""
        return sum(self.kv.values())

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_generated

    def remaining_new_tokens(self, default: int) -> int:
        """Output tokens still to come: the cap minus what was produced, or `default` when the cap is unknown."""
        if self.max_new_tokens is None:
            return default
        return max(0, self.max_new_tokens - self.num_generated)


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up (pages for a number of tokens, and the like)."""
    return -(-a // b)


def power_of_two_bucket(n_tokens: int) -> int:
    """Default shape bucket of a program: next power of two, at least 16."""
    bucket = 16
    while bucket < n_tokens:
        bucket *= 2
    return bucket


@dataclass(frozen=True)
class SchedulerView:
    instances: tuple[InstanceView, ...]
    waiting: tuple[RequestView, ...]  # FIFO: arrival order, preempted requests back in their place
    decoding: tuple[RequestView, ...]  # hold KV of their whole context but the newest token
    page_size: int
    cost_model: object  # loong_jax.scheduler.cost.model.CostModel (or anything with its interface)
    now: float = 0.0
    prefilling: tuple[RequestView, ...] = ()  # part of the prompt computed (chunked prefill)
    ready_programs: frozenset | None = None  # {(kind, group, bucket)}; None = every program is ready
    compile_cost_s: float = 30.0  # estimated seconds to compile a program that is not ready
    bucket_fn: Callable[[str, int], int] = field(default=lambda kind, n: power_of_two_bucket(n))
    default_output_tokens: int = 256  # expected output length of a request with no max_new_tokens

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def idle_instances(self) -> tuple[int, ...]:
        return tuple(i.index for i in self.instances if not i.busy)

    @property
    def group_family(self) -> tuple[tuple[int, ...], ...]:
        return aligned_groups(self.num_instances)

    def program_ready(self, kind: str, group: tuple[int, ...], n_tokens: int) -> bool:
        if self.ready_programs is None:
            return True
        return (kind, tuple(group), self.bucket_fn(kind, n_tokens)) in self.ready_programs

    def compile_penalty_s(self, kind: str, group: tuple[int, ...], n_tokens: int) -> float:
        """Extra seconds a unit pays before it can start if its program still has to be compiled."""
        return 0.0 if self.program_ready(kind, group, n_tokens) else self.compile_cost_s
