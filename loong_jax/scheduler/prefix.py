"""Prefix-cache hits as a policy sees them (numbers only).

A waiting request whose prompt starts with cached pages carries `cached_tokens` (a multiple of the page
size, always short of the whole prompt), `cached_kv` (instance -> cached tokens there) and `cached_pins`
(instance -> idle cached pages the hit takes out of the free pool the view reports). A policy uses a hit by
planning a prefill chunk `(cached_tokens, prefill_target - cached_tokens)` on a group that contains every
instance of `cached_kv`: the chunk attends to the cached pages there (context prefill), and only the
suffix needs new pages. `EngineState` checks the hit again when the plan is dispatched.

Data flow, per candidate (request, instances that would run or keep it):
  1. `reusable(request, instances)`: is the cached prefix usable there?
  2. `prefill_chunk(request, instances)`: the (start, length) chunk to plan (start 0 when not reusable).
  3. `charge_pins(request, pages_free)`: take the hit's idle pages out of a policy's free-page count.
  4. `prefix_home(request, groups)`: the candidate group that holds the cached prefix, if any (steering).
  5. `waits_for_prefix(request, view)`: the cached prefix lies on instances busy for less time than
     recomputing it would take: the request is better left waiting for them this time.
"""

from __future__ import annotations

from typing import Iterable, MutableSequence, Sequence

from loong_jax.scheduler.view import RequestView, SchedulerView


def reusable(request: RequestView, instances: Iterable[int]) -> bool:
    """The request's cached prefix can seed a prefill whose group holds `instances`."""
    return request.cached_tokens > 0 and not request.kv and set(request.cached_kv) <= set(instances)


def prefill_chunk(request: RequestView, instances: Iterable[int]) -> tuple[int, int]:
    """(start, length) of the request's next prefill chunk when it runs on `instances` (to the prompt's end)."""
    if not request.cached_tokens and not request.kv:  # the common case: the whole prompt
        return 0, request.prefill_target
    start = request.cached_tokens if reusable(request, instances) else request.num_computed
    return start, request.prefill_target - start


def charge_pins(request: RequestView, pages_free: MutableSequence[int]) -> bool:
    """Subtract the idle cached pages the hit takes; False (nothing changed) if some instance lacks them."""
    if any(pages_free[i] < pins for i, pins in request.cached_pins.items()):
        return False
    for instance, pins in request.cached_pins.items():
        pages_free[instance] -= pins
    return True


def prefix_home(request: RequestView, groups: Sequence[Sequence[int]]) -> tuple[int, ...] | None:
    """The first of `groups` that contains the request's whole cached prefix (None: no hit, or none does)."""
    if request.cached_tokens <= 0 or request.kv:
        return None
    return next((tuple(g) for g in groups if set(request.cached_kv) <= set(g)), None)


def waits_for_prefix(request: RequestView, view: SchedulerView) -> bool:
    """The cached prefix sits on busy instances that free sooner than the prefix would take to recompute on
    the smallest group the cost model prices (what a recompute elsewhere costs beyond the suffix)."""
    if request.cached_tokens <= 0 or request.kv:
        return False
    busy = [view.instances[i].busy_until for i in request.cached_kv if view.instances[i].busy]
    if not busy:
        return False
    prefix, cost = request.cached_tokens, view.cost_model
    return max(busy) - view.now < cost.prefill_time_from_sums(min(cost.prefill), prefix, prefix * prefix)
