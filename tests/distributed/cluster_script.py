"""One process of the two-process test cluster (`test_two_processes.py` starts two of these on loopback).

Both processes run this same script with the same options (JAX's multi-controller model); process 0 drives
the engines through the Python API (`LLM`), process 1 follows (`run_follower`). Scenarios, in order:
  degrees: 16 mixed prompts, greedy, under the `fixed` policy at each (prefill, decode) degree of DEGREES on
           8 instances (4 per process), one engine whose programs stay compiled across `set_policy`;
  elastic: scarce pages on 2 instances, device 3 (process 0) and device 4 (process 1), `esp` policy: decodes
           scale up onto the other process's instance and KV migrates between the processes.
Process 0 writes the tokens and the engine counters as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys

DEGREES = ((1, 1), (2, 1), (4, 1), (8, 8))
MAX_TOKENS = 8
ELASTIC_RUNS = ((5, 24), (7, 32))  # (prompt seed, max_tokens), as tests/engine/test_engine_elastic.py


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--scenarios", default="degrees,elastic")
    args = parser.parse_args(argv)

    from loong_jax.distributed.follower import run_follower
    from loong_jax.distributed.launch import ClusterOptions, join_cluster
    from loong_jax.entrypoints.cpu_devices import use_cpu_devices
    from loong_jax.entrypoints.engine_config import EngineConfig
    from loong_jax.entrypoints.llm import LLM
    from loong_jax.sampling.params import SamplingParams
    from tests.engine_fixtures import PAGE_SIZE, KV_PAGES, TEST_BUCKETS, mixed_prompts

    common = dict(page_size=PAGE_SIZE, buckets=TEST_BUCKETS, warmup=False, compilation_cache_dir=args.cache,
                  progress=False, cpu_devices=4, coordinator=f"127.0.0.1:{args.port}", num_processes=2,
                  process_id=args.process_id)
    leader = args.process_id == 0
    use_cpu_devices(4)  # the scenarios pick devices of the cluster: join it before asking JAX for them
    join_cluster(ClusterOptions(common["coordinator"], 2, args.process_id))
    results: dict = {}
    scenarios = args.scenarios.split(",")

    if "degrees" in scenarios:
        config = EngineConfig(args.checkpoint, kv_pages=KV_PAGES, policy="fixed", prefill_degree=1,
                              decode_degree=1, **common)
        if leader:
            with LLM(engine_config=config) as llm:
                prompts = mixed_prompts(llm.config.vocab_size)
                results["prompts"] = prompts
                for prefill_degree, decode_degree in DEGREES:
                    llm.set_policy("fixed", prefill_degree, decode_degree, warmup=False)
                    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                                           use_tqdm=False)
                    llm.engine.check_all_free()
                    results[f"degrees {prefill_degree} {decode_degree}"] = [o.outputs[0].token_ids for o in outputs]
                results["degrees stats"] = llm.stats()
        else:
            run_follower(config)

    if "elastic" in scenarios:
        import jax

        config = EngineConfig(args.checkpoint, instances=2, kv_pages=16, policy="esp",
                              policy_options={"growth_horizon": 2}, deterministic=True,
                              devices=jax.devices()[3:5], **common)
        if leader:
            with LLM(engine_config=config) as llm:
                for seed, max_tokens in ELASTIC_RUNS:
                    llm.set_policy("esp", policy_options={"growth_horizon": 2}, warmup=False)
                    prompts = mixed_prompts(llm.config.vocab_size, count=10, seed=seed, low=5, high=30)
                    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                    outputs = llm.generate(prompts, params, use_tqdm=False)
                    llm.engine.check_all_free()
                    stats = llm.stats()
                    results[f"elastic {seed}"] = {"prompts": prompts, "max_tokens": max_tokens,
                                                  "tokens": [o.outputs[0].token_ids for o in outputs],
                                                  "stats": {k: stats.get(k, 0) for k in ("preemptions", "scale_ups",
                                                                                  "migrations", "units_migrate")}}
        else:
            run_follower(config)

    if leader and args.out:
        with open(args.out, "w") as file:
            json.dump(results, file)
    if not leader:
        from loong_jax.distributed.launch import leave_cluster

        leave_cluster(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
