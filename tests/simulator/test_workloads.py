"""Workload generators: length ranges, seeding, Poisson arrivals, Zipf shape, trace files."""

import json

import numpy as np
import pytest

from loong_jax.simulator.workloads import WORKLOADS, load_trace, make_workload

TOTAL_RANGES = {"sharegpt": (4, 2_300), "leval": (2_700, 210_500), "lveval": (15_100, 497_300), "zipf": (10, 200_000)}


@pytest.mark.parametrize("name", sorted(TOTAL_RANGES))
def test_lengths_stay_in_the_dataset_range(name):
    workload = make_workload(name, 2000, seed=0)
    totals = workload.input_lens + workload.output_lens
    low, high = TOTAL_RANGES[name]
    assert totals.min() >= low and totals.max() <= high
    assert workload.input_lens.min() >= 1 and workload.output_lens.min() >= 1
    # The range is actually used, not a narrow band inside it.
    assert totals.max() / totals.min() > 15


def test_sharegpt_means_are_chat_like():
    workload = make_workload("sharegpt", 5000, seed=1)
    assert 120 < workload.input_lens.mean() < 260
    assert 250 < workload.output_lens.mean() < 420


def test_mixed_is_equal_parts():
    workload = make_workload("mixed", 999, seed=2)
    totals = workload.input_lens + workload.output_lens
    # ShareGPT totals are <= 2,300 tokens and the two long datasets start at 2,700: the split is exact.
    assert int((totals <= 2_300).sum()) == 333
    assert int((totals > 210_500).sum()) > 0  # LV-Eval's long tail is present
    assert 0 < int((totals < 15_100).sum()) - 333  # and L-Eval's short documents


def test_seeding_is_deterministic():
    first, again, other = (make_workload("mixed", 300, seed=s) for s in (5, 5, 6))
    assert np.array_equal(first.input_lens, again.input_lens)
    assert np.array_equal(first.unit_arrivals, again.unit_arrivals)
    assert not np.array_equal(first.input_lens, other.input_lens)


def test_poisson_arrivals_scale_with_rate():
    workload = make_workload("sharegpt", 20_000, seed=3)
    slow, fast = workload.requests(2.0), workload.requests(8.0)
    gaps = np.diff([r.arrival_time for r in fast])
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.05)  # exponential: std == mean
    assert fast[100].arrival_time * 4 == pytest.approx(slow[100].arrival_time)
    assert [r.input_len for r in fast] == [r.input_len for r in slow]
    with pytest.raises(ValueError, match="positive"):
        workload.requests(0.0)
    with pytest.raises(ValueError, match="native timing"):
        workload.requests(None)


def test_zipf_follows_the_power_law():
    alpha = 1.2
    workload = make_workload("zipf", 50_000, seed=4, zipf_alpha=alpha)
    totals = workload.input_lens + workload.output_lens
    assert workload.name == "zipf1.2"
    ratio = (totals == 10).sum() / (totals == 20).sum()
    assert ratio == pytest.approx(2**alpha, rel=0.15)
    heavier = make_workload("zipf", 5_000, seed=4, zipf_alpha=0.8)
    assert (heavier.input_lens + heavier.output_lens).mean() > 2 * totals.mean()
    with pytest.raises(ValueError, match="alpha"):
        make_workload("zipf", 10, zipf_alpha=0.0)


def test_unknown_workload():
    with pytest.raises(ValueError, match="unknown workload 'alpaca'"):
        make_workload("alpaca", 10)
    assert set(WORKLOADS) == {"sharegpt", "leval", "lveval", "mixed", "zipf", "leval-docs", "lveval-docs"}


def test_trace_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "trace.csv"
    csv_path.write_text("arrival,input_len,output_len\n10.0,500,20\n12.0,100,5\n11.0,7000,64\n")
    trace = load_trace(csv_path)
    requests = trace.requests(None)
    assert [r.input_len for r in requests] == [500, 7000, 100]
    assert [r.arrival_time for r in requests] == pytest.approx([0.0, 1.0, 2.0])
    assert trace.native_rate == pytest.approx(1.0)
    assert [r.arrival_time for r in trace.requests(4.0)] == pytest.approx([0.0, 0.25, 0.5])

    jsonl_path = tmp_path / "trace.jsonl"
    rows = [{"arrival_time": t, "input_len": 10 * (i + 1), "output_len": 3} for i, t in enumerate([0.0, 0.5, 3.0])]
    jsonl_path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    trace = load_trace(jsonl_path, num_requests=2)
    assert len(trace) == 2 and list(trace.input_lens) == [10, 20]

    bad = tmp_path / "bad.csv"
    bad.write_text("arrival,input_len\n0,10\n")
    with pytest.raises(ValueError, match="needs arrival, input_len and output_len"):
        load_trace(bad)
    bad.write_text("arrival,input_len,output_len\n0,0,10\n")
    with pytest.raises(ValueError, match="length < 1"):
        load_trace(bad)
