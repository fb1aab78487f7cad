"""Seeded sampling is reproducible whatever else shares the batch and whatever the degrees: a request's
random stream depends only on (seed, sample index, step). Logprobs come back with every token."""

from __future__ import annotations

import math

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import mixed_prompts

MAX_TOKENS = 8


def seeded(seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=seed, max_tokens=MAX_TOKENS,
                          ignore_eos=True, logprobs=2, n=n)


def run(llm, prompts, params, prefill_degree, decode_degree):
    llm.set_policy("fixed", prefill_degree, decode_degree, warmup=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_all_free()
    return outputs


def test_seeded_sampling_ignores_batch_and_degree(shared_llm):
    vocab = shared_llm.config.vocab_size
    probes = mixed_prompts(vocab, count=4, seed=5)
    fillers = mixed_prompts(vocab, count=8, seed=6)
    # Run 1: the probes among fillers, one instance for everything.
    first = run(shared_llm, fillers[:4] + probes + fillers[4:],
                [seeded(100 + i) for i in range(4)] + [seeded(10 + i) for i in range(4)] +
                [seeded(200 + i) for i in range(4)], 1, 1)[4:8]
    # Run 2: the probes alone, in reverse order, on a ring of 2 instances prefilling and decoding.
    second = run(shared_llm, probes[::-1], [seeded(10 + i) for i in range(4)][::-1], 2, 2)[::-1]
    for a, b in zip(first, second):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    distinct = {tuple(out.outputs[0].token_ids) for out in first}
    assert len(distinct) == len(first)  # different seeds draw different tokens
    for output in first:
        completion = output.outputs[0]
        assert len(completion.logprobs) == MAX_TOKENS
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert entry.token_id == token and entry.logprob <= 0.0 and entry.rank >= 1
            (best_id, best), (_, second) = entry.top
            assert best >= second and entry.logprob <= best + 1e-6
            assert (entry.rank == 1) == (best_id == token) or math.isclose(entry.logprob, best, abs_tol=1e-6)
            assert sum(math.exp(lp) for _, lp in entry.top) <= 1.0 + 1e-5


def test_n_samples_are_independent_streams(shared_llm):
    prompt = mixed_prompts(shared_llm.config.vocab_size, count=1, seed=8)[0]
    two = run(shared_llm, [prompt], seeded(42, n=2), 1, 1)[0]
    again = run(shared_llm, [prompt], seeded(42, n=2), 2, 2)[0]
    assert [o.index for o in two.outputs] == [0, 1]
    assert two.outputs[0].token_ids != two.outputs[1].token_ids
    assert [o.token_ids for o in two.outputs] == [o.token_ids for o in again.outputs]
