"""benchmarks/gpu_h200.py: its FLOP and byte accounting, and the whole script in --tiny mode on CPU."""

from __future__ import annotations

import json

import pytest

from loong_jax.scheduler.cost.model import CostModel
from tests.scripts import load_benchmark_script


@pytest.fixture(scope="module")
def gpu_bench():
    return load_benchmark_script("gpu_h200")


def test_llama2_7b_accounting(gpu_bench):
    shape = gpu_bench.shape_of(gpu_bench.LLAMA2_7B)
    assert shape.total_params == 6_738_415_616  # Llama-2-7B's published parameter count
    # 4K tokens: 2 FLOPs per layer parameter per token + causal attention 2·L·h·T² + one logit row.
    tokens = 4096
    expected = 2 * 6_476_267_520 * tokens + 2 * 32 * 4096 * tokens**2 + 2 * 4096 * 32000
    assert gpu_bench.prefill_flops(shape, [tokens]) == pytest.approx(expected)
    # Decode reads every weight except the embedding table, and 512 KiB of KV per context token.
    assert gpu_bench.decode_bytes(shape, 32, 4096) == pytest.approx(
        (6_738_415_616 - 32000 * 4096) * 2 + 32 * 4097 * 524_288)
    h200 = 141e9
    assert gpu_bench.decode_fits(shape, 32, 4096, h200) and gpu_bench.decode_fits(shape, 1, 32768, h200)
    assert not gpu_bench.decode_fits(shape, 32, 32768, h200)  # 550 GB of KV


def test_tiny_run_writes_report_and_cost_model(gpu_bench, tmp_path):
    out, cost_model_path = tmp_path / "gpu.json", tmp_path / "cost_model.json"
    common = ["--tiny", "--repeats", "1", "--out", str(out), "--cost-model-out", str(cost_model_path)]
    # Split in two commands as on the GPU: the second adds to the first's report.
    assert gpu_bench.main(common + ["--phases", "ceilings,prefill"]) == 0
    assert not cost_model_path.exists()
    assert gpu_bench.main(common + ["--phases", "decode,profile"]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["ceilings"]["matmul_tflops"] > 0
    assert report["ceilings"]["copy_bandwidth_gbs"] > 0
    cases = {(r["tokens"], r["variant"]) for r in report["prefill"] if "error" not in r}
    assert cases == {(n, v) for n in (64, 128) for v in ("dense", "fused", "ring_d1")}
    assert all(0 < r["mfu"] and r["tokens_per_s"] > 0 for r in report["prefill"])
    assert set(report["ring_overhead"]["128"]) == {"ring_over_dense", "ring_over_fused"}
    assert [(r["batch"], r["context"]) for r in report["decode"]] == [(1, 64), (4, 64), (1, 70)]
    assert all(r["bandwidth_fraction"] > 0 for r in report["decode"])
    targets = report["targets"]
    assert targets["prefill_mfu_at_longest"]["ring_d1"]["tokens"] == 128
    assert targets["decode_case"] == [4, 64] and targets["ring_over_dense"]["tokens"] == 128
    model = CostModel.load_json(cost_model_path)
    assert model.provenance == "measured" and model.dops == tuple(range(1, 17))
    assert model.metadata["samples"] == 2 + 2 + 3 + 1  # ring cases, packed profile, decode cases, profile
    # d = 1 is fitted to what was measured: its predictions are of the right size.
    for row in report["profile"]:
        if row["kind"] == "profile_prefill":
            predicted = model.prefill_time(1, row["lengths"])
        else:
            predicted = model.decode_time(1, row["batch"], row["batch"] * (row["context"] + 1))
        assert predicted == pytest.approx(row["seconds"], rel=1.0)
