"""ESP on the real engine: 8 CPU instances, long and short prompts, scarce KV pages; the elastic moves it
makes, counted and shown, with every greedy output checked against the single-device reference.

Data flow:
  1. The model (default: the shipped demo model) is loaded twice: by `LLM` on 8 instances of one CPU device
     each (`policy="esp"`, deterministic: units complete in dispatch order on a logical clock, so a run
     repeats exactly) and as the single-device reference (`models.generate`).
  2. The policy's cost model is the H200 Llama-2-7B projection with this engine's KV geometry, derived with
     10 µs per collective and ring step instead of the shipped file's latencies (checked against LoongServe's
     published step times, H200_DERIVATION.md §5): this trace's prompts are 100–180 tokens, and only with
     such optimistic latencies does sequence parallelism pay for them, as it does for long prompts on a GPU
     cluster; the trace exists to exercise every elastic move. (The CPU profile of the demo model
     and the roofline of a tiny model both make a wider group slower or no faster, so on them ESP never
     widens a prefill for speed; `--cost-model engine` runs with the engine's own choice to show that.)
  3. `run_esp_trace` queues the requests, steps the engine and records every plan: prefill batches with
     their degree and the members that keep nothing (scale-down), decode masters that hold none of their
     request's KV (scale-up), migrations and preemptions; page accounting is checked after every event.
  4. Printed: the engine's counters and DoP histograms, a few lines per kind of move, and the outputs'
     agreement with the reference.
Steps are synchronous by default: with asynchronous scheduling (`--async-scheduling`) every decode step is
booked as done when dispatched, and on this workload ESP then makes no migration at all (seeds 1–6: 0
migrations, against 2 with synchronous steps at seed 3); the other moves stay.

    python benchmarks/esp_engine_trace.py            # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import time

if __name__ == "__main__":  # 8 simulated devices, before JAX starts
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)

import numpy as np

from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.cost.roofline import H200_SXM, derive_cost_model

# 128 token slots per instance (1,024 in the cluster) for ~4,000 tokens of prompts and outputs; a small
# growth reservation admits optimistically, so decodes outgrow their masters' pages.
PAGE_SIZE, KV_PAGES, GROWTH_HORIZON, MAX_TOKENS = 4, 32, 2, 24


@dataclasses.dataclass
class EspTrace:
    counters: dict  # the engine's stats (preemptions, migrations, scale_ups, scale_downs, units_*, ...)
    prefill_degrees: dict  # DoP -> prefill batches
    decode_degrees: dict  # DoP -> decode batches
    examples: dict  # kind of move -> the first log lines of that kind
    outputs: list  # generated token ids per prompt
    seconds: float

    def report(self) -> list[str]:
        lines = [f"prefill batches per degree: {dict(sorted(self.prefill_degrees.items()))}",
                 f"decode batches per degree:  {dict(sorted(self.decode_degrees.items()))}",
                 "counters: " + ", ".join(f"{k}={v}" for k, v in self.counters.items()
                                          if k in ("scale_downs", "scale_ups", "migrations", "preemptions",
                                                   "units_prefill", "units_decode", "units_migrate"))]
        for kind, examples in self.examples.items():
            lines += [f"[{kind}] {example}" for example in examples]
        return lines


def h200_policy_cost_model(pages_per_instance: int, page_size: int) -> CostModel:
    """The H200 projection with 10 µs fixed latencies (see step 2), holding this engine's KV pool geometry."""
    hardware = dataclasses.replace(H200_SXM, collective_latency_s=10e-6, ring_step_latency_s=10e-6)
    model = derive_cost_model(hardware=hardware, tp=1, dops=(1, 2, 4, 8))
    return dataclasses.replace(model, pages_per_instance=pages_per_instance, page_size=page_size)


def mixed_workload(vocab_size: int, seed: int, long_count: int, short_count: int, long_range, short_range):
    """Long and short prompts interleaved (random ids 4.., avoiding special tokens)."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(*long_range)) for _ in range(long_count)]
    lengths += [int(rng.integers(*short_range)) for _ in range(short_count)]
    order = rng.permutation(len(lengths))
    return [rng.integers(4, vocab_size, size=lengths[i]).tolist() for i in order]


def two_wave_workload(vocab_size: int, seed: int = 3):
    """(prompts, arrivals): one long prompt alone on an idle cluster, then at the 3rd engine event a wave of
    2 long and 30 short prompts, more than the KV pages hold at once (with `KV_PAGES` of `PAGE_SIZE`)."""
    first = mixed_workload(vocab_size, seed, long_count=1, short_count=0, long_range=(100, 110), short_range=(1, 2))
    wave = mixed_workload(vocab_size, seed + 1, long_count=2, short_count=30, long_range=(100, 180),
                          short_range=(5, 30))
    return first + wave, [0] * len(first) + [3] * len(wave)


def run_esp_trace(llm, prompts, params: SamplingParams, arrivals=None, examples_per_kind: int = 3) -> EspTrace:
    """Run the prompts on `llm`'s engine (policy esp), recording each plan's elastic moves. `arrivals[i]`:
    the engine event before which prompt i is queued (default: all at the start)."""
    engine = llm.engine
    policy, examples, event = engine.policy, collections.defaultdict(list), [0]

    def note(kind: str, text: str) -> None:
        if len(examples[kind]) < examples_per_kind:
            examples[kind].append(f"event {event[0]}: {text}")

    class Recording:  # the engine's policy, unchanged, with its plans written down
        name = policy.name

        def schedule(self, view):
            plan = policy.schedule(view)
            event[0] += 1
            decoding = {r.request_id: r for r in view.decoding}
            for batch in plan.prefills:
                lengths = [n for _, n in batch.chunks]
                text = (f"prefill d={len(batch.group)} on {batch.group}, prompts {lengths}, "
                        f"KV kept on {batch.kept_instances}")
                note(f"prefill d={len(batch.group)}", text)
                if batch.leaving_instances:
                    note("scale-down", f"{text}; {batch.leaving_instances} leave the group")
            for batch in plan.decodes:
                for request_id, master in zip(batch.request_ids, batch.masters):
                    held = decoding[request_id].kv
                    if master not in held:
                        note("scale-up", f"decode on {batch.group}: request {request_id} (KV {dict(held)}) "
                                         f"gets new master {master}")
            for move in plan.migrations:
                note("migration", f"request {move.request_id}: {move.n_tokens} tokens {move.src_instance} -> "
                                  f"{move.dst_instance}")
            for preemption in plan.preemptions:
                note("preemption", f"request {preemption.request_id} recomputes later")
            return plan

    engine.core.policy = Recording()
    started = time.perf_counter()
    try:
        requests = [llm.prepare(prompt, params) for prompt in prompts]
        results = {r.request_id: RequestOutput(r.request_id, None, list(r.prompt_token_ids), [], False)
                   for r in requests}
        arrivals = [0] * len(requests) if arrivals is None else list(arrivals)
        pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
        while pending or engine.has_unfinished():
            while pending and (arrivals[pending[0]] <= event[0] or not engine.has_unfinished()):
                engine.add_request(requests[pending.pop(0)])
            for delta in engine.step():
                results[delta.request_id] = results[delta.request_id].merged(delta)
            engine.state.check_invariants()
        engine.check_all_free()
    finally:
        engine.core.policy = policy
    return EspTrace(counters=engine.stats(), prefill_degrees=dict(engine.core.dops.prefill),
                    decode_degrees=dict(engine.core.dops.decode), examples=dict(examples),
                    outputs=[results[r.request_id].outputs[0].token_ids for r in requests],
                    seconds=time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--async-scheduling", action="store_true",
                        help="release decode steps early, as the engine does by default (see the docstring)")
    parser.add_argument("--cost-model", choices=("h200", "engine"), default="h200",
                        help="the policy's cost model: the H200 projection, or the engine's own choice")
    args = parser.parse_args(argv)

    from loong_jax.entrypoints.llm import LLM
    from loong_jax.models.demo import resolve_model_path
    from loong_jax.models.generate import generate
    from loong_jax.models.loading import load_hf_checkpoint

    path = resolve_model_path(args.model)
    cost_model = h200_policy_cost_model(KV_PAGES, PAGE_SIZE) if args.cost_model == "h200" else None
    llm = LLM(path, page_size=PAGE_SIZE, kv_pages=KV_PAGES, policy="esp", cost_model=cost_model,
              policy_options={"growth_horizon": GROWTH_HORIZON}, warmup=False, progress=False, deterministic=True,
              async_scheduling=args.async_scheduling)
    prompts, arrivals = two_wave_workload(llm.config.vocab_size, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with llm:
        trace = run_esp_trace(llm, prompts, params, arrivals)
    reference, _ = load_hf_checkpoint(path)
    matches = sum(generate(reference, prompt, MAX_TOKENS, eos_token_ids=()).tokens == output
                  for prompt, output in zip(prompts, trace.outputs))
    print(f"{len(prompts)} requests (prompt lengths {[len(p) for p in prompts]}, arriving at events "
          f"{sorted(set(arrivals))}), 8 instances x {KV_PAGES} pages of {PAGE_SIZE} tokens; policy cost model: "
          f"{llm.cost_model.description!r}")
    for line in trace.report():
        print(line)
    print(f"greedy outputs equal to the single-device reference: {matches}/{len(prompts)}; "
          f"engine run {trace.seconds:.1f} s")
    return 0 if matches == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
