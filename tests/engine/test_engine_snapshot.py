"""`Engine.snapshot()`: the engine's state at one instant as immutable values, what the server reads (queue,
KV pages per instance, DoP histograms, program cache, token limits, policy), built by plain reads."""

import dataclasses

import pytest

from loong_jax.engine.snapshot import EngineSnapshot, TokenLimits
from loong_jax.sampling.params import SamplingParams
from tests.engine_fixtures import KV_PAGES, PAGE_SIZE, mixed_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_snapshot_follows_the_queue_the_pages_and_the_degrees(shared_llm):
    llm = shared_llm
    llm.set_policy("fixed", 2, 1, warmup=False)  # a new engine: its DoP counts start at zero
    n = llm.topology.num_instances
    idle = llm.snapshot()
    assert idle.policy == "fixed" and idle.page_size == PAGE_SIZE and idle.num_instances == n
    assert idle.kv_pages_total == (KV_PAGES,) * n and idle.kv_pages_used == (0,) * n
    assert idle.kv_pages_free == idle.kv_pages_total
    # fixed 2 -> 1 keeps a prompt's KV on one instance: the policy's answer, capped by the cluster
    assert idle.token_limits == TokenLimits(KV_PAGES * PAGE_SIZE, KV_PAGES * PAGE_SIZE) == llm.engine.token_limits()
    assert (idle.waiting, idle.running, idle.queued_tokens, idle.oldest_waiting_seconds) == (0, 0, 0, 0.0)

    prompts = mixed_prompts(llm.config.vocab_size, count=5, high=20)
    for index, prompt in enumerate(prompts):
        llm.engine.add_request(llm.prepare(prompt, GREEDY, request_id=f"snap{index}"))
    queued = llm.snapshot()
    assert queued.waiting == 5 and queued.queued_tokens == sum(len(p) for p in prompts)
    assert queued.oldest_waiting_seconds >= 0.0 and queued.running == 0

    while llm.engine.has_unfinished():
        llm.engine.step()
    done = llm.snapshot()
    assert done.waiting == 0 and done.running == 0 and done.kv_pages_used == (0,) * n
    assert set(done.prefill_dop_counts) == {2} and set(done.decode_dop_counts) == {1}
    assert done.programs_ready > 0 and done.compiles >= 0 and done.late == 0
    assert queued.waiting == 5  # an earlier snapshot does not change with the engine
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.waiting = 1
    with pytest.raises(TypeError):
        done.prefill_dop_counts[2] = 0


def test_elastic_policy_limits_are_the_whole_cluster(shared_llm):
    shared_llm.set_policy("esp", warmup=False)
    capacity = shared_llm.topology.num_instances * KV_PAGES * PAGE_SIZE
    snapshot = shared_llm.snapshot()
    assert snapshot.policy == "esp" and snapshot.token_limits == (capacity, capacity)
    assert EngineSnapshot().num_instances == 0  # the empty snapshot a server shows before the engine loads
