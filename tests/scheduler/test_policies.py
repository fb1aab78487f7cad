"""Baseline policies on hand-made states, and every policy driven through whole workloads on one EngineState
(same KV capacity, same cost model): no deadlock, every page freed, every plan serialisable."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from loong_jax.engine.state import EngineState
from loong_jax.scheduler.plan import Plan
from loong_jax.scheduler.policy import Policy, build_policy, make_policy, policy_names
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
    # every policy under the other queue discipline
    ("esp", {"queue": "fifo"}), ("static-sp", {"degree": 2, "queue": "deadline"}), ("replicas", {"queue": "deadline"}),
    ("chunked-prefill", {"chunk_size": 256, "queue": "deadline"}), ("pd-disagg", {"queue": "deadline"}),
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


def test_each_policy_reads_its_own_degrees_and_options():
    """`build_policy` hands the CLI degrees to the policy class: no name or type checks outside the scheduler."""
    assert build_policy("static-sp", 8, 2).degree == 2
    assert build_policy("chunked-prefill", 8, 4, 4, {"chunk_size": 64}).degree == 4
    fixed = build_policy("fixed", 8, 4, 2, {"growth_horizon": 8})
    assert (fixed.prefill_degree, fixed.decode_degree, fixed.growth_horizon) == (4, 2, 8)
    assert build_policy("esp", 8, options={"slo_scale": 5.0}).slo_scale == 5.0
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        build_policy("best", 8)
    for name, degrees in (("esp", (2, None)), ("pd-disagg", (None, 2)), ("replicas", (1, None)),
                          ("static-sp", (2, 4)), ("chunked-prefill", (None, 2))):
        with pytest.raises(ValueError, match=f"apply to policy 'fixed'.*not '{name}'"):
            build_policy(name, 8, *degrees)
    with pytest.raises(ValueError, match="must divide"):
        build_policy("fixed", 8, 16)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):  # the class checks its own options
        build_policy("chunked-prefill", 8, options={"chunk_size": 0})


def test_each_policy_answers_its_token_limits_and_warmup_groups():
    pages, page_size = 10, 16
    one_instance = pages * page_size
    limits = {name: make_policy(name).request_token_limits(8, pages, page_size) for name in policy_names()}
    assert limits["esp"] is None and limits["pd-disagg"] is None  # elastic: the whole cluster
    assert limits["replicas"] == (one_instance, one_instance)
    assert limits["static-sp"] == limits["chunked-prefill"] == (8 * one_instance, 8 * one_instance)
    assert make_policy("static-sp", degree=2).request_token_limits(8, pages, page_size) == (2 * one_instance,) * 2
    # fixed: a prompt's KV stays on the smaller group, its peak on the decode group
    scale_down, scale_up = build_policy("fixed", 8, 4, 2), build_policy("fixed", 8, 2, 4)
    assert scale_down.request_token_limits(8, pages, page_size) == (2 * one_instance, 2 * one_instance)
    assert scale_up.request_token_limits(8, pages, page_size) == (2 * one_instance, 4 * one_instance)
    elastic = ([tuple(range(4))], [(0,), (1,), (2,), (3,)])
    for name in ("esp", "pd-disagg", "static-sp", "replicas", "chunked-prefill"):
        assert make_policy(name).warmup_groups(4) == elastic
        assert make_policy(name).late_requests == 0
    assert build_policy("fixed", 4, 4, 2).warmup_groups(4) == ([(0, 1, 2, 3)], [(0, 1), (2, 3)])


def test_no_policy_name_or_type_checks_outside_the_scheduler():
    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"isinstance\([^)]*Policy\b|FixedPolicy|policy\.name\s*(==|!=|in\b)|"
                         r"name\s*(==|in)\s*\(?\s*[\"'](fixed|static-sp|chunked-prefill|replicas|pd-disagg)[\"']")
    scheduler = root / "loong_jax" / "scheduler"
    offenders = [f"{path.relative_to(root)}:{number}"
                 for folder in ("loong_jax", "server", "models", "sharding")
                 for path in sorted((root / folder).rglob("*.py")) if scheduler not in path.parents
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders
