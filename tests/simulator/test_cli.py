"""`simulate_main` end to end on a tiny cluster: every registered policy serves a small workload with the real
EngineState (invariants checked), and the CLI writes its JSON and plot."""

import json
from dataclasses import replace

import numpy as np
import pytest

from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.policy import PolicySpec, policy_names
from loong_jax.simulator.cli import simulate_main
from loong_jax.simulator.run import simulate
from loong_jax.simulator.workloads import RequestSpec


@pytest.mark.parametrize("name", policy_names())
def test_every_policy_serves_mixed_lengths_to_the_end(name):
    # The H200 model with a small KV pool (2,000 pages of 16 per instance) so that memory pressure shows up and
    # the full invariant check after every event stays cheap.
    cost_model = replace(CostModel.load_json(), pages_per_instance=2000)
    rng = np.random.default_rng(7)
    lengths = [40, 3000, 20_000, 120, 60_000, 900, 8_000, 300, 15_000, 2_000, 70, 30_000]
    requests = [
        RequestSpec(i, float(t), n, int(rng.integers(2, 24)))
        for i, (t, n) in enumerate(zip(np.cumsum(rng.exponential(0.05, len(lengths))), lengths))
    ]
    point = simulate(requests, PolicySpec(name), cost_model, 4, request_rate=20.0, check_invariants=True)
    assert point.complete
    # Only a request larger than a fixed group's pool may be rejected (60K tokens > one instance's 32K).
    assert point.metrics.finished + point.metrics.rejected == len(requests)
    assert point.metrics.finished >= len(requests) - 2
    assert point.units.get("prefill", 0) + point.units.get("fused_prefill", 0) >= 1 and point.units["decode"] >= 1
    assert 0 < point.utilization <= 1 + 1e-9


def test_policy_spec_parsing():
    spec = PolicySpec.parse("static-sp:degree=4:growth_horizon=128")
    assert spec.name == "static-sp" and dict(spec.options) == {"degree": 4, "growth_horizon": 128}
    assert spec.label == "static-sp:degree=4:growth_horizon=128"
    with pytest.raises(ValueError, match="not key=value"):
        PolicySpec.parse("esp:fast")
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySpec.parse("round-robin").build()


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = simulate_main([
        "--workload", "sharegpt", "--instances", "2", "--policies", "esp,replicas", "--request-rates", "1,4",
        "--num-requests", "12", "--steady-requests", "0", "--json", str(out_json), "--plot", str(out_png),
        "--no-progress",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ESP / best baseline (replicas)" in printed
    document = json.loads(out_json.read_text())
    assert document["config"]["instances"] == 2 and document["config"]["cost_model_provenance"] == "projected"
    assert set(document["policies"]) == {"esp", "replicas"}
    points = document["policies"]["esp"]["points"]
    assert [p["request_rate"] for p in points] == [1.0, 4.0]
    assert all(p["complete"] and p["finished"] == 12 for p in points)
    assert document["summary"]["best_baseline"] == "replicas"
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_searches_the_rate_from_a_trace(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival,input_len,output_len\n" + "".join(f"{0.2 * i},{300 + 50 * i},{8}\n" for i in range(10)))
    out_json = tmp_path / "r.json"
    # A tight SLO (2x isolated): ten requests arriving at once on two instances cannot all meet it.
    simulate_main(["--trace", str(trace), "--instances", "2", "--policies", "replicas", "--precision", "0.3",
                   "--slo-scale", "2", "--steady-requests", "0", "--json", str(out_json), "--no-progress"])
    document = json.loads(out_json.read_text())
    result = document["policies"]["replicas"]
    assert document["config"]["slo_scale"] == 2
    assert 0 < result["max_throughput"] < 1000
    passing = [p for p in result["points"] if p["slo_attainment"] >= 0.9]
    assert max(p["request_rate"] for p in passing) == pytest.approx(result["max_throughput"])


def test_json_loads_back_into_the_same_summary(tmp_path, capsys):
    from loong_jax.simulator.report import format_table, load_experiment

    out_json = tmp_path / "r.json"
    simulate_main(["--workload", "leval", "--instances", "2", "--policies", "esp,replicas", "--request-rates", "0.5",
                   "--num-requests", "6", "--steady-requests", "0", "--json", str(out_json), "--no-progress"])
    printed = capsys.readouterr().out
    loaded = load_experiment(out_json)
    assert format_table(loaded) in printed
    assert loaded.policies["esp"].burst.metrics.request_rate == float("inf")


def test_cli_refuses_a_one_instance_cost_model_for_several_instances(tmp_path):
    # A profile of one device has no migration term: it cannot time the moves of 2 instances.
    one_instance = replace(CostModel.load_json(tp=1), migration_seconds_per_byte=None)
    path = tmp_path / "one.json"
    one_instance.save_json(path)
    with pytest.raises(SystemExit, match="no migration term"):
        simulate_main(["--cost-model", str(path), "--instances", "2", "--num-requests", "4", "--no-progress"])


def test_cli_reports_steady_state_figures_for_every_policy(tmp_path, capsys):
    from loong_jax.simulator.report import format_table, load_experiment

    out_json = tmp_path / "r.json"
    simulate_main(["--workload", "leval", "--instances", "2", "--policies", "esp,static-sp:degree=2",
                   "--request-rates", "0.2", "--num-requests", "6", "--steady-requests", "30", "--precision", "0.3",
                   "--json", str(out_json), "--no-progress"])
    printed = capsys.readouterr().out
    document = json.loads(out_json.read_text())
    bound = document["workload_stats"]["capacity_bound"]
    assert bound > 0 and document["workload_stats"]["capacity_bound_requests"] == 30
    assert document["summary"]["capacity_bound"] == bound
    assert document["config"]["steady_requests"] == 30
    for label in ("esp", "static-sp:degree=2"):  # option strings pass through as labels
        entry = document["policies"][label]
        steady = {p["request_rate"]: p for p in entry["steady_points"]}
        assert steady[0.2]["complete"] and steady[0.2]["num_requests"] == 30  # the listed rate, run to its stop
        assert 0 <= steady[0.2]["middle_attainment"] <= 1
        if entry["max_sustainable_rate"] is not None:
            assert steady[entry["max_sustainable_rate"]]["sustainable"]
    assert "sustainable" in printed and "bound" in printed
    loaded = load_experiment(out_json)
    assert format_table(loaded) in printed
    assert loaded.policies["esp"].sustainable_rate == document["policies"]["esp"]["max_sustainable_rate"]


def test_cli_per_token_slo_and_steady_switch(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    simulate_main(["--workload", "sharegpt", "--instances", "2", "--policies", "replicas", "--request-rates", "2",
                   "--num-requests", "8", "--steady-requests", "0", "--slo-input-ms-per-token", "5",
                   "--slo-output-ms-per-token", "100", "--json", str(out_json), "--no-progress"])
    document = json.loads(out_json.read_text())
    assert document["config"]["slo"] == {"scale": 25.0, "input_s_per_token": 0.005, "output_s_per_token": 0.1}
    assert document["policies"]["replicas"]["steady_points"] == []
    assert "per-token" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="both"):
        simulate_main(["--num-requests", "4", "--slo-input-ms-per-token", "5", "--no-progress"])
    with pytest.raises(SystemExit, match="steady-requests"):
        simulate_main(["--num-requests", "4", "--steady-requests", "1", "--no-progress"])
