"""Steady-state figures: the capacity bound, the middle window, the definition of a growing backlog, the max
sustainable rate, and LoongServe's per-token SLO form."""

import math

import numpy as np
import pytest

from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.cost.request_cost import instance_seconds_lower_bound
from loong_jax.scheduler.policy import PolicySpec
from loong_jax.simulator.metrics import RequestRecord, SloSpec, slo_met
from loong_jax.simulator.run import simulate
from loong_jax.simulator.steady import (GROWTH_MIN_REQUESTS, SteadyPoint, backlog_is_growing, backlog_trend,
                                        capacity_bound, outstanding, request_work, search_sustainable_rate, simulate_steady,
                                        steady_window)
from loong_jax.simulator.workloads import RequestSpec, make_workload
from tests.simulator.test_sim_executor import OnePerInstance, cost_model


def test_outstanding_work_and_its_trend():
    # Request k arrives at k s and finishes 0.5 s later, except every 10th, which is deferred for good.
    records = [RequestRecord(k, float(k), 100, 2, first_token_time=k + 0.5, finish_time=None if k % 10 == 0 else k + 0.5)
               for k in range(100)]
    records.append(RequestRecord(100, 5.0, 10**7, 2, rejected=True))  # rejected: settled on arrival
    grid = np.linspace(20.0, 80.0, 256)
    counts = outstanding(records, np.ones(len(records)), grid)
    assert counts[0] == 3  # deferred 0, 10 and 20 (arrived at 20.0); 19 finished at 19.5; the rejected one settled
    slope, mean = backlog_trend(grid, counts)
    assert slope == pytest.approx(0.1, rel=0.1)  # one more deferred request every 10 s
    # Weighted by work, a policy that defers the long requests cannot hide them: the deferred ones weigh 50.
    weights = np.array([50.0 if r.request_id % 10 == 0 else 1.0 for r in records])
    work_slope, work_mean = backlog_trend(grid, outstanding(records, weights, grid))
    assert work_slope == pytest.approx(5.0, rel=0.1) and work_mean > 40 * mean
    assert backlog_trend(np.array([1.0]), np.array([3.0])) == (0.0, 3.0)


def test_growing_backlog_definition():
    # Rise over the window = slope x duration; growing above max(8 requests, half the mean backlog).
    assert not backlog_is_growing(slope=0.0, mean=100.0, duration=100.0)
    assert not backlog_is_growing(slope=0.05, mean=4.0, duration=100.0)  # rise 5 < 8: noise on a short queue
    assert backlog_is_growing(slope=0.1, mean=4.0, duration=100.0)  # rise 10 > 8
    assert not backlog_is_growing(slope=0.4, mean=100.0, duration=100.0)  # rise 40 < 50 = half the mean
    assert backlog_is_growing(slope=0.6, mean=100.0, duration=100.0)  # rise 60 > 50
    assert backlog_is_growing(slope=1.0, mean=GROWTH_MIN_REQUESTS, duration=GROWTH_MIN_REQUESTS + 1)


def test_steady_window_judges_the_middle_half_until_its_last_deadline():
    requests = [RequestSpec(i, float(i), 100, 4) for i in range(101)]  # arrivals 0..100 s
    isolated = np.full(101, 1.0)
    window = steady_window(requests, SloSpec(25.0), isolated)
    assert (window.start, window.end) == (25.0, 75.0)
    assert window.middle_ids == frozenset(range(25, 76))
    assert window.considered_ids == frozenset(range(76))
    assert window.stop == 100.0  # last arrival (100) is after the last middle deadline (75 + 25)
    assert steady_window(requests, SloSpec(40.0), isolated).stop == 115.0  # 75 + 40
    with pytest.raises(ValueError, match="at least two"):
        steady_window(requests[:1], SloSpec(), isolated)


def test_lower_bound_is_below_what_any_policy_spends():
    # The capacity bound is only honest if no schedule serves a request with fewer instance-seconds than
    # `instance_seconds_lower_bound`: check it against the busy time of real runs of several policies.
    model = CostModel.load_json()
    workload = make_workload("mixed", 24, seed=3)
    requests = workload.requests(50.0)
    for name in ("esp", "replicas", "static-sp", "chunked-prefill"):
        point = simulate(requests, PolicySpec(name), model, 8, request_rate=50.0)
        served = [r for r in point.records if r.finished]
        assert len(served) >= len(requests) - 2  # replicas reject what one instance cannot hold
        needed = sum(instance_seconds_lower_bound(model, r.input_len, r.output_len) for r in served)
        busy = point.utilization * 8 * point.metrics.makespan  # busy instance-seconds
        assert needed <= busy, name


def test_capacity_bound_by_hand():
    model = cost_model()  # d·θ_d ≥ θ_1 for every coefficient: d = 1 is the cheapest per token
    request = RequestSpec(0, 0.0, 1000, 3)
    prompt = 1e-4 * 1000 + 1e-8 * 1000**2
    steps_context = 1001 + 1002
    generation = 2 * 1e-4 + 1e-6 * steps_context
    fixed = 0.005 / (400 * 16) * (1000 + steps_context)  # min(A_1, a_1) shared over a full pool
    expected = prompt + generation + fixed
    assert instance_seconds_lower_bound(model, 1000, 3) == pytest.approx(expected)
    assert capacity_bound([request, request], model, num_instances=4) == pytest.approx(4 / expected)


def test_a_question_on_a_cached_document_weighs_its_suffix_in_the_bound_and_the_backlog():
    model = cost_model()
    page = model.page_size
    first, second = (RequestSpec(k, float(k), 10 * page + 7, 3, document=5, document_len=10 * page) for k in range(2))
    other = RequestSpec(2, 2.0, 10 * page + 7, 3, document=6, document_len=10 * page)
    whole, suffix = (instance_seconds_lower_bound(model, 10 * page + 7, 3, cached) for cached in (0, 10 * page))
    # Arrival order decides which question computes the document, whatever the list order.
    assert request_work([second, other, first], model).tolist() == pytest.approx([suffix, whole, whole])
    assert request_work([second, other, first], model, prefix_cache=False).tolist() == pytest.approx([whole] * 3)
    assert capacity_bound([first, second], model, 4) == pytest.approx(4 * 2 / (whole + suffix))


def test_steady_runs_below_and_above_capacity():
    model = cost_model()
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0, 400))
    lengths = rng.integers(100, 600, 400)
    unit = [RequestSpec(i, float(t), int(n), 4) for i, (t, n) in enumerate(zip(arrivals, lengths))]
    bound = capacity_bound(unit, model, 2)

    def requests_at(rate):
        return [RequestSpec(r.request_id, r.arrival_time / rate, r.input_len, r.output_len) for r in unit]

    isolated = np.array([model.prefill_time(1, [r.input_len]) + 3 * model.decode_time(1, 1, r.input_len) for r in unit])

    def run(rate, give_up=False):
        return simulate_steady(requests_at(rate), OnePerInstance(), model, 2, request_rate=rate, slo=SloSpec(10.0),
                               isolated=isolated, give_up=give_up)

    light = run(0.3 * bound)
    assert light.complete and light.sustainable and not light.backlog_growing
    assert light.middle_attainment >= 0.9 and light.rejected_share == 0 and light.unserved_share == 0
    heavy = run(1.5 * bound)  # more work arrives than the cluster can do: the backlog must grow
    assert heavy.backlog_growing and not heavy.sustainable
    assert heavy.backlog_growth_per_s > 0 and heavy.unserved_share > 0.05
    gave_up = run(1.5 * bound, give_up=True)
    assert not gave_up.complete and not gave_up.sustainable and gave_up.backlog_growing is None
    found = search_sustainable_rate(run_sustainable := (lambda rate: run(rate, give_up=True)), bound, 0.1)
    assert 0.3 * bound <= found <= bound  # never above what the cost model allows
    assert run_sustainable(found).sustainable
    # Above the capacity bound nothing is run: a rate the model cannot serve is never called sustainable.
    evaluated = []
    capped = search_sustainable_rate(lambda rate: evaluated.append(rate) or light, 0.3 * bound, 0.1, ceiling=bound)
    assert capped == pytest.approx(bound, rel=0.1) and capped <= bound and max(evaluated) <= bound
    assert SteadyPoint.from_dict(heavy.to_dict()) == heavy


def test_per_token_slo_form():
    slo = SloSpec(input_s_per_token=1e-3, output_s_per_token=0.05)
    # TTFT 0.5 s over 1,000 input tokens (0.5 ms/token) and TPOT (2.0 - 0.5) / 30 = 50 ms: meets both.
    meets = RequestRecord(0, 0.0, 1000, 31, first_token_time=0.5, finish_time=2.0)
    slow_output = RequestRecord(1, 0.0, 1000, 31, first_token_time=0.5, finish_time=2.1)
    slow_input = RequestRecord(2, 0.0, 100, 1, first_token_time=0.2, finish_time=0.2)  # 2 ms/token, no TPOT
    assert list(slo_met([meets, slow_output, slow_input], np.ones(3), slo=slo)) == [True, False, False]
    assert slo.deadline(1.0, 1000, 31, isolated=99.0) == pytest.approx(1.0 + 1.0 + 1.5)
    assert SloSpec(25).deadline(1.0, 1000, 31, isolated=2.0) == 51.0
    assert "per-token" in slo.label and "25x" in SloSpec().label
    with pytest.raises(ValueError, match="both"):
        SloSpec(input_s_per_token=1e-3)
    with pytest.raises(ValueError, match="positive"):
        SloSpec(input_s_per_token=0.0, output_s_per_token=1.0)


def test_give_up_counts_only_watched_requests():
    # Request 0 can never meet a 1.01x SLO behind request 1 on one instance; with only request 1 watched, the
    # run does not give up.
    model = cost_model()
    requests = [RequestSpec(0, 0.1, 2000, 3), RequestSpec(1, 0.0, 2000, 3)]
    isolated = np.array([1.0, 1.0]) * (model.prefill_time(1, [2000]) + 2 * model.decode_time(1, 1, 2002))
    watched = simulate(requests, OnePerInstance(), model, 1, request_rate=1.0, isolated=isolated,
                       slo=SloSpec(1.01), give_up_below=0.9, watch_ids={1})
    assert watched.complete and watched.metrics.finished == 2
    assert not math.isnan(watched.metrics.slo_attainment)
