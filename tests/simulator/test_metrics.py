"""Metrics on hand-made request records: the definitions, SLO attainment, isolated latency."""

import math

import numpy as np
import pytest

from loong_jax.scheduler.cost.model import CostModel, DecodeCoefficients, PrefillCoefficients
from loong_jax.simulator.metrics import RequestRecord, isolated_latencies, slo_met, summarize
from loong_jax.simulator.workloads import RequestSpec


def hand_cost_model() -> CostModel:
    return CostModel(
        tp=1,
        prefill={1: PrefillCoefficients(0.01, 1e-4, 0.0), 2: PrefillCoefficients(0.02, 0.5e-4, 0.0)},
        decode={1: DecodeCoefficients(0.01, 0.0, 1e-6), 2: DecodeCoefficients(0.012, 0.0, 0.5e-6)},
        migration_seconds_per_byte=1e-12,
        migration_latency_s=0.0,
        kv_bytes_per_token=1024,
        pages_per_instance=100,
        page_size=16,
    )


def test_summary_definitions():
    records = [
        # e2e 2.0 s over 10 output tokens; TTFT 0.5 s over 100 input tokens; TPOT (2.0 - 0.5) / 9.
        RequestRecord(0, arrival_time=1.0, input_len=100, output_len=10, first_token_time=1.5, finish_time=3.0),
        # One output token: no TPOT. e2e 1.0 s.
        RequestRecord(1, arrival_time=2.0, input_len=50, output_len=1, first_token_time=3.0, finish_time=3.0),
        RequestRecord(2, arrival_time=2.5, input_len=10**7, output_len=5, rejected=True),
    ]
    isolated = np.array([0.1, 0.01, 1.0])
    metrics = summarize(records, isolated, request_rate=2.0, slo_scale=25)
    assert metrics.finished == 2 and metrics.rejected == 1 and metrics.num_requests == 3
    assert metrics.mean_normalized_latency == pytest.approx((2.0 / 10 + 1.0 / 1) / 2)
    assert metrics.mean_normalized_input_latency == pytest.approx((0.5 / 100 + 1.0 / 50) / 2)
    assert metrics.mean_output_latency == pytest.approx(1.5 / 9)
    # Request 0 meets 25 × 0.1 = 2.5 s; request 1 misses 25 × 0.01 = 0.25 s; the rejected one misses.
    assert metrics.slo_attainment == pytest.approx(1 / 3)
    assert metrics.makespan == pytest.approx(2.0)
    assert metrics.goodput == pytest.approx(0.5)
    assert list(slo_met(records, isolated, slo_scale=100)) == [True, True, False]


def test_unfinished_requests_miss_and_empty_means_are_nan():
    records = [RequestRecord(0, 0.0, 10, 5)]
    metrics = summarize(records, np.array([1.0]), request_rate=1.0)
    assert metrics.slo_attainment == 0.0
    assert math.isnan(metrics.mean_normalized_latency)
    assert metrics.to_dict()["mean_normalized_latency"] is None


def test_isolated_latency_takes_the_best_dop_per_phase():
    model = hand_cost_model()
    short, long = RequestSpec(0, 0.0, 100, 3), RequestSpec(1, 0.0, 100_000, 3)
    latencies = isolated_latencies([short, long], model, max_dop=2)
    # Short prompt: d=1 prefill (0.01 + 0.01) beats d=2 (0.02 + 0.005); decode d=1 beats d=2 at tiny context.
    short_expected = 0.02 + sum(0.01 + 1e-6 * (100 + k) for k in (1, 2))
    assert latencies[0] == pytest.approx(short_expected)
    # Long prompt: d=2 halves the per-token work of both phases. The request (100,003 tokens) does not even fit
    # one instance's 1,600 slots, so decode d must hold it; with max_dop=2 the largest DoP is the fallback.
    long_expected = 0.02 + 0.5e-4 * 100_000 + sum(0.012 + 0.5e-6 * (100_000 + k) for k in (1, 2))
    assert latencies[1] == pytest.approx(long_expected)
    assert isolated_latencies([long], model, max_dop=1)[0] > latencies[1]


def test_report_table_and_summary_handle_unbounded_and_missing_rates():
    from loong_jax.simulator.report import ExperimentResult, PolicyResult, format_table

    result = ExperimentResult(
        config={},
        workload_stats={},
        policies={
            "esp": PolicyResult("esp", 4.0),
            "replicas": PolicyResult("replicas", 2.0),
            "static-sp": PolicyResult("static-sp", None),
        },
    )
    summary = result.summary()
    assert summary["best_baseline"] == "replicas"
    assert summary["esp_over_best_baseline"] == 2.0
    assert summary["esp_over_each_baseline"]["static-sp"] == math.inf
    assert summary["esp_beats_every_baseline"]
    assert result.to_dict()["summary"]["esp_over_each_baseline"]["static-sp"] == "inf"
    table = format_table(result)
    assert "ESP / best baseline (replicas): 2.00x" in table and "none" in table

    unbounded = ExperimentResult({}, {}, {"esp": PolicyResult("esp", math.inf), "replicas": PolicyResult("replicas", math.inf)})
    summary = unbounded.summary()
    assert summary["esp_over_best_baseline"] is None and not summary["esp_beats_every_baseline"]
    assert "unbounded" in format_table(unbounded) and "undefined" in format_table(unbounded)
    only_esp = ExperimentResult({}, {}, {"esp": PolicyResult("esp", math.inf), "replicas": PolicyResult("replicas", 9.0)})
    assert only_esp.summary()["esp_beats_every_baseline"] and only_esp.summary()["esp_over_best_baseline"] == math.inf


def test_plot_without_any_complete_run_still_writes_a_png(tmp_path):
    from loong_jax.simulator.report import ExperimentResult, PolicyResult, plot_experiment

    path = tmp_path / "empty.png"
    plot_experiment(ExperimentResult({"workload": "w"}, {}, {"esp": PolicyResult("esp", None)}), path)
    assert path.read_bytes()[:4] == b"\x89PNG"
