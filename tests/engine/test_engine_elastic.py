"""Pages made scarce: the `esp` policy preempts (recompute), scales decode up onto new masters and migrates
KV between instances during one run, and the greedy tokens are still exactly the reference's. The run is
deterministic (units complete in dispatch order, logical clock), so each move happens on every run.
Also on this small cluster: the `chunked-prefill` policy (prompt chunks attending to their earlier chunks'
KV in the pools, riding in decode steps) matches the reference too, and requests that can never fit are
refused before anything is queued."""

from __future__ import annotations

import pytest

from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import PAGE_SIZE, TEST_BUCKETS, mixed_prompts, record_plans

SCARCE_PAGES = 16  # 64 token slots per instance, 128 in the cluster, for ~10 requests of up to ~54 tokens


@pytest.fixture(scope="module")
def scarce_llm(checkpoint_dir, compile_cache_dir):
    from loong_jax.entrypoints.llm import LLM

    # A small growth horizon admits optimistically, so decodes outgrow their masters (scale-up) and the
    # pages (preemption), and the queue makes consolidating a decode group worth a migration.
    llm = LLM(checkpoint_dir, instances=2, page_size=PAGE_SIZE, kv_pages=SCARCE_PAGES, policy="esp",
              policy_options={"growth_horizon": 2}, buckets=TEST_BUCKETS, warmup=False,
              compilation_cache_dir=compile_cache_dir, progress=False, deterministic=True)
    yield llm
    llm.close()


def run_workload(llm, reference, seed: int, max_tokens: int) -> dict:
    """One scarce-pages run, checked token for token; returns the engine's counters."""
    llm.set_policy("esp", policy_options={"growth_horizon": 2}, warmup=False)
    engine = llm.engine
    prompts = mixed_prompts(llm.config.vocab_size, count=10, seed=seed, low=5, high=30)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [llm.prepare(prompt, params) for prompt in prompts]
    results = {r.request_id: RequestOutput(r.request_id, None, list(r.prompt_token_ids), [], False) for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        for delta in engine.step():
            results[delta.request_id] = results[delta.request_id].merged(delta)
        engine.state.check_invariants()  # page accounting agrees with the requests after every event
    for prompt, request in zip(prompts, requests):
        tokens, _ = reference(prompt, max_tokens, eos_token_ids=())
        assert results[request.request_id].outputs[0].token_ids == tokens
        assert results[request.request_id].outputs[0].finish_reason == "length"
    engine.check_all_free()
    return engine.stats()


def test_preemption_scale_up_and_migration_keep_tokens_exact(scarce_llm, reference):
    # Two workloads, so that a change in the policy's cost/gain tests does not leave one move out.
    runs = [run_workload(scarce_llm, reference, seed, max_tokens) for seed, max_tokens in ((5, 24), (7, 32))]
    totals = {key: sum(run[key] for run in runs) for key in ("preemptions", "scale_ups", "migrations",
                                                              "units_migrate")}
    assert all(count > 0 for count in totals.values()), totals
    # Asynchronous scheduling was on: tokens fed on the device, and read on the host where a request moved.
    assert runs[-1]["pending_tokens_fed_on_device"] > 0 and runs[-1]["pending_tokens_read_on_host"] > 0, runs[-1]


def test_chunked_prefill_matches_reference(scarce_llm, reference):
    scarce_llm.set_policy("chunked-prefill", policy_options={"chunk_size": 16}, warmup=False)
    plans = record_plans(scarce_llm)
    prompts = mixed_prompts(scarce_llm.config.vocab_size, count=8, seed=2, low=5, high=30)
    # Every fourth request ends with the token its last chunk samples, inside a decode step.
    max_tokens = [1 if index % 4 == 3 else 8 for index in range(len(prompts))]
    outputs = scarce_llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens],
                                  use_tqdm=False)
    for prompt, n, output in zip(prompts, max_tokens, outputs):
        tokens, reason = reference(prompt, n)
        assert output.outputs[0].token_ids == tokens
        assert output.outputs[0].finish_reason == ("stop" if reason == "stop" else "length")
    fused = [d.fused_prefill for plan in plans for d in plan.decodes if d.fused_prefill is not None and d.request_ids]
    assert fused and any(start > 0 for batch in fused for start, _ in batch.chunks)
    scarce_llm.engine.check_all_free()


def test_requests_that_never_fit_are_refused_before_queueing(scarce_llm):
    fine = [5, 6, 7]
    too_big = list(range(4, 4 + 100))
    with pytest.raises(ValueError, match=f"at most {2 * SCARCE_PAGES * PAGE_SIZE} fit"):
        scarce_llm.generate([fine, too_big], SamplingParams(max_tokens=40), use_tqdm=False)
    with pytest.raises(ValueError, match="context"):
        scarce_llm.generate([fine, list(range(4, 4 + 256))], SamplingParams(max_tokens=1), use_tqdm=False)
    assert scarce_llm.engine.num_unfinished == 0  # the good prompt was not queued either
    scarce_llm.engine.check_all_free()
