"""EngineState: lifecycle through plans and results, validation of bad plans, preemption, abort, migration."""

import pytest

from loong_jax.engine.state import EngineState, PlanError
from loong_jax.executor.protocol import UnitResult
from loong_jax.scheduler.plan import DecodeBatch, Migration, Plan, Preemption, PrefillBatch


def prefill(group, request_id, length, segments, start=0):
    return PrefillBatch(tuple(group), (request_id,), ((start, length),), (tuple(segments),))


def run(state, plan, tokens=None, finished=(), now=1.0):
    units = state.on_dispatched(plan, now=now)
    state.check_invariants()
    done = []
    for unit in units:
        new = {} if tokens is None else {r: tokens for r in unit.request_ids}
        if isinstance(unit, DecodeBatch) and unit.fused_prefill is not None and tokens is not None:
            new.update({r: tokens for r in unit.fused_prefill.request_ids})
        done += state.apply(UnitResult(unit, new, frozenset(finished), now))
    state.check_invariants()
    return done


def test_too_large_request_is_rejected_at_the_edge():
    state = EngineState(2, 4, 8)  # 64 tokens in the whole cluster
    with pytest.raises(ValueError, match="whole cluster holds 64 tokens"):
        state.add_request("big", 60, max_new_tokens=10)
    state.add_request("fits", 60, max_new_tokens=5)  # KV peaks at 64
    with pytest.raises(ValueError, match="already in use"):
        state.add_request("fits", 3)


def test_prefill_decode_finish_lifecycle_frees_pages():
    state = EngineState(2, 8, 4)
    state.add_request("a", 10, max_new_tokens=3, arrival=0.5)
    batch = prefill((0, 1), "a", 10, [(0, 8), (1, 2)])
    run(state, Plan(prefills=(batch,)), tokens=11)
    request = state.requests["a"]
    assert request.status == "decoding" and request.kv == {0: 8, 1: 2} and request.master == 1
    assert request.first_token_time == 1.0 and request.generated == [11]
    assert state.counters["scale_downs"] == 0
    run(state, Plan(decodes=(DecodeBatch((0, 1), ("a",), (1,)),)), tokens=12)
    assert request.kv == {0: 8, 1: 3} and request.num_generated == 2
    done = run(state, Plan(decodes=(DecodeBatch((0, 1), ("a",), (0,)),)), tokens=13, finished={"a"})
    assert [r.request_id for r in done] == ["a"] and request.finish_reason == "finished"
    assert state.counters["scale_ups"] == 0  # 0 already held KV of "a"
    state.allocator.assert_all_free()
    assert not state.has_unfinished()


def test_scale_down_and_scale_up_are_counted():
    state = EngineState(4, 8, 4)
    state.add_request("a", 6, max_new_tokens=8)
    run(state, Plan(prefills=(prefill((0, 1, 2, 3), "a", 6, [(0, 6)]),)), tokens=1)
    assert state.counters["scale_downs"] == 1
    run(state, Plan(decodes=(DecodeBatch((0, 1), ("a",), (1,)),)), tokens=2)
    assert state.counters["scale_ups"] == 1 and state.requests["a"].kv == {0: 6, 1: 1}


def test_chunked_prefill_continues_where_it_stopped():
    state = EngineState(1, 16, 4)
    state.add_request("a", 10)
    run(state, Plan(prefills=(prefill((0,), "a", 4, [(0, 4)]),)))
    assert state.requests["a"].status == "prefilling" and state.requests["a"].num_generated == 0
    with pytest.raises(PlanError, match="starts at 0 but 4"):
        state.on_dispatched(Plan(prefills=(prefill((0,), "a", 6, [(0, 6)]),)))
    run(state, Plan(prefills=(prefill((0,), "a", 6, [(0, 6)], start=4),)), tokens=5)
    assert state.requests["a"].status == "decoding" and state.allocator.positions("a", 0) == list(range(10))


@pytest.mark.parametrize("bad_plan, message", [
    (lambda: Plan(prefills=(prefill((0,), "a", 8, [(0, 8)]), prefill((0,), "b", 4, [(0, 4)]))), "two units"),
    (lambda: Plan(prefills=(prefill((0,), "a", 8, [(0, 8)]), prefill((1,), "a", 8, [(1, 8)]))), "twice"),
    (lambda: Plan(prefills=(prefill((0,), "a", 9, [(0, 9)]),)), "runs to 9"),
    (lambda: Plan(prefills=(PrefillBatch((0,), ("a", "b"), ((0, 8), (0, 4)), (((0, 8),), ((0, 4),))),)), None),
    (lambda: Plan(prefills=(prefill((1,), "zz", 4, [(1, 4)]),)), "unknown request"),
    (lambda: Plan(decodes=(DecodeBatch((0,), ("a",), (0,)),)), "is waiting"),
    (lambda: Plan(prefills=(prefill((5,), "a", 8, [(5, 8)]),)), "does not exist"),
])
def test_invalid_plans_are_refused_without_side_effects(bad_plan, message):
    state = EngineState(2, 2, 4)  # 8 tokens per instance
    state.add_request("a", 8)
    state.add_request("b", 4)
    if message is None:  # 12 tokens on an instance of 8 slots
        message = "needs 3 pages, 2 available"
    with pytest.raises(PlanError, match=message):
        state.on_dispatched(bad_plan())
    state.check_invariants()
    assert [r.request_id for r in state.waiting] == ["a", "b"] and state.allocator.total_pages_free == 4


def test_busy_instances_and_decode_group_must_cover_kv():
    state = EngineState(2, 8, 4)
    for rid in ("a", "b"):
        state.add_request(rid, 4)
    run(state, Plan(prefills=(prefill((0, 1), "a", 4, [(0, 2), (1, 2)]),)), tokens=1)
    with pytest.raises(PlanError, match="not inside group"):
        state.on_dispatched(Plan(decodes=(DecodeBatch((0,), ("a",), (0,)),)))
    state.on_dispatched(Plan(prefills=(prefill((1,), "b", 4, [(1, 4)]),)))
    with pytest.raises(PlanError, match="busy"):
        state.on_dispatched(Plan(decodes=(DecodeBatch((0, 1), ("a",), (0,)),)))


def test_preemption_recomputes_with_generated_tokens_and_keeps_fifo_place():
    state = EngineState(1, 16, 4)
    for rid in ("a", "b", "c"):
        state.add_request(rid, 5)
    run(state, Plan(prefills=(prefill((0,), "a", 5, [(0, 5)]),)), tokens=1)
    run(state, Plan(decodes=(DecodeBatch((0,), ("a",), (0,)),)), tokens=2)
    run(state, Plan(preemptions=(Preemption("a"),)))
    request = state.requests["a"]
    assert request.status == "waiting" and request.kv == {} and request.generated == [1, 2]
    assert request.prefill_target == 7 and request.num_preemptions == 1
    assert [r.request_id for r in state.waiting] == ["a", "b", "c"]  # back in arrival order
    run(state, Plan(prefills=(prefill((0,), "a", 7, [(0, 7)]),)), tokens=3)
    assert request.status == "decoding" and request.num_computed == 7 and request.generated == [1, 2, 3]


def test_abort_waiting_idle_and_in_flight():
    state = EngineState(1, 16, 4)
    for rid in ("a", "b", "c"):
        state.add_request(rid, 4)
    assert state.abort("a") and state.requests["a"].finish_reason == "abort"
    run(state, Plan(prefills=(prefill((0,), "b", 4, [(0, 4)]),)), tokens=1)
    assert state.abort("b") and state.allocator.tokens_total("b") == 0  # idle: freed at once
    state.on_dispatched(Plan(prefills=(prefill((0,), "c", 4, [(0, 4)]),)))
    assert state.abort("c") and state.allocator.tokens_total("c") == 4  # in flight: freed when it returns
    done = state.apply(UnitResult(state.in_flight_units()[0], {"c": 9}, frozenset(), 2.0))
    assert [r.request_id for r in done] == ["c"] and state.requests["c"].generated == []
    state.allocator.assert_all_free()
    assert not state.abort("c")


def test_migration_moves_whole_share_and_holds_source_until_done():
    state = EngineState(2, 8, 4)
    state.add_request("a", 9)
    run(state, Plan(prefills=(prefill((0,), "a", 9, [(0, 9)]),)), tokens=1)
    with pytest.raises(PlanError, match="moves a whole share"):
        state.on_dispatched(Plan(migrations=(Migration("a", 0, 1, 4),)))
    plan = Plan(migrations=(Migration("a", 0, 1, 9),))
    units = state.on_dispatched(plan)
    assert state.requests["a"].kv == {1: 9} and state.requests["a"].master == 1
    assert state.allocator.pages_free(0) == 5  # source pages held while the move runs
    assert state.is_busy(0) and state.is_busy(1)
    ticket, = state.step_inputs(plan, {}).migrations[units[0]]
    assert ticket.src_pages == (0, 1, 2)
    state.apply(UnitResult(units[0], {}, frozenset(), 1.0))
    assert state.allocator.pages_free(0) == 8 and state.counters["migrations"] == 1
    state.check_invariants()
