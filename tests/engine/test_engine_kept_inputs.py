"""Decode inputs kept between steps (`executor.decode_steps`) and group pools kept whole
(`executor.instance_pools`) change no output: greedy and seeded tokens, logprobs and n > 1 samples are the
same as with every decode step's inputs built from scratch, with asynchronous scheduling and without; and the kept path did run. (Every invalidation case on its own:
`tests/executor/test_decode_steps.py`; preemption, scale-up and migration against the reference loop:
`test_engine_elastic.py`, which runs with the kept inputs.)"""

from __future__ import annotations

import pytest

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import mixed_prompts

MAX_TOKENS = 9  # past two page boundaries (4 tokens a page)


def seeded_params(index: int) -> SamplingParams:
    """Seeded rows only, so that a batch that samples is kept too (an unseeded row draws a seed each step)."""
    kinds = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=index),
             SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=2),
             SamplingParams(temperature=0.7, seed=index, n=2, max_tokens=MAX_TOKENS, ignore_eos=True,
                            min_tokens=3)]
    return kinds[index % len(kinds)]


def run(llm, prompts, params, degrees, overlap):
    llm.set_policy("fixed", *degrees, warmup=False)
    llm.engine.core.async_scheduling = overlap
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_all_free()
    return [[(o.token_ids, o.logprobs) for o in output.outputs] for output in outputs]


# On groups of 2, the programs `test_engine_async.py` compiles (one-instance groups run kept inputs in every
# other engine test, against the synchronous loop or the reference).
@pytest.mark.parametrize("degrees, overlap", [((2, 2), True), ((2, 2), False)])
def test_kept_decode_inputs_change_no_output(shared_llm, degrees, overlap):
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=4, seed=41)
    params = [seeded_params(i) for i in range(len(prompts))]
    unit_inputs = shared_llm.executor.unit_inputs
    kept = unit_inputs.decode_steps
    unit_inputs.decode_steps = None  # every step built from scratch
    try:
        expected = run(shared_llm, prompts, params, degrees, overlap)
    finally:
        unit_inputs.decode_steps = kept
    advanced = kept.advanced
    assert run(shared_llm, prompts, params, degrees, overlap) == expected
    assert kept.advanced > advanced
