"""The queue discipline as an option of every policy (`queue=fifo|deadline`, `esp.queue.QueueDiscipline`):
fifo stops at the first request that does not fit; deadline orders by latency deadline, passes over what
does not fit (backfilling) and reserves a group for the head. Bad option names and values are refused."""

import pytest

from loong_jax.scheduler.policy import build_policy, make_policy, policy_names

from tests.scheduler.helpers import decoding, instances, synthetic_cost, view, waiting


def prefilled(plan):
    return sorted((batch.group, batch.request_ids) for batch in plan.prefills)


def test_every_policy_takes_the_queue_option_with_unchanged_defaults():
    for name in policy_names():
        assert make_policy(name).queue.kind == ("deadline" if name == "esp" else "fifo")
        for kind in ("fifo", "deadline"):
            assert make_policy(name, queue=kind).queue.kind == kind
    assert build_policy("replicas", 8, options={"queue": "deadline"}).queue.backfills
    with pytest.raises(ValueError, match="queue must be one of fifo, deadline, got 'lifo'"):
        make_policy("static-sp", queue="lifo")
    with pytest.raises(ValueError, match="policy 'replicas' has no option 'queue_order'; its options: .*queue"):
        build_policy("replicas", 8, options={"queue_order": "fifo"})


def test_replicas_with_the_deadline_queue_backfill_past_the_head_and_reserve_its_instance():
    # The head (1,000 tokens: 67 pages with growth) fits one instance's pool but neither instance now.
    state = view(instances([40, 40], total=100), waiting(1000, 100), cost=synthetic_cost(max_dop=2))
    assert prefilled(make_policy("replicas").schedule(state)) == []  # fifo: everyone waits behind the head
    plan = make_policy("replicas", queue="deadline").schedule(state)
    assert prefilled(plan) == [((1,), ("w1",))]  # instance 0 is held for the head, 1 takes the short one


def test_static_sp_with_the_deadline_queue_serves_the_earliest_deadline_first():
    # Room for one of the two: the 20,000-token document came first, the 1,000-token prompt is due first.
    state = view(instances([640, 640]), waiting(20_000, 1000), cost=synthetic_cost(max_dop=2))
    assert prefilled(make_policy("static-sp").schedule(state)) == [((0, 1), ("w0",))]
    assert prefilled(make_policy("static-sp", queue="deadline").schedule(state)) == [((0, 1), ("w1",))]


@pytest.mark.parametrize("name, options", [("fixed", {"prefill_degree": 1, "decode_degree": 1}),
                                           ("pd-disagg", {"prefill_instances": 2, "prefill_degree": 1})])
def test_the_fixed_layouts_backfill_with_the_deadline_queue(name, options):
    state = view(instances([40] * 4, total=100), waiting(1000, 100), cost=synthetic_cost(max_dop=4))
    blocked = make_policy(name, **options).schedule(state)
    backfilled = make_policy(name, queue="deadline", **options).schedule(state)
    assert "w1" not in {r for _, ids in prefilled(blocked) for r in ids}
    assert [ids for _, ids in prefilled(backfilled)] == [("w1",)]


def test_esp_with_the_fifo_queue_stops_at_a_head_that_does_not_fit():
    state = view(instances([30, 30], total=100), waiting(1000, 100), [decoding("d", 5, {0: 20}, 0)],
                 cost=synthetic_cost(max_dop=2))
    assert "w1" in {r for _, ids in prefilled(make_policy("esp").schedule(state)) for r in ids}
    assert prefilled(make_policy("esp", queue="fifo").schedule(state)) == []
