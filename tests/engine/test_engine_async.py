"""Asynchronous scheduling (step n+1 planned while step n runs, its tokens fed on the device) changes no
output: greedy and seeded tokens, logprobs, stop tokens, stop strings, max_tokens, n > 1 and aborts give
exactly what the synchronous loop gives, at several degrees, and every page comes back. (Preemption,
scale-up and migration under asynchronous scheduling: `test_engine_elastic.py`.) Stops are placed where
the synchronous run shows they bite, so the asynchronous run has always planned the step after a stop
before it sees the stop."""

from __future__ import annotations

import dataclasses

from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import mixed_prompts

MAX_TOKENS = 7


def run(llm, prompts, params, degrees=(1, 1), policy="fixed", overlap=True):
    llm.set_policy(policy, *(degrees if policy == "fixed" else (None, None)), warmup=False)
    llm.engine.core.async_scheduling = overlap
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_all_free()
    return [[(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in output.outputs] for output in outputs]



def mixed_params(index: int) -> SamplingParams:
    """Greedy, seeded sampling with logprobs, n = 2, max_tokens 1. (A unit holding a request with penalties
    reads its token history, so it is never released early: the engine's sampling tests run through it.)"""
    kinds = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
             SamplingParams(temperature=0.8, top_p=0.9, seed=index, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=2),
             SamplingParams(temperature=0.7, seed=index, n=2, max_tokens=MAX_TOKENS, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)]
    return kinds[index % len(kinds)]


def test_async_steps_give_the_synchronous_outputs(shared_llm):
    # On groups of 2 (tokens fed across devices); one-instance groups: the stop and abort tests below.
    degrees = (2, 2)
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=8, seed=31)
    params = [mixed_params(i) for i in range(len(prompts))]
    expected = run(shared_llm, prompts, params, degrees, overlap=False)
    before = shared_llm.stats().get("pending_tokens_fed_on_device", 0)
    assert run(shared_llm, prompts, params, degrees) == expected
    stats = shared_llm.stats()
    assert stats["pending_tokens_fed_on_device"] > before  # the overlapped path did run
    assert stats["steps"] > 0 and stats["step_seconds_schedule"] > 0 and stats["step_seconds_wait"] > 0


def test_stops_bite_at_the_same_token_while_the_next_step_is_already_planned(shared_llm):
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=6, seed=32)
    free = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True) for _ in prompts]
    unstopped = run(shared_llm, prompts, free, overlap=False)
    stopped = []
    for index, ((tokens, text, _, _),) in enumerate(unstopped):
        at = 1 + index % 4  # a stop token, or the text up to it as a stop string, at output `at`
        if index % 2:
            stopped.append(dataclasses.replace(free[index], stop_token_ids=[tokens[at]]))
        else:
            stop = shared_llm.tokenizer.decode(tokens[at:at + 1])
            stopped.append(dataclasses.replace(free[index], stop=[stop]) if stop.strip() else free[index])
    expected = run(shared_llm, prompts, stopped, overlap=False)
    assert run(shared_llm, prompts, stopped) == expected
    shorter = sum(len(out[0][0]) < MAX_TOKENS for out in expected)
    assert shorter >= len(prompts) // 2  # the stops did end requests early


def test_an_abort_while_the_next_step_is_planned_frees_everything(shared_llm):
    prompts = mixed_prompts(shared_llm.config.vocab_size, count=4, seed=33)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = run(shared_llm, prompts, params, overlap=False)
    shared_llm.set_policy("fixed", 1, 1, warmup=False)
    engine = shared_llm.engine
    requests = [shared_llm.prepare(prompt, params) for prompt in prompts]
    for request in requests:
        engine.add_request(request)
    tokens = {request.request_id: [] for request in requests}
    reasons, steps = {}, 0
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.outputs[0].token_ids
            if delta.finished:
                reasons[delta.request_id] = delta.outputs[0].finish_reason
        engine.state.check_invariants()
        steps += 1
        if steps == 3:
            victim = requests[1].request_id
            shown = len(tokens[victim])
            assert engine.abort(victim)
    assert reasons[requests[1].request_id] == "abort" and len(tokens[requests[1].request_id]) == shown
    for index in (0, 2, 3):
        assert tokens[requests[index].request_id] == expected[index][0][0]
        assert reasons[requests[index].request_id] == "length"
    engine.check_all_free()
