"""Scheduler speed: median `schedule()` time with 1,000 waiting and 200 decoding requests on 8 instances.

Data flow:
  1. Build an EngineState with the KV geometry of the shipped H200 cost model (Llama-2-7B, 8 instances).
  2. Bring 200 requests into decoding through real plans (prefill with placement, then a result), with their
     KV spread over some instances (scenario), and queue 1,000 waiting requests (mixed lengths).
  3. Time `policy.schedule(state.view(...))` many times (the state is not changed, so every call does the
     same full amount of work) and print the median and 90th percentile of wall time, the median of this
     thread's CPU time (what the call costs on a machine shared with other work), and the view-building time.

Run: python benchmarks/scheduler_speed.py [--policy esp] [--repeats 200]
Target: median <= 5 ms for ESP.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.plan import Plan, PrefillBatch
from loong_jax.scheduler.policy import make_policy, policy_names

SCENARIOS = {
    # name: instances that hold the decoding requests' KV
    "decode on 6 of 8 instances (2 free)": (0, 1, 2, 3, 4, 5),
    "decode on all 8 instances (none free)": (0, 1, 2, 3, 4, 5, 6, 7),
    "decode on 4 of 8 instances (4 free)": (0, 1, 2, 3),
}


def mixed_length(rng: random.Random) -> int:
    """ShareGPT-like, L-Eval-like and LV-Eval-like prompts in equal parts."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randint(4, 2_300)
    if kind == 1:
        return rng.randint(2_700, 60_000)
    return rng.randint(15_000, 120_000)


def build_state(cost: CostModel, decode_instances, num_waiting: int, num_decoding: int, seed: int) -> EngineState:
    rng = random.Random(seed)
    state = EngineState(8, cost.pages_per_instance, cost.page_size)
    budget = {i: cost.pages_per_instance * cost.page_size // 2 for i in decode_instances}  # half full
    placed = 0
    while placed < num_decoding:
        instance = decode_instances[placed % len(decode_instances)]
        length = max(16, min(rng.choice([rng.randint(50, 2_000), rng.randint(2_000, 6_000)]), budget[instance] - 16))
        request_id = f"decode-{placed}"
        state.add_request(request_id, length, max_new_tokens=rng.randint(16, 1_024))
        batch = PrefillBatch((instance,), (request_id,), ((0, length),), (((instance, length),),))
        state.on_dispatched(Plan(prefills=(batch,)))
        state.apply(UnitResult(batch, {request_id: 1}, frozenset(), 0.0))
        budget[instance] -= length
        placed += 1
    for k in range(num_waiting):
        state.add_request(f"wait-{k}", mixed_length(rng), max_new_tokens=rng.randint(16, 1_024), arrival=float(k))
    return state


def time_schedule(policy, state: EngineState, cost: CostModel, repeats: int):
    view_times, schedule_times, cpu_times, plan = [], [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        view = state.view(cost, now=1_000.0)
        middle = time.perf_counter()
        cpu_start = time.thread_time()
        plan = policy.schedule(view)
        cpu_times.append(time.thread_time() - cpu_start)
        end = time.perf_counter()
        view_times.append(middle - start)
        schedule_times.append(end - middle)
    return view_times, schedule_times, cpu_times, plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="esp", choices=policy_names())
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--waiting", type=int, default=1_000)
    parser.add_argument("--decoding", type=int, default=200)
    args = parser.parse_args(argv)
    cost = CostModel.load_json(tp=1)
    policy = make_policy(args.policy)
    print(f"policy={args.policy}  waiting={args.waiting}  decoding={args.decoding}  instances=8  "
          f"repeats={args.repeats}  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, instances in SCENARIOS.items():
        state = build_state(cost, instances, args.waiting, args.decoding, seed=0)
        time_schedule(policy, state, cost, 5)  # warm caches (lru caches, imports)
        view_times, schedule_times, cpu_times, plan = time_schedule(policy, state, cost, args.repeats)
        q = statistics.quantiles(schedule_times, n=10)
        print(f"  {name:40s} schedule() median {statistics.median(schedule_times) * 1e3:6.2f} ms  "
              f"p90 {q[-1] * 1e3:6.2f} ms  CPU median {statistics.median(cpu_times) * 1e3:6.2f} ms  | "
              f"view() median {statistics.median(view_times) * 1e3:5.2f} ms  | "
              f"plan: {len(plan.prefills)} prefill batches "
              f"(DoPs {sorted(len(b.group) for b in plan.prefills)}, "
              f"{sum(len(b.request_ids) for b in plan.prefills)} requests), "
              f"{len(plan.decodes)} decode batches, {len(plan.migrations)} migrations")


if __name__ == "__main__":
    main()
