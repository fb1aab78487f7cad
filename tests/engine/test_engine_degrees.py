"""Greedy tokens of the engine equal the single-device reference loop (`models.generate`), token for
token, for every prefill degree x decode degree of the `fixed` policy and for the elastic `esp` policy,
with 16 concurrent requests of mixed lengths on 8 simulated devices. After every workload every page is
free again."""

from __future__ import annotations

import pytest

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import mixed_prompts, record_plans

MAX_TOKENS = 8
DEGREES = [(p, d) for p in (1, 2, 4, 8) for d in (1, 2, 4)]


def check_against_reference(llm, reference, prompts, outputs):
    for prompt, output in zip(prompts, outputs):
        tokens, reason = reference(prompt, MAX_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == tokens, f"prompt of {len(prompt)} tokens"
        assert completion.finish_reason == ("stop" if reason == "stop" else "length")
        assert output.finished and output.prompt_token_ids == prompt
    llm.engine.check_all_free()


@pytest.mark.parametrize("prefill_degree,decode_degree", DEGREES)
def test_fixed_degrees_match_reference(shared_llm, reference, prefill_degree, decode_degree):
    shared_llm.set_policy("fixed", prefill_degree, decode_degree, warmup=False)
    plans = record_plans(shared_llm)
    prompts = mixed_prompts(shared_llm.config.vocab_size)
    outputs = shared_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    check_against_reference(shared_llm, reference, prompts, outputs)
    prefills = [batch for plan in plans for batch in plan.prefills]
    decodes = [batch for plan in plans for batch in plan.decodes]
    assert prefills and all(len(batch.group) == prefill_degree for batch in prefills)
    assert len(decodes) >= MAX_TOKENS - 1 and all(len(batch.group) == decode_degree for batch in decodes)
    for batch in prefills:  # each prompt's KV stays inside one decode group (scale-down when p > d)
        for segments in batch.placement:
            keepers = {instance for instance, _ in segments}
            assert len({instance // decode_degree for instance in keepers}) == 1
            assert len(keepers) <= min(prefill_degree, decode_degree)


def test_esp_policy_matches_reference(shared_llm, reference):
    shared_llm.set_policy("esp", warmup=False)
    prompts = mixed_prompts(shared_llm.config.vocab_size, seed=1)
    outputs = shared_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    check_against_reference(shared_llm, reference, prompts, outputs)

