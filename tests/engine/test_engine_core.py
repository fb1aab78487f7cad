"""EngineCore: the one plan -> dispatch -> wait -> apply loop, driven here over the simulator's executor (the
serving engine, the simulator and the profiler drive it too), and what travels down with a plan."""

import pytest

from loong_jax.engine.core import EngineCore, SchedulerStalled
from loong_jax.engine.state import EngineState
from loong_jax.executor.protocol import UnitResult
from loong_jax.sampling.batch import SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch, Migration, Plan, PrefillBatch
from loong_jax.simulator.sim_executor import SimExecutor
from tests.simulator.test_sim_executor import OnePerInstance, cost_model


class NothingPolicy:
    name = "nothing"

    def schedule(self, view):
        return Plan()


def test_the_core_runs_a_workload_to_the_end_over_any_executor():
    state = EngineState(2, 400, 16)
    executor = SimExecutor(cost_model(), state, {0: 3, 1: 2, 2: 1})
    core = EngineCore(state, OnePerInstance(), cost_model(), executor, clock=lambda: executor.now,
                      compile_aware=False)
    for request_id, length in enumerate((100, 30, 10)):
        state.add_request(request_id, length, 3)
    finished = []
    while state.has_unfinished():
        plan = core.schedule()
        core.dispatch(plan)
        core.check_progress(plan)
        for result in core.wait():
            finished += [request.request_id for request in core.apply(result)]
    assert sorted(finished) == [0, 1, 2]
    assert core.dops.prefill == {1: 3} and sum(core.dops.decode.values()) >= 2
    state.allocator.assert_all_free()


def test_a_policy_that_plans_nothing_while_requests_wait_is_reported():
    state = EngineState(1, 400, 16)
    executor = SimExecutor(cost_model(), state, {0: 1})
    core = EngineCore(state, NothingPolicy(), cost_model(), executor, compile_aware=False)
    state.add_request(0, 10, 1)
    plan = core.schedule()
    core.dispatch(plan)
    with pytest.raises(SchedulerStalled, match="'nothing' planned nothing while 1 requests wait"):
        core.check_progress(plan)


def test_step_inputs_carry_tokens_page_tables_and_migration_tickets():
    """Everything the JAX executor reads of a step comes down with the plan: no call back into the engine."""
    state = EngineState(2, 8, 4)
    state.add_request("a", 6, 4)
    prefill = PrefillBatch((0, 1), ("a",), ((0, 6),), (((0, 4), (1, 2)),))
    row = SamplingRow(SamplingParams(temperature=0.0), (5, 6, 7, 8, 9, 10), [])
    plan = Plan(prefills=(prefill,))
    state.on_dispatched(plan)
    inputs = state.step_inputs(plan, {"a": row})
    request = inputs.requests["a"]
    assert request.token_ids == [5, 6, 7, 8, 9, 10] and request.context_len == 6
    assert request.kv_tokens == {0: 4, 1: 2} and len(request.page_tables[0]) == 1
    state.apply(UnitResult(prefill, {"a": 11}))
    move = Plan(migrations=(Migration("a", 1, 0, 2),))
    (unit,) = state.on_dispatched(move)
    (ticket,) = state.step_inputs(move, {}).migrations[unit]
    assert (ticket.src_instance, ticket.dst_instance, ticket.n_tokens) == (1, 0, 2)
    assert ticket.dst_first_slot == 4  # appended after the 4 tokens the destination holds


def test_decode_batches_name_every_request_they_run_fused_prefill_included():
    fused = PrefillBatch((0,), ("p",), ((0, 4),), (((0, 4),),))
    batch = DecodeBatch((0,), ("d",), (0,), fused_prefill=fused)
    assert batch.all_request_ids == ("d", "p") and fused.all_request_ids == ("p",)
