"""SimExecutor and the simulation loop, with a minimal hand-written policy whose timings are known exactly."""

import math

import numpy as np
import pytest

from loong_jax.engine.state import EngineState
from loong_jax.scheduler.cost import estimates
from loong_jax.scheduler.cost.model import CostModel, DecodeCoefficients, PrefillCoefficients
from loong_jax.scheduler.plan import DecodeBatch, Migration, MigrationBatch, Plan, PrefillBatch
from loong_jax.simulator.run import SchedulerStalled, search_max_rate, simulate
from loong_jax.simulator.sim_executor import SimExecutor
from loong_jax.simulator.workloads import RequestSpec

PREFILL = {1: PrefillCoefficients(0.010, 1e-4, 1e-8), 2: PrefillCoefficients(0.012, 0.5e-4, 0.5e-8)}
DECODE = {1: DecodeCoefficients(0.005, 1e-4, 1e-6), 2: DecodeCoefficients(0.006, 0.5e-4, 0.5e-6)}


def cost_model() -> CostModel:
    return CostModel(tp=1, prefill=PREFILL, decode=DECODE, migration_seconds_per_byte=1e-9, migration_latency_s=1e-3,
                     kv_bytes_per_token=1000, pages_per_instance=400, page_size=16)


class OnePerInstance:
    """Test policy: a waiting request prefills alone on the lowest idle instance; decodes stay on that instance."""

    name = "one-per-instance"

    def schedule(self, view):
        idle = set(view.idle_instances)
        decodes = []
        by_instance: dict[int, list] = {}
        for request in view.decoding:
            (instance,) = request.kv
            if not request.in_flight and instance in idle:
                by_instance.setdefault(instance, []).append(request.request_id)
        for instance, request_ids in sorted(by_instance.items()):
            decodes.append(DecodeBatch((instance,), tuple(request_ids), (instance,) * len(request_ids)))
            idle.discard(instance)
        prefills = []
        for request in view.waiting:
            if not idle:
                break
            instance = min(idle)
            idle.discard(instance)
            length = request.prefill_target
            prefills.append(PrefillBatch((instance,), (request.request_id,), ((0, length),), (((instance, length),),)))
        return Plan(prefills=tuple(prefills), decodes=tuple(decodes))


class Idle:
    name = "idle"

    def schedule(self, view):
        return Plan()


def alone_latency(model: CostModel, input_len: int, output_len: int) -> tuple[float, float]:
    ttft = model.prefill_time(1, [input_len])
    return ttft, ttft + sum(model.decode_time(1, 1, input_len + k) for k in range(1, output_len))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_request_gets_exactly_its_cost_model_time(async_scheduling):
    model = cost_model()
    request = RequestSpec(0, arrival_time=0.5, input_len=300, output_len=6)
    point = simulate([request], OnePerInstance(), model, 1, request_rate=1.0, check_invariants=True,
                     async_scheduling=async_scheduling)  # (steps released early queue back to back)
    ttft, e2e = alone_latency(model, 300, 6)
    assert point.complete and point.metrics.finished == 1
    assert point.metrics.mean_normalized_input_latency == pytest.approx(ttft / 300)
    assert point.metrics.mean_normalized_latency == pytest.approx(e2e / 6)
    assert point.metrics.mean_output_latency == pytest.approx((e2e - ttft) / 5)
    assert point.virtual_seconds == pytest.approx(0.5 + e2e)
    assert point.units == {"prefill": 1, "decode": 5}
    assert point.prefill_dops == {1: 1}


def test_disjoint_instances_run_side_by_side_and_arrivals_wait_for_a_free_instance():
    model = cost_model()
    requests = [RequestSpec(0, 0.0, 1000, 3), RequestSpec(1, 0.0, 500, 3), RequestSpec(2, 0.001, 200, 2)]
    point = simulate(requests, OnePerInstance(), model, 2, request_rate=1.0, check_invariants=True)
    # Requests 0 and 1 prefill at once on instances 0 and 1. Request 2 arrives at 1 ms and waits: each instance
    # decodes its own request first; instance 1 finishes request 1 first, then prefills and decodes request 2.
    done0 = model.prefill_time(1, [1000]) + model.decode_time(1, 1, 1001) + model.decode_time(1, 1, 1002)
    done1 = model.prefill_time(1, [500]) + model.decode_time(1, 1, 501) + model.decode_time(1, 1, 502)
    done2 = done1 + model.prefill_time(1, [200]) + model.decode_time(1, 1, 201)
    expected = [done0 / 3, done1 / 3, (done2 - 0.001) / 2]
    assert point.metrics.finished == 3
    assert point.metrics.mean_normalized_latency == pytest.approx(sum(expected) / 3)
    assert point.virtual_seconds == pytest.approx(max(done0, done2))
    busy = sum(model.prefill_time(1, [n]) for n in (1000, 500, 200)) + (done0 - model.prefill_time(1, [1000])) + (
        done1 - model.prefill_time(1, [500])) + model.decode_time(1, 1, 201)
    assert point.utilization == pytest.approx(busy / (2 * max(done0, done2)))


@pytest.mark.parametrize("policy", ["esp", "replicas"])
def test_asynchronous_steps_run_one_after_another_on_an_instance_and_free_every_page(policy):
    """Steps planned while the last ones run (as the engine serves): every request finishes, every page is
    free, no instance is busy for longer than the run, and no request beats its latency alone."""
    from loong_jax.scheduler.policy import PolicySpec
    from loong_jax.simulator.metrics import isolated_latencies

    model = CostModel.load_json(None, tp=1)
    rng = np.random.default_rng(1)  # short and long prompts (up to several instances' KV), short outputs
    requests = [RequestSpec(i, 0.05 * i, int(rng.choice([300, 3_000, 60_000, 400_000])), int(rng.integers(2, 24)))
                for i in range(24)]
    point = simulate(requests, PolicySpec.parse(policy), model, 8, request_rate=20.0, check_invariants=True,
                     async_scheduling=True)
    assert point.complete and point.metrics.finished + point.metrics.rejected == len(requests)
    assert point.utilization <= 1.0 + 1e-9
    alone = isolated_latencies(requests, model, 8)
    for record, isolated in zip(point.records, alone):
        if record.finished:
            assert record.first_token_time <= record.finish_time
            assert record.e2e_latency >= isolated * (1 - 1e-9), record


def test_asynchronous_steps_need_the_output_lengths():
    with pytest.raises(ValueError, match="needs the output lengths revealed"):
        simulate([RequestSpec(0, 0.0, 10, 2)], OnePerInstance(), cost_model(), 1, request_rate=1.0,
                 reveal_output_lengths=False, async_scheduling=True)


def test_unit_times():
    model = cost_model()
    state = EngineState(2, 400, 16)
    for request_id, prompt in ((0, 100), (1, 50)):
        state.add_request(request_id, prompt, 10)
    executor = SimExecutor(model, state, {0: 10, 1: 10})
    # A chunk (start 64, length 36) attends to all 100 tokens: quadratic term (100² − 64²).
    chunk = PrefillBatch((0, 1), (0,), ((64, 36),), (((0, 36),),))
    chunk_seconds = 0.012 + 0.5e-4 * 36 + 0.5e-8 * (100**2 - 64**2)
    assert executor.unit_seconds(chunk) == pytest.approx(chunk_seconds)
    whole = PrefillBatch((0,), (0, 1), ((0, 100), (0, 50)), (((0, 100),), ((0, 50),)))
    assert executor.unit_seconds(whole) == pytest.approx(model.prefill_time(1, [100, 50]))
    # Requests 0 and 1 have context 100 and 50 (nothing generated yet).
    decode = DecodeBatch((0, 1), (0, 1), (0, 1))
    assert executor.unit_seconds(decode) == pytest.approx(model.decode_time(2, 2, 150))
    fused = DecodeBatch((0, 1), (0, 1), (0, 1), fused_prefill=chunk)
    expected = model.decode_time(2, 2, 150) + chunk_seconds - min(0.012, 0.006)
    assert executor.unit_seconds(fused) == pytest.approx(expected)
    move = MigrationBatch(0, 1, (Migration(0, 0, 1, 100), Migration(1, 0, 1, 28)))
    assert executor.unit_seconds(move) == pytest.approx(1e-3 + 1e-9 * 128 * 1000)
    # One definition: the policies' estimate of every unit is the simulator's duration.
    context_of = lambda request_id: state.requests[request_id].context_len
    for unit in (chunk, whole, decode, fused, move, DecodeBatch((0, 1), (), (), fused_prefill=chunk)):
        assert estimates.unit_seconds(model, unit, context_of) == executor.unit_seconds(unit)
    # A fused step with no decode requests is its prefill (the old estimate added a_d − A_d to it).
    assert executor.unit_seconds(DecodeBatch((0, 1), (), (), fused_prefill=chunk)) == pytest.approx(chunk_seconds)


def test_wait_next_returns_the_earliest_units_and_moves_the_clock():
    model = cost_model()
    state = EngineState(2, 400, 16)
    state.add_request(0, 1000, 2)
    state.add_request(1, 10, 1)
    plan = Plan(prefills=(
        PrefillBatch((0,), (0,), ((0, 1000),), (((0, 1000),),)),
        PrefillBatch((1,), (1,), ((0, 10),), (((1, 10),),)),
    ))
    state.on_dispatched(plan, 0.0)
    executor = SimExecutor(model, state, {0: 2, 1: 1})
    executor.submit(plan)
    assert executor.in_flight == 2
    short = model.prefill_time(1, [10])
    assert executor.next_finish_time() == pytest.approx(short)
    with pytest.raises(ValueError, match="cannot advance"):
        executor.advance_to(1.0)
    (result,) = executor.wait_next()
    assert executor.now == pytest.approx(short)
    assert result.new_tokens == {1: 0} and result.finished == frozenset({1})
    (result,) = executor.wait_next()
    assert result.new_tokens == {0: 0} and result.finished == frozenset()


def test_a_policy_that_never_plans_is_reported():
    with pytest.raises(SchedulerStalled, match="planned nothing"):
        simulate([RequestSpec(0, 0.0, 10, 2)], Idle(), cost_model(), 1, request_rate=1.0)


def test_too_large_requests_are_rejected_not_queued():
    huge = RequestSpec(1, 0.0, 2 * 400 * 16, 2)
    point = simulate([RequestSpec(0, 0.0, 10, 2), huge], OnePerInstance(), cost_model(), 1, request_rate=1.0)
    assert point.metrics.rejected == 1 and point.metrics.finished == 1
    assert point.metrics.slo_attainment == pytest.approx(0.5)


def test_overload_gives_up_once_the_target_is_out_of_reach():
    model = cost_model()
    requests = [RequestSpec(i, 0.0, 2000, 50) for i in range(40)]  # all at once on one instance: a long queue
    full = simulate(requests, OnePerInstance(), model, 1, request_rate=100.0)
    early = simulate(requests, OnePerInstance(), model, 1, request_rate=100.0, give_up_below=0.9)
    assert full.complete and not early.complete
    assert full.metrics.slo_attainment < 0.9
    assert early.virtual_seconds < full.virtual_seconds


def test_search_finds_the_threshold_rate():
    threshold = 7.3
    seen = []

    def attainment(rate):
        seen.append(rate)
        return 1.0 if rate <= threshold else 0.5

    found = search_max_rate(attainment, initial_rate=1.0, relative_precision=0.02)
    assert threshold / 1.02 <= found <= threshold
    assert len(seen) < 20
    assert search_max_rate(lambda rate: 0.0, initial_rate=1.0) == 0.0
    assert search_max_rate(lambda rate: 1.0, initial_rate=1.0) == math.inf
    assert math.isclose(search_max_rate(lambda rate: 1.0 if rate <= 0.3 else 0.0, 5.0, relative_precision=0.01), 0.3,
                        rel_tol=0.011)


def test_slo_watch_counts_each_miss_once():
    from loong_jax.simulator.run import _SloWatch

    watch = _SloWatch({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    watch.finished("a", met=True)  # in time
    watch.finished("b", met=False)  # late: missed once its deadline passes
    watch.rejected("c")  # missed at once, and not again when its deadline passes
    watch.rejected("x")  # not watched: not counted
    assert watch.missed_by(0.0) == 1
    assert watch.missed_by(2.1) == 2
    assert watch.missed_by(3.5) == 2
    assert watch.missed_by(5.0) == 3  # d never finished
