"""Engine decode throughput vs a raw jitted decode loop of the same model and batch, in one run.

What it measures (CPU or GPU, one instance of one device by default):
  1. Engine: `LLM` with policy fixed(1, 1) runs `--batch` requests of `--prompt-len` random tokens for
     `--steps` greedy tokens each. After a warm-up run of the same workload, a second run is timed: decode
     tokens/s = batch x (steps - 1) / (last finish - last first token), i.e. the steps where every request
     decodes. The run's XLA compilations are counted with JAX's compile logging (target: 0).
  2. Raw loop: the same decode program (`sharding.decode_program.decode_forward` + argmax) in a jitted
     step whose next inputs (token, position, append slot, tokens held per page entry) are computed on
     device, pool donated,
     `--steps - 1` steps back to back with no host work at all: the device-bound ceiling.
  3. Prints both side by side and their ratio (target >= 0.95 at batch 32, 0.9 at batch 1): engine and raw
     runs alternate and the median pair is reported, so a shared machine's changing load does not favour
     either side; then, for the median run, the host time of each stage of an engine step
     (`Engine.step_timer`: schedule, dispatch (state accounting, step inputs, launch), wait (for the
     device), apply (tokens read, detokenized), outputs) per step. With asynchronous scheduling the device
     runs step n while the host schedules and dispatches step n+1, so "wait" is what the host still waits.
  4. `--timeline`: one more engine run with each unit's dispatch and completion timed: the device's idle
     time between units (0 when the next step is always queued in time) and its busy time per step.
  5. How many decode programs had their inputs advanced from their group's last step instead of built
     from scratch (`executor.decode_steps`; warm-up runs included).
  6. A control for the host's share of the machine: the raw loop once more, its host thread spending in
     pure Python, after each launch, as many ms as the median engine run spent on the host per step
     (schedule + dispatch + apply + outputs), while the launched step runs. On a CPU the "device" computes
     on the host's cores, so host work slows it even when it overlaps; the engine's ratio to this loop is
     what the engine costs beyond its host time. On a GPU the two loops should match.

Run: `python benchmarks/engine_decode.py [--model DIR] [--batch 32] [--steps 64] [--prompt-len 64]`.
A large model's shape with random weights (no checkpoint needed, e.g. on a bare GPU machine): `--shape
llama2-7b` (bfloat16; the demo model's tokenizer and vocabulary, so every sampled id detokenizes; an
H200 holds batch 32 x 4K of its KV, an H100 batch 16 x 4K).
Several processes (what one step's plan broadcast costs): the same command once per process with
`--cpu-devices 4 --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`; process 0 measures (its
engine publishes every plan to the follower over JAX's coordination service; the decode instance is its
own device 0, so the difference to one process with `--cpu-devices 8` is the broadcast), process 1 follows.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import re
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from loong_jax.executor.jax_executor import Buckets
from loong_jax.entrypoints.cpu_devices import use_cpu_devices
from loong_jax.entrypoints.engine_config import EngineConfig
from loong_jax.entrypoints.llm import LLM
from loong_jax.sampling.params import SamplingParams
from loong_jax.sharding.decode_program import DecodeInputs, DecodeRow, decode_forward, layout_decode_batch
from loong_jax.sharding.kv_pool import assemble_group_pool

_COMPILING = re.compile(r"Compiling (\w+)")
# Transformer shapes for `--shape` (the vocabulary and tokenizer stay the demo model's).
SHAPES = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                            head_dim=128, rms_norm_eps=1e-5),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)}


class CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if _COMPILING.search(record.getMessage()):
            self.count += 1


def count_compiles(run):
    counter, jax_logger = CompileCounter(), logging.getLogger("jax")
    jax_logger.addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    try:
        result = run()
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(counter)
    return result, counter.count


def stage_milliseconds(before: dict, after: dict) -> dict[str, float]:
    """Milliseconds per engine step in each stage (`Engine.step_timer`) between two `stats()`."""
    steps = after["steps"] - before["steps"]
    stages = {key.removeprefix("step_seconds_"): 1e3 * (after[key] - before.get(key, 0.0)) / steps
              for key in after if key.startswith("step_seconds_")}
    return {"steps": steps, **stages, "total": sum(stages.values())}


def engine_decode_rate(llm: LLM, prompts, steps: int, temperature: float = 0.0, top_p: float = 1.0) -> float:
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0, max_tokens=steps, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    decode_start = max(o.metrics.first_token_time for o in outputs)
    decode_end = max(o.metrics.finished_time for o in outputs)
    return len(prompts) * (steps - 1) / (decode_end - decode_start)


def spend_host_time(milliseconds: float) -> None:
    """Busy pure-Python work on this thread for `milliseconds` (holding the GIL, as the engine's host does)."""
    end = time.perf_counter() + milliseconds / 1e3
    while time.perf_counter() < end:
        sum(range(64))


def raw_decode_rate(llm: LLM, prompts, steps: int, host_ms_per_step: float = 0.0) -> float:
    """The same requests, decoded by a jitted loop with no engine around it; with `host_ms_per_step`, its
    host spends that long in Python after each launch (the control of step 6 of the docstring)."""
    executor, page_size = llm.executor, llm.executor.page_size
    group = (0,)
    mesh = llm.topology.group_mesh(group)
    batch = len(prompts)
    context = len(prompts[0]) + steps
    pages_per_request = math.ceil(context / page_size)
    buckets = executor.buckets
    batch_local = buckets.round(batch, buckets.decode_batch)
    member_pages = buckets.round(batch * pages_per_request, buckets.decode_batch * buckets.decode_pages)
    # Request r owns pages [r * pages_per_request, (r + 1) * pages_per_request) of the pool; the prompt's KV
    # content does not change the work done, so the pool keeps whatever it holds. The entries list every
    # page of the whole run (the engine's last bucket); their held tokens grow on device.
    rows = [DecodeRow(token=int(p[-1]), position=len(p), master=0,
                      append_slot=r * pages_per_request * page_size + len(p),
                      pages={0: list(range(r * pages_per_request, (r + 1) * pages_per_request))},
                      kv_lens={0: pages_per_request * page_size}) for r, p in enumerate(prompts)]
    host = layout_decode_batch(rows, 1, batch_local, member_pages, page_size)
    first_page = np.zeros(batch_local, np.int32)  # [rows] first page of each row's request
    first_page[list(host.rows)] = [r * pages_per_request for r in range(batch)]
    held = np.zeros(batch_local, np.int32)  # [rows] tokens held, this step's append included
    held[list(host.rows)] = [len(p) + 1 for p in prompts]
    entry_rows = host.entry_rows[0]  # [entries]
    entry_index = host.entry_pages[0] - first_page[entry_rows]  # [entries] page index within its request
    entry_real = host.entry_tokens[0] > 0  # [entries] padding entries stay empty

    def entry_tokens(held):  # [1, entries] tokens of each entry's page held so far
        tokens = jnp.clip(held[entry_rows] - entry_index * page_size, 0, page_size)
        return jnp.where(entry_real, tokens, 0)[None].astype(jnp.int32)

    inputs = DecodeInputs(tokens=host.tokens, positions=host.positions, append_slots=host.append_slots,
                          entry_rows=host.entry_rows, entry_pages=host.entry_pages,
                          entry_tokens=np.asarray(entry_tokens(held)))
    inputs, held = jax.device_put((inputs, held), NamedSharding(mesh, P()))
    graphdef, params = executor.graphdef, executor._params_for(group)
    real = jnp.asarray(host.append_slots >= 0)  # [rows] padding rows stay padding

    @functools.partial(jax.jit, donate_argnames=("pool", "inputs", "held"))
    def decode_step(params, pool, inputs, held):
        logits, pool = decode_forward(graphdef, params, pool, inputs, mesh=mesh)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [rows]
        held = held + real  # the next token's KV is appended after the ones held
        append = jnp.where(real, first_page * page_size + held - 1, -1)
        return pool, DecodeInputs(tokens=tokens, positions=inputs.positions + 1, append_slots=append,
                                  entry_rows=inputs.entry_rows, entry_pages=inputs.entry_pages,
                                  entry_tokens=entry_tokens(held)), held

    pool = assemble_group_pool([executor.pools[0]], mesh)
    pool, inputs, held = decode_step(params, pool, inputs, held)  # compile + one warm step
    jax.block_until_ready(pool)
    start = time.perf_counter()
    for _ in range(steps - 1):
        pool, inputs, held = decode_step(params, pool, inputs, held)
        if host_ms_per_step:
            spend_host_time(host_ms_per_step)
    jax.block_until_ready((pool, inputs))
    seconds = time.perf_counter() - start
    executor.pools[0] = pool  # the pool buffers were donated; hand the engine its pool back
    return batch * (steps - 1) / seconds


def device_timeline(llm: LLM, prompts, steps: int, sampling=()) -> dict[str, float]:
    """One more engine run with every launch's dispatch and completion timed (a thread per launch waits for
    its outputs): median ms per step the device sits idle between units (the next one not yet dispatched
    when the previous one finished) and busy, and of the dispatch call itself."""
    executor, records = llm.executor, []
    dispatch = executor._dispatch

    def timed_dispatch(launch):
        record = [time.perf_counter(), 0.0, 0.0]
        dispatch(launch)
        record[1] = time.perf_counter()
        outputs = list(launch.outputs)
        threading.Thread(target=lambda: (jax.block_until_ready(outputs), record.__setitem__(2, time.perf_counter())),
                         daemon=True).start()
        records.append(record)

    executor._dispatch = timed_dispatch
    try:
        engine_decode_rate(llm, prompts, steps, *sampling)
        time.sleep(0.2)  # the last waiters
    finally:
        del executor._dispatch
    steady = records[2:-2]
    pairs = list(zip(steady, steady[1:]))
    return {"idle": 1e3 * float(np.median([max(0.0, b[0] - a[2]) for a, b in pairs])),
            "busy": 1e3 * float(np.median([b[2] - max(b[0], a[2]) for a, b in pairs])),
            "dispatch call": 1e3 * float(np.median([r[1] - r[0] for r in steady]))}


def random_model(shape: str, context: int):
    """A model of `shape` with random bfloat16 weights and the demo model's vocabulary."""
    import dataclasses

    from loong_jax.models.config import ModelConfig
    from loong_jax.models.demo import resolve_model_path
    from loong_jax.models.llama import init_model

    demo = ModelConfig.from_json(resolve_model_path(None))
    config = dataclasses.replace(demo, **SHAPES[shape], dtype="bfloat16", tie_word_embeddings=False,
                                 max_position_embeddings=max(demo.max_position_embeddings, context))
    return init_model(config, seed=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="random bfloat16 weights of this shape instead of a checkpoint (see the docstring)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed (engine, raw) pairs; the median pair is reported")
    parser.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices (per process)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the engine samples (seeded) instead of greedy; the raw loop stays an argmax")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--timeline", action="store_true",
                        help="also time when each unit is dispatched and done: device idle and busy ms per step")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="the engine waits for each step's tokens before planning the next")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT: several processes (see the docstring)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args(argv)

    sampling = (args.temperature, args.top_p)
    pages = args.batch * math.ceil((args.prompt_len + args.steps) / args.page_size) + 8
    cluster = {"coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    # instances=1: the first device of the cluster, process 0's device 0
    model, tokenizer = args.model, None
    if args.shape is not None:
        from loong_jax.models.demo import resolve_model_path

        if args.model is not None:
            parser.error("--shape builds its own model: give --model or --shape, not both")
        use_cpu_devices(args.cpu_devices)  # before the weights are placed on a device
        model, tokenizer = random_model(args.shape, args.prompt_len + args.steps), resolve_model_path(None)
    config = EngineConfig(model, tokenizer=tokenizer, instances=1, page_size=args.page_size, kv_pages=pages, policy="fixed",
                          prefill_degree=1, decode_degree=1, progress=False, cpu_devices=args.cpu_devices,
                          buckets=Buckets(prefill_requests=args.batch, decode_batch=args.batch),
                          async_scheduling=not args.no_async_scheduling, **cluster)
    if config.cluster is not None and not config.cluster.is_leader:
        from loong_jax.distributed.follower import run_follower

        from loong_jax.distributed.launch import leave_cluster

        print(f"process {args.process_id}: followed {run_follower(config)} steps")
        leave_cluster(0)
    llm = LLM(engine_config=config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, llm.config.vocab_size, size=args.prompt_len).tolist() for _ in range(args.batch)]
    for _ in range(2):  # warm-up: every program and bucket the runs need (the second run's prompts hit the
        engine_decode_rate(llm, prompts, args.steps, *sampling)  # prefix cache: its context prefill compiles here)
    llm.executor.programs.wait_background()
    # Engine and raw runs alternate, so that a shared machine's load changes hit both sides alike; the
    # median of the per-pair ratios is reported.
    pairs, compiles, stages = [], 0, []
    for _ in range(args.repeats):
        before = llm.stats()
        engine_rate, new_compiles = count_compiles(lambda: engine_decode_rate(llm, prompts, args.steps, *sampling))
        compiles += new_compiles
        stages.append(stage_milliseconds(before, llm.stats()))
        pairs.append((engine_rate, raw_decode_rate(llm, prompts, args.steps)))
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0] / pairs[i][1])
    median = order[len(order) // 2]
    (engine, raw), stage_ms = pairs[median], stages[median]
    pairs = [pairs[i] for i in order]
    device = jax.devices()[0]
    processes = f"; {jax.process_count()} processes, {jax.device_count()} devices" if config.cluster else ""
    print(f"model: {args.shape or args.model or 'demo'} ({llm.config.num_layers} layers, hidden {llm.config.hidden_size}, "
          f"vocab {llm.config.vocab_size}); device: {device.platform} {device.device_kind}{processes}")
    print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.steps} tokens per request, "
          f"page size {args.page_size}, asynchronous scheduling {'off' if args.no_async_scheduling else 'on'}, "
          f"sampling {'greedy' if args.temperature == 0 else f'temperature {args.temperature} top_p {args.top_p}'}")
    print(f"{'engine decode':>22}: {engine:10.1f} tokens/s")
    print(f"{'raw jitted decode loop':>22}: {raw:10.1f} tokens/s")
    print(f"{'ratio engine / raw':>22}: {engine / raw:10.3f}   (target >= 0.95; median of {len(pairs)} pairs, "
          f"range {pairs[0][0] / pairs[0][1]:.3f}-{pairs[-1][0] / pairs[-1][1]:.3f})")
    print(f"{'compilations after warm-up':>22}: {compiles:6d}       (target 0)")
    print(f"{'load average (1 min)':>22}: {os.getloadavg()[0]:10.2f}")
    print(f"engine step, host ms per step of the median run ({stage_ms.pop('steps'):.0f} steps; raw loop "
          f"{1e3 * len(prompts) / raw:.2f} ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in stage_ms.items()))
    host_ms = stage_ms["total"] - stage_ms["wait"]
    controls = sorted(raw_decode_rate(llm, prompts, args.steps, host_ms) for _ in range(3))
    print(f"{'raw loop + host time':>22}: {controls[1]:10.1f} tokens/s   (its host busy {host_ms:.2f} ms per step, "
          f"as the engine's; median of 3) -> engine / this: {engine / controls[1]:.3f}")
    if args.timeline:
        timeline = device_timeline(llm, prompts, args.steps, sampling)
        print("device timeline, median ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in timeline.items()))
    stats = llm.stats()
    kept = llm.executor.unit_inputs.decode_steps  # (`executor.decode_steps`; None: built every step)
    if kept is not None:
        print(f"{'decode inputs kept':>22}: {kept.advanced} of {stats.get('units_decode', 0)} decode programs "
              "advanced from their group's last step (the rest built from scratch)")
    if stats.get("broadcast_steps"):  # several processes: what publishing each plan cost the leader
        print(f"{'plan broadcast':>22}: {1e3 * stats['broadcast_seconds'] / stats['broadcast_steps']:10.3f} ms "
              f"per step on the leader's path (+ {1e3 * stats['broadcast_rpc_seconds'] / stats['broadcast_steps']:.3f} "
              f"ms RPC in its writer thread), {stats['broadcast_bytes'] / stats['broadcast_steps']:.0f} bytes per plan "
              f"({stats['broadcast_steps']} steps)")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
