"""Baseline policies on hand-made states, and every policy driven through whole workloads on one EngineState
(same KV capacity, same cost model): no deadlock, every page freed, every plan serialisable."""

import json
import random
from collections import Counter

import pytest

from loong_jax.engine.state import EngineState
from loong_jax.scheduler.plan import Plan
from loong_jax.scheduler.policy import Policy, make_policy, policy_names
from loong_jax.scheduler.view import PREFILLING, RequestView

from tests.scheduler.driver import drive
from tests.scheduler.helpers import decoding, instances, synthetic_cost, view, waiting


def test_registry():
    assert set(policy_names()) >= {"esp", "static-sp", "replicas", "chunked-prefill", "pd-disagg"}
    for name in policy_names():
        policy = make_policy(name)
        assert isinstance(policy, Policy) and policy.name == name
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="power of two"):
        make_policy("static-sp", degree=3).schedule(view(instances([10] * 4)))


def test_static_sp_prefills_on_whole_group_and_decodes_on_whole_group():
    cost = synthetic_cost(max_dop=2)
    state = view(instances([100, 100, 90, 100]), waiting(1000), [decoding("d", 0, {2: 30}, 2)], cost=cost)
    plan = make_policy("static-sp", degree=2).schedule(state)
    (batch,) = plan.prefills  # the least loaded group with room: {0,1} (more free pages)
    assert batch.group == (0, 1) and batch.request_ids == ("w0",)
    assert {i for i, _ in batch.placement[0]} == {0, 1}  # spread over every member: no scale-down
    assert [(b.group, b.request_ids) for b in plan.decodes] == [((2, 3), ("d",))]  # the whole fixed group
    # Two queued prompts go to the two groups, one each (balanced), and prefill comes first.
    busy_plan = make_policy("static-sp", degree=2).schedule(
        view(instances([100, 100, 90, 100]), waiting(1000, 60), [decoding("d", 0, {2: 30}, 2)], cost=cost))
    assert sorted((b.group, b.request_ids) for b in busy_plan.prefills) == [((0, 1), ("w0",)), ((2, 3), ("w1",))]
    assert not busy_plan.decodes


def test_static_sp_gives_prefill_priority_and_rejects_what_a_group_cannot_hold():
    cost = synthetic_cost(max_dop=2)
    state = view(instances([100, 100], total=100), waiting(50, 4000), [decoding("d", 0, {0: 30}, 0)], cost=cost)
    plan = make_policy("static-sp", degree=2).schedule(state)
    assert [b.request_ids for b in plan.prefills] == [("w0",)] and not plan.decodes
    replicas = make_policy("replicas").schedule(state)
    assert replicas.rejections == ("w1",)  # 4,000 tokens > one instance of 1,600 slots


def test_replicas_use_single_instances():
    plan = make_policy("replicas").schedule(view(instances([100] * 4), waiting(100, 200, 300)))
    assert sorted(len(b.group) for b in plan.prefills) == [1, 1, 1]


def test_chunked_prefill_fuses_a_chunk_into_the_decode_step():
    cost = synthetic_cost(max_dop=2)
    decodes = [decoding(f"d{k}", k, {0: 20}, 0) for k in range(3)]
    partial = RequestView("p", 3, 3.0, 1000, kv={0: 256, 1: 256}, master=1, status=PREFILLING)
    state = view(instances([100, 100]), waiting(500), decodes, cost=cost, prefilling=(partial,))
    plan = make_policy("chunked-prefill", chunk_size=256).schedule(state)
    (step,) = plan.decodes
    assert step.request_ids == ("d0", "d1", "d2") and step.group == (0, 1)
    fused = step.fused_prefill
    assert fused.request_ids == ("p",) and fused.chunks == ((512, 253),)  # 256 budget - 3 decode tokens
    assert not plan.prefills


def test_chunked_prefill_without_decodes_runs_a_plain_prefill_of_chunks():
    plan = make_policy("chunked-prefill", chunk_size=300).schedule(view(instances([100, 100]), waiting(200, 500),
                                                                        cost=synthetic_cost(max_dop=2)))
    (batch,) = plan.prefills
    assert batch.chunks == ((0, 200), (0, 100)) and not plan.decodes


def test_pd_disagg_migrates_then_decodes_on_the_decode_side():
    cost = synthetic_cost(max_dop=4)
    done_prefill = decoding("fresh", 0, {1: 100}, 1)  # KV still on prefill instance 1
    on_decode_side = decoding("old", 1, {3: 40}, 3)
    state = view(instances([100, 100, 100, 50]), waiting(300), [done_prefill, on_decode_side], cost=cost)
    plan = make_policy("pd-disagg").schedule(state)
    assert [(m.request_id, m.src_instance, m.dst_instance, m.n_tokens) for m in plan.migrations] == [("fresh", 1, 2, 100)]
    assert [(b.group, b.request_ids) for b in plan.decodes] == [((3,), ("old",))]
    assert not plan.prefills  # the prefill group {0,1} is busy with the migration from 1


def arrivals(seed, count=24, rate=30.0, longest=2000, outputs=(20, 300)):
    rng = random.Random(seed)
    now, result = 0.0, []
    for k in range(count):
        now += rng.expovariate(rate)
        result.append((now, k, rng.choice([rng.randint(16, 200), rng.randint(200, longest)]), rng.randint(*outputs)))
    return result


@pytest.mark.parametrize("name, options", [
    ("esp", {}), ("static-sp", {}), ("static-sp", {"degree": 2}), ("replicas", {}),
    ("chunked-prefill", {"chunk_size": 256}), ("chunked-prefill", {"chunk_size": 512, "degree": 4}),
    ("pd-disagg", {}), ("pd-disagg", {"prefill_instances": 2, "prefill_degree": 1}),
])
@pytest.mark.parametrize("tell_max_tokens", [True, False])
def test_every_policy_serves_a_workload_without_deadlock(name, options, tell_max_tokens):
    cost = synthetic_cost(pages_per_instance=64)
    state = EngineState(8, 64, 16)
    policy = make_policy(name, **options)
    report = drive(state, policy, cost, arrivals(7), check_every=3, tell_max_tokens=tell_max_tokens)
    state.allocator.assert_all_free()
    reasons = Counter(r.finish_reason for r in state.requests.values())
    assert set(reasons) <= {"finished", "rejected"} and reasons["finished"] >= 12
    one_instance_groups = name == "replicas" or options.get("prefill_degree") == 1
    if not one_instance_groups:  # only a policy confined to single instances cannot hold the longest prompts
        assert reasons["rejected"] == 0
    for plan in report.plans[::25]:
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    units = [unit for _, unit in report.units]
    prefill_groups = {b.group for p in report.plans for b in p.prefills}
    decode_groups = {b.group for p in report.plans for b in p.decodes}
    if name == "replicas":
        assert {len(g) for g in prefill_groups | decode_groups} == {1}
    if name == "static-sp":
        degree = options.get("degree", 8)
        assert {len(g) for g in prefill_groups | decode_groups} == {degree}
    if name == "chunked-prefill":
        fused = [u.fused_prefill for u in units if getattr(u, "fused_prefill", None) is not None]
        assert fused and all(b.num_tokens <= options["chunk_size"] for b in fused)
        assert any(start > 0 for b in fused for start, _ in b.chunks)  # prompts really were split
    if name == "pd-disagg":
        prefill_pool = set(range(options.get("prefill_instances", 4)))
        assert state.counters["migrations"] > 0
        assert all(not prefill_pool & set(g) for g in decode_groups)
        assert all(set(g) <= prefill_pool for g in prefill_groups)


@pytest.mark.parametrize("name", ["esp", "static-sp", "replicas", "chunked-prefill", "pd-disagg"])
def test_a_request_filling_the_whole_cluster_never_deadlocks(name):
    # 2 instances x 10 pages x 16 slots = 320 slots; "big" peaks at 319 KV tokens: it fits only with the
    # cluster to itself, growth room or not. Policies whose groups are smaller reject it; none may hang.
    cost = synthetic_cost(pages_per_instance=10, max_dop=2)
    state = EngineState(2, 10, 16)
    drive(state, make_policy(name), cost, [(0.0, "big", 300, 20), (0.0, "small", 10, 5)])
    state.allocator.assert_all_free()
    reasons = {r.request_id: r.finish_reason for r in state.requests.values()}
    assert reasons["small"] == "finished"
    if name in ("esp", "static-sp"):
        assert reasons["big"] == "finished"
