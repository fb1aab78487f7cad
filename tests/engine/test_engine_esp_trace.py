"""The `esp` policy on the real engine with 8 instances: a mix of long and short prompts on scarce KV pages
makes it prefill at several degrees, scale down after prefills, scale decodes up onto new masters and
migrate KV, and every greedy output is still the single-device reference's. The moves come from the
policy's own decisions (`benchmarks/esp_engine_trace.py`, whose run this is, in small).

The policy's cost model is the H200 projection (on it a wider prefill pays for long prompts); the tiny
model's own roofline makes every step cost its constant, and on it ESP never widens a prefill for speed."""

from __future__ import annotations

import pytest

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import TEST_BUCKETS
from tests.scripts import load_benchmark_script



@pytest.fixture(scope="module")
def trace_script():
    return load_benchmark_script("esp_engine_trace")


def test_esp_engine_run_shows_every_elastic_move(trace_script, checkpoint_dir, compile_cache_dir, reference):
    from loong_jax.entrypoints.llm import LLM

    script = trace_script
    llm = LLM(checkpoint_dir, page_size=script.PAGE_SIZE, kv_pages=script.KV_PAGES, policy="esp",
              cost_model=script.h200_policy_cost_model(script.KV_PAGES, script.PAGE_SIZE),
              policy_options={"growth_horizon": script.GROWTH_HORIZON}, buckets=TEST_BUCKETS, warmup=False,
              compilation_cache_dir=compile_cache_dir, progress=False, deterministic=True,
              async_scheduling=False)  # as the script: with early-released decode steps ESP migrates nothing here
    prompts, arrivals = script.two_wave_workload(llm.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=script.MAX_TOKENS, ignore_eos=True)
    with llm:
        trace = script.run_esp_trace(llm, prompts, params, arrivals)
    for prompt, output in zip(prompts, trace.outputs):
        assert output == reference(prompt, script.MAX_TOKENS, eos_token_ids=())[0]
    print("\n".join(trace.report()))
    assert len([d for d, n in trace.prefill_degrees.items() if n]) >= 2, trace.prefill_degrees
    for key in ("scale_downs", "scale_ups", "migrations", "units_migrate"):
        assert trace.counters[key] > 0, (key, trace.counters)
    assert {"scale-down", "scale-up", "migration"} <= set(trace.examples)
