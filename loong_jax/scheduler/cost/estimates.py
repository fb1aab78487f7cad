"""Time estimates of plan units from the cost model (shared by every policy and usable by a simulator).

Data flow:
  1. `prefill_chunks_seconds(cost, d, chunks)`: a ring prefill of chunks (start, length) on d instances costs
     A_d + B_d·Σlength + C_d·Σ((start+length)² − start²): a chunk's causal attention covers the tokens before
     it, so its quadratic term is what extending the prompt from `start` to `start+length` adds (a whole
     prompt, start 0, gives the usual C_d·l²).
  2. `decode_seconds(cost, d, contexts)`: a_d + b_d·batch + c_d·Σcontext.
  3. `unit_seconds(cost, unit, context_of)` for any `WorkUnit`: the one definition of a unit's duration, used
     by the simulator's executor (its virtual clock) and by policies' and tests' estimates. A decode step with
     a fused prefill chunk pays both minus the smaller fixed cost, min(A_d, a_d): one program launches once and
     streams the weights once, but keeps the ring and exchange latencies of both parts (so never less than
     the larger fixed cost); a fused step with no decode requests is its prefill.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from loong_jax.scheduler.plan import MigrationBatch, PrefillBatch, WorkUnit


def prefill_chunks_seconds(cost, dop: int, chunks: Iterable[tuple[int, int]]) -> float:
    total, squares = 0, 0
    for start, length in chunks:
        total += length
        squares += (start + length) ** 2 - start * start
    return cost.prefill_time_from_sums(dop, total, squares)


def prefill_seconds(cost, dop: int, lengths: Sequence[int]) -> float:
    return cost.prefill_time_from_sums(dop, sum(lengths), sum(l * l for l in lengths))


def decode_seconds(cost, dop: int, contexts: Sequence[int]) -> float:
    return cost.decode_time(dop, len(contexts), sum(contexts))


def unit_seconds(cost, unit: WorkUnit, context_of: Callable[[object], int]) -> float:
    """Estimated duration of a unit; `context_of(request_id)` gives the KV tokens a decode step reads."""
    if isinstance(unit, MigrationBatch):
        return cost.migration_time(unit.num_tokens)
    if isinstance(unit, PrefillBatch):
        return prefill_chunks_seconds(cost, len(unit.group), unit.chunks)
    dop = len(unit.group)
    seconds = decode_seconds(cost, dop, [context_of(r) for r in unit.request_ids]) if unit.request_ids else 0.0
    if unit.fused_prefill is not None:
        seconds += prefill_chunks_seconds(cost, dop, unit.fused_prefill.chunks)
        if unit.request_ids:
            seconds -= min(cost.prefill[dop].constant, cost.decode[dop].constant)
    return seconds
