"""Benchmark metrics on hand-made timings: every figure is worked out by hand in the comments."""

import math

import numpy as np
import pytest

from loong_jax.bench.metrics import RequestResult, compute_metrics, meets_slos, parse_goodput
from loong_jax.scheduler.cost.model import CostModel, DecodeCoefficients, PrefillCoefficients


def hand_made_run():
    """Three requests over a 10 s run (client clock, seconds).

    A: sent 0, 10 input tokens, chunks at 1.0 (1 token), 2.0 (1), 4.0 (2)  -> 4 tokens
       TTFT 1.0, E2EL 4.0, TPOT (4-1)/3 = 1.0, ITL gaps 1.0, then 2.0 over 2 tokens -> 1.0, 1.0
    B: sent 2, 20 input tokens, chunks at 2.5 (1), 3.0 (1)                  -> 2 tokens
       TTFT 0.5, E2EL 1.0, TPOT 0.5, ITL 0.5
    C: sent 5, 30 input tokens, one chunk at 10.0 (1 token)                 -> 1 token
       TTFT 5.0, E2EL 5.0, no TPOT, no ITL
    D: sent 6, failed.
    """
    a = RequestResult(10, 0.0, [(1.0, 1), (2.0, 1), (4.0, 2)], finish_time=4.0)
    b = RequestResult(20, 2.0, [(2.5, 1), (3.0, 1)], finish_time=3.0)
    c = RequestResult(30, 5.0, [(10.0, 1)], finish_time=10.0)
    d = RequestResult(40, 6.0, [], error="UNAVAILABLE: gone")
    return [a, b, c, d]


def test_latencies_and_throughput():
    metrics = compute_metrics(hand_made_run(), duration=10.0, percentiles=(50, 90, 99))
    assert metrics["completed"] == 3 and metrics["failed"] == 1
    assert metrics["total_input_tokens"] == 60 and metrics["total_output_tokens"] == 7
    assert metrics["request_throughput"] == pytest.approx(0.3)
    assert metrics["output_throughput"] == pytest.approx(0.7)
    assert metrics["total_token_throughput"] == pytest.approx(6.7)
    # TTFT 1.0, 0.5, 5.0 s
    assert metrics["mean_ttft_ms"] == pytest.approx(6500 / 3)
    assert metrics["median_ttft_ms"] == pytest.approx(1000)
    assert metrics["p99_ttft_ms"] == pytest.approx(np.percentile([1000, 500, 5000], 99))
    assert metrics["std_ttft_ms"] == pytest.approx(np.std([1000, 500, 5000]))
    # TPOT 1.0 and 0.5 (C has a single token)
    assert metrics["mean_tpot_ms"] == pytest.approx(750)
    assert metrics["p90_tpot_ms"] == pytest.approx(np.percentile([1000, 500], 90))
    # ITL: A gives 1.0, 1.0, 1.0; B gives 0.5
    assert metrics["mean_itl_ms"] == pytest.approx(3500 / 4)
    assert metrics["median_itl_ms"] == pytest.approx(1000)
    # E2EL 4.0, 1.0, 5.0
    assert metrics["mean_e2el_ms"] == pytest.approx(10000 / 3)
    assert metrics["errors"] == ["UNAVAILABLE: gone"]


def test_normalised_latencies_follow_loongserve():
    metrics = compute_metrics(hand_made_run(), duration=10.0)
    # per-token: E2EL / output tokens = 4/4, 1/2, 5/1
    assert metrics["mean_normalized_latency_s"] == pytest.approx((1.0 + 0.5 + 5.0) / 3)
    # input: TTFT / input tokens = 1/10, 0.5/20, 5/30
    assert metrics["mean_normalized_input_latency_s"] == pytest.approx((0.1 + 0.025 + 5 / 30) / 3)
    # output: mean TPOT over requests with > 1 token
    assert metrics["mean_normalized_output_latency_s"] == pytest.approx(0.75)
    assert "loongserve_slo_attainment" not in metrics


def test_goodput_and_slo_attainment():
    results = hand_made_run()
    # ttft <= 1000 ms: A (1.0) and B (0.5) pass, C (5.0) fails; tpot <= 800 ms: A (1.0) fails.
    metrics = compute_metrics(results, duration=10.0, goodput_ms=parse_goodput(["ttft:1000", "tpot:800"]))
    assert metrics["request_goodput"] == pytest.approx(0.1)  # only B, over 10 s
    assert metrics["slo_attainment"] == pytest.approx(1 / 4)  # the failed request counts as a miss
    # C has one token: its TPOT bound is vacuous, only its TTFT decides.
    only_tpot = compute_metrics(results, duration=10.0, goodput_ms={"tpot": 800})
    assert only_tpot["slo_attainment"] == pytest.approx(2 / 4)  # B and C
    e2el = compute_metrics(results, duration=10.0, goodput_ms={"e2el": 4000})
    assert e2el["request_goodput"] == pytest.approx(0.2)  # A (4.0 s, on the bound) and B


def test_loongserve_slo_with_a_cost_model():
    # Isolated latency = prefill (0.1 s) + 0.2 s per decode step: A 0.7, B 0.3, C 0.1 s.
    model = CostModel(tp=1, prefill={1: PrefillCoefficients(0.1, 0.0, 0.0)},
                      decode={1: DecodeCoefficients(0.2, 0.0, 0.0)}, migration_seconds_per_byte=0.0,
                      migration_latency_s=0.0, kv_bytes_per_token=1, pages_per_instance=1000, page_size=16)
    metrics = compute_metrics(hand_made_run(), duration=10.0, cost_model=model, slo_scale=5.0)
    # SLO 5x isolated: A 3.5 s (E2EL 4.0 misses), B 1.5 s (1.0 meets), C 0.5 s (5.0 misses), D failed.
    assert metrics["loongserve_slo_attainment"] == pytest.approx(1 / 4)


def test_parse_goodput_rejects_bad_bounds():
    assert parse_goodput(["TTFT:250", "e2el:1e4"]) == {"ttft": 250.0, "e2el": 10000.0}
    for bad in (["ttft"], ["speed:10"], ["tpot:-1"], ["tpot:abc"], ["ttft:inf"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_meets_slos_rejects_unfinished():
    failed = RequestResult(5, 0.0, [], error="x").record(0)
    assert not meets_slos(failed, {"ttft": 1e9})


def test_empty_or_zero_duration_is_an_error():
    with pytest.raises(ValueError):
        compute_metrics([], duration=1.0)
    with pytest.raises(ValueError):
        compute_metrics(hand_made_run(), duration=0.0)


def test_all_failed_gives_no_latencies():
    metrics = compute_metrics([RequestResult(5, 0.0, [], error="boom")], duration=1.0)
    assert metrics["completed"] == 0 and metrics["mean_ttft_ms"] is None
    assert metrics["mean_normalized_latency_s"] is None and not math.isnan(metrics["request_throughput"])
