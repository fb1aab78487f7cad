"""Two processes x 4 simulated CPU devices on loopback serve like one process with 8 devices.

`cluster_script.py` runs in two real processes joined by JAX's multi-controller runtime; process 0 drives
the engines (Python API), process 1 follows. Greedy tokens equal a single process with 8 devices (this
test process: the shared `LLM` of the engine tests) at prefill degrees 1, 2, 4 and 8 (8 spans both
processes) and with a decode group of 8 across them; with scarce pages on one instance per process, decodes
scale up onto the other process's instance and KV migrates between the processes, tokens equal to the
reference loop. Every page is free after each workload (checked in the leader), and both processes exit 0.
"""

from __future__ import annotations

import json

import pytest

from loong_jax.sampling.params import SamplingParams
from tests.distributed import cluster_script
from tests.distributed.cluster import free_port, start_processes, tail, wait_all

CLUSTER_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster_results(checkpoint_dir, compile_cache_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster_logs")
    out = logs / "results.json"
    port = free_port()
    processes = start_processes(
        ["tests.distributed.cluster_script", "--port", str(port), "--checkpoint", str(checkpoint_dir),
         "--cache", str(compile_cache_dir / "two_processes"), "--out", str(out)], 2, logs,
        per_process_args=lambda process_id: ["--process-id", str(process_id)])
    codes = wait_all(processes, CLUSTER_TIMEOUT_S)
    assert codes == [0, 0], tail(logs)
    return json.loads(out.read_text())


@pytest.mark.parametrize("prefill_degree,decode_degree", cluster_script.DEGREES)
def test_tokens_equal_one_process_with_eight_devices(cluster_results, shared_llm, prefill_degree, decode_degree):
    prompts = cluster_results["prompts"]
    shared_llm.set_policy("fixed", prefill_degree, decode_degree, warmup=False)
    outputs = shared_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cluster_script.MAX_TOKENS),
                                  use_tqdm=False)
    single_process = [output.outputs[0].token_ids for output in outputs]
    assert cluster_results[f"degrees {prefill_degree} {decode_degree}"] == single_process


def test_the_eight_way_groups_spanned_both_processes(cluster_results):
    counts = cluster_results["degrees stats"]
    assert counts["prefill_batches_by_degree"] == {"8": 1}  # the last engine policy's counters: (8, 8)
    assert counts["decode_batches_by_degree"].get("8", 0) >= cluster_script.MAX_TOKENS - 1


def test_scale_up_and_migration_across_processes_keep_tokens_exact(cluster_results, reference):
    totals = {"scale_ups": 0, "migrations": 0, "units_migrate": 0}
    for seed, _ in cluster_script.ELASTIC_RUNS:
        run = cluster_results[f"elastic {seed}"]
        for prompt, tokens in zip(run["prompts"], run["tokens"]):
            assert tokens == reference(prompt, run["max_tokens"], eos_token_ids=())[0]
        for key in totals:
            totals[key] += run["stats"][key]
    # instance 0 is on process 0, instance 1 on process 1: every scale-up and migration crossed them
    assert all(count > 0 for count in totals.values()), totals
