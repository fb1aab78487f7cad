"""Admission control (`admission=on`, every policy, either queue discipline): a waiting request that has
produced nothing and can no longer meet its deadline even if started now is rejected, not deferred until
the queue drains; off (the default) it waits in the late tiers as before."""

from collections import Counter

import pytest

from loong_jax.engine.state import EngineState
from loong_jax.scheduler.policy import make_policy
from loong_jax.scheduler.view import RequestView

from tests.scheduler.driver import drive
from tests.scheduler.helpers import instances, synthetic_cost, view
from tests.scheduler.test_policies import arrivals

NOW = 100.0


def state_with_a_hopeless_request(generated: int = 0):
    chat = RequestView("chat", 1, NOW - 0.5, 50, max_new_tokens=64)
    hopeless = RequestView("late", 0, NOW - 500.0, 2_000, num_generated=generated, max_new_tokens=64)  # 25x passed
    return view(instances([1000] * 4), (hopeless, chat), cost=synthetic_cost(max_dop=4), now=NOW)


@pytest.mark.parametrize("name, options", [("esp", {}), ("esp", {"queue": "fifo"}), ("replicas", {}),
                                           ("static-sp", {"queue": "deadline"}), ("chunked-prefill", {}),
                                           ("pd-disagg", {}), ("fixed", {"prefill_degree": 2})])
def test_admission_control_rejects_a_request_past_its_deadline(name, options):
    state = state_with_a_hopeless_request()
    assert "late" not in make_policy(name, **options).schedule(state).rejections  # off: deferred, not refused
    plan = make_policy(name, admission="on", **options).schedule(state)
    assert plan.rejections == ("late",)
    assert "late" not in {r for b in plan.prefills for r in b.request_ids}
    assert "chat" in {r for b in (*plan.prefills, *(d.fused_prefill for d in plan.decodes if d.fused_prefill))
                      for r in b.request_ids}


def test_a_request_that_already_streamed_tokens_is_never_refused():
    plan = make_policy("esp", admission="on").schedule(state_with_a_hopeless_request(generated=3))
    assert not plan.rejections


def test_admission_values_are_checked():
    assert make_policy("esp", admission=1).queue.admission and not make_policy("esp", admission="off").queue.admission
    with pytest.raises(ValueError, match="admission must be on or off, got 'yes'"):
        make_policy("replicas", admission="yes")


def test_under_overload_admission_control_bounds_the_queue_and_counts_rejections():
    cost = synthetic_cost(pages_per_instance=64)
    heavy = arrivals(11, count=80, rate=400.0, longest=1500)  # a burst: more than 4 instances serve in time
    outcomes = {}
    for admission in ("off", "on"):
        state = EngineState(4, 64, 16)
        drive(state, make_policy("esp", admission=admission), cost, heavy, check_every=50)
        state.allocator.assert_all_free()
        outcomes[admission] = Counter(r.finish_reason for r in state.requests.values())
    assert outcomes["off"]["rejected"] == 0 and outcomes["on"]["rejected"] > 0
    assert outcomes["on"]["finished"] + outcomes["on"]["rejected"] == 80
