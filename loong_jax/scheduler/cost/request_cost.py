"""What one request costs under a cost model: alone on an idle cluster, and at least under any schedule.

Data flow:
  1. `isolated_latency(cost, input_len, output_len, max_dop)`: seconds to serve the request alone with the best
     degree for each phase; the simulator's default SLO is a multiple of it (`simulator.metrics`).
  2. `instance_seconds_lower_bound(cost, input_len, output_len, cached_len)`: the least instance-seconds any
     batching, placement or widening spends on it (with `cached_len` prompt tokens' KV reused from the prefix
     cache, its prefill is the suffix attending to them); the simulator's capacity bound divides the
     cluster's instances by its mean over a workload (`simulator.steady.capacity_bound`).
"""

from __future__ import annotations

from loong_jax.scheduler.cost.model import CostModel


def isolated_latency(cost_model: CostModel, input_len: int, output_len: int, max_dop: int) -> float:
    """Seconds to serve one request alone on an idle cluster with the best DoP for each phase.

    Prefill picks the fastest d; decode of output tokens 2..output_len (the first token comes out of the
    prefill) picks the d with the smallest summed step time among those whose KV pools hold the request.
    """
    dops = [d for d in cost_model.dops if d <= max_dop]
    if not dops:
        raise ValueError(f"cost model has no DoP <= {max_dop}")
    prefill = min(cost_model.prefill_time(d, [input_len]) for d in dops)
    steps = output_len - 1
    if steps <= 0:
        return prefill
    final_context = input_len + output_len
    # Σ_{k=1..steps} (a + b + c·(input_len + k)) in closed form.
    context_sum = steps * input_len + steps * (steps + 1) / 2
    feasible = [d for d in dops if d * cost_model.tokens_per_instance >= final_context] or [max(dops)]
    decode = min(
        steps * (cost_model.decode[d].constant + cost_model.decode[d].per_request)
        + cost_model.decode[d].per_context_token * context_sum
        for d in feasible
    )
    return prefill + decode


def instance_seconds_lower_bound(cost_model: CostModel, input_len: int, output_len: int, cached_len: int = 0) -> float:
    """Instance-seconds that serving one request costs at least, however it is batched, placed or widened.

    Per-token and per-request terms are the cheapest over degrees in instance-time (d·B_d, d·C_d, d·b_d, d·c_d;
    the width floor makes that d = 1 for a fitted model). A step's fixed cost (A_d or a_d; a decode step
    with a fused prefill chunk pays one of them) is shared by the requests of its batch, which hold at most
    the group's KV pool, d × tokens_per_instance: a request holding `context` tokens of it bears at least
    min(A_d, a_d)·context / tokens_per_instance of the step's d·(fixed cost) instance-seconds (cheapest d).
    Migration and preemption cost more, never less: left out.
    """
    dops = cost_model.dops
    prefill, decode = cost_model.prefill, cost_model.decode
    fixed_per_pool_token = min(min(prefill[d].constant, decode[d].constant) for d in dops) / cost_model.tokens_per_instance
    computed, squares = input_len - cached_len, input_len**2 - cached_len**2  # a cached prefix is not recomputed
    prompt = min(d * (prefill[d].per_token * computed + prefill[d].per_token_squared * squares) for d in dops)
    steps = max(0, output_len - 1)
    context_sum = steps * input_len + steps * (steps + 1) / 2  # Σ over decode steps k of input_len + k
    generation = min(d * (decode[d].per_request * steps + decode[d].per_context_token * context_sum) for d in dops)
    return prompt + generation + fixed_per_pool_token * (input_len + context_sum)
