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
  3. Prints both side by side and their ratio (target >= 0.8 at batch 32): engine and raw runs alternate
     and the median pair is reported, so a shared machine's changing load does not favour either side.

Run: `python benchmarks/engine_decode.py [--model DIR] [--batch 32] [--steps 64] [--prompt-len 64]`.
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
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from loong_jax.executor.jax_executor import Buckets
from loong_jax.entrypoints.engine_config import EngineConfig
from loong_jax.entrypoints.llm import LLM
from loong_jax.sampling.params import SamplingParams
from loong_jax.sharding.decode_program import DecodeInputs, DecodeRow, decode_forward, layout_decode_batch
from loong_jax.sharding.kv_pool import assemble_group_pool

_COMPILING = re.compile(r"Compiling (\w+)")


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


def engine_decode_rate(llm: LLM, prompts, steps: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    decode_start = max(o.metrics.first_token_time for o in outputs)
    decode_end = max(o.metrics.finished_time for o in outputs)
    return len(prompts) * (steps - 1) / (decode_end - decode_start)


def raw_decode_rate(llm: LLM, prompts, steps: int) -> float:
    """The same requests, decoded by a jitted loop with no engine around it."""
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
    jax.block_until_ready((pool, inputs))
    seconds = time.perf_counter() - start
    executor.pools[0] = pool  # the pool buffers were donated; hand the engine its pool back
    return batch * (steps - 1) / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed (engine, raw) pairs; the median pair is reported")
    parser.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices (per process)")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT: several processes (see the docstring)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args(argv)

    pages = args.batch * math.ceil((args.prompt_len + args.steps) / args.page_size) + 8
    cluster = {"coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    # instances=1: the first device of the cluster, process 0's device 0
    config = EngineConfig(args.model, instances=1, page_size=args.page_size, kv_pages=pages, policy="fixed",
                          prefill_degree=1, decode_degree=1, progress=False, cpu_devices=args.cpu_devices,
                          buckets=Buckets(prefill_requests=args.batch, decode_batch=args.batch), **cluster)
    if config.cluster is not None and not config.cluster.is_leader:
        from loong_jax.distributed.follower import run_follower

        from loong_jax.distributed.launch import leave_cluster

        print(f"process {args.process_id}: followed {run_follower(config)} steps")
        leave_cluster(0)
    llm = LLM(engine_config=config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, llm.config.vocab_size, size=args.prompt_len).tolist() for _ in range(args.batch)]
    engine_decode_rate(llm, prompts, args.steps)  # warm-up: every program and bucket the run needs
    llm.executor.programs.wait_background()
    # Engine and raw runs alternate, so that a shared machine's load changes hit both sides alike; the
    # median of the per-pair ratios is reported.
    pairs, compiles = [], 0
    for _ in range(args.repeats):
        engine_rate, new_compiles = count_compiles(lambda: engine_decode_rate(llm, prompts, args.steps))
        compiles += new_compiles
        pairs.append((engine_rate, raw_decode_rate(llm, prompts, args.steps)))
    pairs.sort(key=lambda pair: pair[0] / pair[1])
    engine, raw = pairs[len(pairs) // 2]
    device = jax.devices()[0]
    processes = f"; {jax.process_count()} processes, {jax.device_count()} devices" if config.cluster else ""
    print(f"model: {args.model or 'demo'} ({llm.config.num_layers} layers, hidden {llm.config.hidden_size}, "
          f"vocab {llm.config.vocab_size}); device: {device.platform} {device.device_kind}{processes}")
    print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.steps} tokens per request, "
          f"page size {args.page_size}")
    print(f"{'engine decode':>22}: {engine:10.1f} tokens/s")
    print(f"{'raw jitted decode loop':>22}: {raw:10.1f} tokens/s")
    print(f"{'ratio engine / raw':>22}: {engine / raw:10.3f}   (target >= 0.8; median of {len(pairs)} pairs, "
          f"range {pairs[0][0] / pairs[0][1]:.3f}-{pairs[-1][0] / pairs[-1][1]:.3f})")
    print(f"{'compilations after warm-up':>22}: {compiles:6d}       (target 0)")
    stats = llm.stats()
    if stats.get("broadcast_steps"):  # several processes: what publishing each plan cost the leader
        print(f"{'plan broadcast':>22}: {1e3 * stats['broadcast_seconds'] / stats['broadcast_steps']:10.3f} ms "
              f"per step on the leader's path (+ {1e3 * stats['broadcast_rpc_seconds'] / stats['broadcast_steps']:.3f} "
              f"ms RPC in its writer thread), {stats['broadcast_bytes'] / stats['broadcast_steps']:.0f} bytes per plan "
              f"({stats['broadcast_steps']} steps)")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
