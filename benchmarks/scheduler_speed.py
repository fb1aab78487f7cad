"""Scheduler speed: median `schedule()` time on 8 instances (1,000 waiting, 200 decoding) and on 64
(10,000 waiting, 1,600 decoding).

Data flow:
  1. Build an EngineState with the KV geometry of the shipped H200 cost model (Llama-2-7B).
  2. Bring the decoding requests into decoding through real plans (prefill with placement, then a result),
     with their KV spread over some of the instances (scenario: 3/4, all, half), and queue the waiting
     requests (mixed lengths).
  3. Time `policy.schedule(state.view(...))` many times and print the median and 90th percentile of wall
     time, the median of this thread's CPU time (what the call costs on a machine shared with other work),
     and the view-building time, in two modes (`--mode`):
       - "fixed": the state is not changed, so every call does the same full amount of work;
       - "serving": the state advances between calls as in serving, so that state a policy keeps across
         calls must follow real change: the clock moves by one decode step, the plan's decode batches
         (and the preemptions they need) are dispatched and their results applied (every decoding request
         that ran gains a token; those at their max_new_tokens finish and leave), a request arrives at the
         tail of the queue, and every fifth call one waiting request is aborted (it leaves the queue). The
         plan's prefills and migrations are not dispatched, so the scenario keeps its shape.
     `--digest` also prints a hash of every plan (to check that a change of the scheduler changes no decision).

Run: python benchmarks/scheduler_speed.py [--policy esp] [--repeats 200] [--mode fixed,serving] [--digest]
     [--clusters 8x1000x200,64x10000x1600]  (instances x waiting x decoding)
Target: median <= 5 ms for ESP, at 64 instances too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import time

from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.plan import Plan, PrefillBatch
from loong_jax.scheduler.policy import make_policy, policy_names

DEFAULT_CLUSTERS = "8x1000x200,64x10000x1600"
MODES = ("fixed", "serving")
DECODE_STEP_S = 0.03  # how far the clock moves between two calls in the serving mode
SCENARIOS = {  # name: share of the instances that hold the decoding requests' KV
    "3/4": 0.75,
    "all": 1.0,
    "1/2": 0.5,
}


def parse_clusters(text: str) -> list[tuple[int, int, int]]:
    """"8x1000x200,64x10000x1600" -> [(instances, waiting, decoding), ...]."""
    try:
        clusters = [tuple(int(x) for x in part.split("x")) for part in text.split(",")]
    except ValueError:
        clusters = []
    if not clusters or any(len(c) != 3 or min(c) < 1 for c in clusters):
        raise argparse.ArgumentTypeError(f"expected INSTANCESxWAITINGxDECODING[,...], got {text!r}")
    return clusters


def mixed_length(rng: random.Random) -> int:
    """ShareGPT-like, L-Eval-like and LV-Eval-like prompts in equal parts."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randint(4, 2_300)
    if kind == 1:
        return rng.randint(2_700, 60_000)
    return rng.randint(15_000, 120_000)


def build_state(cost: CostModel, num_instances: int, decode_instances, num_waiting: int, num_decoding: int,
                seed: int) -> EngineState:
    rng = random.Random(seed)
    state = EngineState(num_instances, cost.pages_per_instance, cost.page_size)
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


class Timer:
    """Times `policy.schedule(state.view(...))` calls; `advance` (the serving mode) changes the state after
    each call. Keeps the plans' digest."""

    def __init__(self, policy, state: EngineState, cost: CostModel, advance: bool, seed: int = 0):
        self.policy, self.state, self.cost, self.advance = policy, state, cost, advance
        self.now, self.calls, self.rng = 1_000.0, 0, random.Random(seed)
        self.digest = hashlib.sha256()

    def run(self, repeats: int):
        view_times, schedule_times, cpu_times, plan = [], [], [], None
        for _ in range(repeats):
            start = time.perf_counter()
            view = self.state.view(self.cost, now=self.now)
            middle = time.perf_counter()
            cpu_start = time.thread_time()
            plan = self.policy.schedule(view)
            cpu_times.append(time.thread_time() - cpu_start)
            end = time.perf_counter()
            view_times.append(middle - start)
            schedule_times.append(end - middle)
            self.digest.update(repr(plan).encode())
            if self.advance:
                self.step(plan)
        return view_times, schedule_times, cpu_times, plan

    def step(self, plan: Plan) -> None:
        """Serving between two calls: decode batches run and return, a request arrives, one may leave."""
        state, self.calls = self.state, self.calls + 1
        state.on_dispatched(Plan(decodes=plan.decodes, preemptions=plan.preemptions), now=self.now)
        self.now += DECODE_STEP_S
        for batch in plan.decodes:
            finished = frozenset(r for r in batch.request_ids
                                 if state.requests[r].remaining_new_tokens(1) <= 1)
            state.apply(UnitResult(batch, dict.fromkeys(batch.request_ids, 1), finished, self.now))
        state.add_request(f"arrival-{self.calls}", mixed_length(self.rng), max_new_tokens=self.rng.randint(16, 1_024),
                          arrival=self.now)
        if self.calls % 5 == 0 and state.waiting:
            state.abort(self.rng.choice(state.waiting).request_id, self.now)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="esp", choices=policy_names())
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--clusters", type=parse_clusters, default=DEFAULT_CLUSTERS,
                        help="comma list of INSTANCESxWAITINGxDECODING")
    parser.add_argument("--cost-model", default=None, help="cost-model JSON (default: the shipped H200 file)")
    parser.add_argument("--mode", type=parse_modes, default=MODES, help="comma list of: fixed, serving")
    parser.add_argument("--digest", action="store_true", help="print a hash of every plan of each scenario")
    args = parser.parse_args(argv)
    cost = CostModel.load_json(args.cost_model, tp=1)
    print(f"policy={args.policy}  repeats={args.repeats}  load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    for num_instances, num_waiting, num_decoding in args.clusters:
        for mode in args.mode:
            print(f"{num_instances} instances, {num_waiting} waiting, {num_decoding} decoding, {mode} state:")
            for share, fraction in SCENARIOS.items():
                decode_instances = tuple(range(max(1, round(fraction * num_instances))))
                name = f"decode on {share} of the instances ({num_instances - len(decode_instances)} free)"
                state = build_state(cost, num_instances, decode_instances, num_waiting, num_decoding, seed=0)
                timer = Timer(make_policy(args.policy), state, cost, advance=mode == "serving")
                time_one(timer, name, args.repeats, args.digest)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(text.split(","))
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(MODES)}, got {text!r}")
    return modes


def time_one(timer: Timer, name: str, repeats: int, digest: bool) -> None:
    timer.run(5)  # warm caches (lru caches, imports)
    view_times, schedule_times, cpu_times, plan = timer.run(repeats)
    q = statistics.quantiles(schedule_times, n=10)
    print(f"  {name:40s} schedule() median {statistics.median(schedule_times) * 1e3:6.2f} ms  "
          f"p90 {q[-1] * 1e3:6.2f} ms  CPU median {statistics.median(cpu_times) * 1e3:6.2f} ms  | "
          f"view() median {statistics.median(view_times) * 1e3:5.2f} ms  | "
          f"plan: {len(plan.prefills)} prefill batches "
          f"(DoPs {sorted(len(b.group) for b in plan.prefills)}, "
          f"{sum(len(b.request_ids) for b in plan.prefills)} requests), "
          f"{len(plan.decodes)} decode batches, {len(plan.migrations)} migrations"
          + (f"  | plans digest {timer.digest.hexdigest()[:16]}" if digest else ""))


if __name__ == "__main__":
    main()
