"""ESP's elastic moves switched off one at a time (`scale_down=0`, `scale_up=0`, `migration=0`,
`max_prefill_degree=1`): each ablation changes the decision that move makes, and nothing else breaks;
a cluster wider than the degrees the cost model prices (`KeyError: 32` before) schedules only priced groups."""

from collections import Counter

import pytest

from loong_jax.engine.state import EngineState
from loong_jax.scheduler.policy import build_policy, make_policy

from tests.scheduler.driver import drive
from tests.scheduler.helpers import decoding, instances, synthetic_cost, view, waiting
from tests.scheduler.test_policies import arrivals


def kept_on(plan):
    return {rid: tuple(i for i, _ in segments) for b in plan.prefills for rid, segments in zip(b.request_ids, b.placement)}


def test_without_scale_down_a_prompt_keeps_its_kv_on_the_whole_prefill_group():
    state = view(instances([1000] * 8), waiting(30_000))
    elastic, static = make_policy("esp").schedule(state), make_policy("esp", scale_down=0).schedule(state)
    assert [b.group for b in elastic.prefills] == [b.group for b in static.prefills] == [tuple(range(8))]
    assert len(kept_on(elastic)["w0"]) == 2 and kept_on(static)["w0"] == tuple(range(8))


def test_without_scale_up_a_full_master_preempts_instead_of_moving():
    # "a" on 2: its last page is full and 2 has no free page; 3 has room.
    state = view(instances([5, 5, 0, 7, 5, 5, 5, 5]), (), [decoding("a", 1, {2: 64}, 2), decoding("b", 2, {2: 32}, 2)])
    elastic = make_policy("esp").schedule(state)
    assert not elastic.preemptions and {m for b in elastic.decodes for m in b.masters} == {3}
    stuck = make_policy("esp", scale_up=0).schedule(state)
    assert [p.request_id for p in stuck.preemptions] == ["b"]  # the newest on the master makes room
    assert [(b.group, b.masters) for b in stuck.decodes] == [((2,), (2,))]


def test_without_migration_no_decode_group_is_consolidated():
    decodes = [decoding("a", 100, {6: 8000, 7: 100}, 6, max_new_tokens=4000),
               decoding("b", 101, {7: 300}, 7, max_new_tokens=4000)]
    state = view(instances([0] * 6 + [400, 900], busy=range(6), busy_for=30), waiting(*[100] * 10), decodes)
    assert make_policy("esp", max_lent_groups=0).schedule(state).migrations
    assert not make_policy("esp", max_lent_groups=0, migration=0).schedule(state).migrations


def test_max_prefill_degree_one_prefills_on_single_instances_and_rejects_what_one_cannot_hold():
    state = view(instances([1000] * 8), waiting(30_000, 12_000))
    assert max(len(b.group) for b in make_policy("esp").schedule(state).prefills) > 1
    narrow = make_policy("esp", max_prefill_degree=1).schedule(state)
    assert narrow.rejections == ("w0",)  # 30,000 tokens > one instance's 16,000 slots
    assert [(len(b.group), b.request_ids) for b in narrow.prefills] == [(1, ("w1",))]
    assert make_policy("esp", max_prefill_degree=2).request_token_limits(8, 1000, 16) == (32_000, 128_000)


def test_ablation_options_are_checked():
    with pytest.raises(ValueError, match="scale_up must be 0 or 1"):
        make_policy("esp", scale_up=2)
    with pytest.raises(ValueError, match="max_prefill_degree must be a power of two"):
        build_policy("esp", 8, options={"max_prefill_degree": 3})


@pytest.mark.parametrize("options", [{"scale_down": 0}, {"scale_up": 0}, {"migration": 0}, {"max_prefill_degree": 1}])
def test_every_ablation_serves_a_workload_without_deadlock(options):
    cost = synthetic_cost(pages_per_instance=64)
    state = EngineState(8, 64, 16)
    drive(state, make_policy("esp", **options), cost, arrivals(7), check_every=3, tell_max_tokens=False)
    state.allocator.assert_all_free()
    reasons = Counter(r.finish_reason for r in state.requests.values())
    assert set(reasons) <= {"finished", "rejected"} and reasons["finished"] >= 12


def test_a_cluster_wider_than_the_cost_model_uses_only_priced_degrees():
    # 32 instances, a model of degrees 1-8: prefill and decode groups stay within 8 instances.
    cost = synthetic_cost(pages_per_instance=64, max_dop=8)
    state = EngineState(32, 64, 16)
    report = drive(state, make_policy("esp"), cost, arrivals(3, count=20, longest=6000), check_every=20,
                   tell_max_tokens=False)
    state.allocator.assert_all_free()
    widths = {len(b.group) for plan in report.plans for b in (*plan.prefills, *plan.decodes)}
    assert widths and max(widths) <= 8
    assert Counter(r.finish_reason for r in state.requests.values())["finished"] >= 15
