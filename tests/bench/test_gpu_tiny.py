"""benchmarks/gpu_h200.py: its FLOP and byte accounting, and the whole script in --tiny mode on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loong_jax.scheduler.cost_model import CostModel

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_h200.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_h200", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    assert gpu_bench.main(["--tiny", "--repeats", "1", "--out", str(out),
                           "--cost-model-out", str(cost_model_path)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["ceilings"]["matmul_tflops"] > 0
    assert report["ceilings"]["copy_bandwidth_gbs"] > 0
    cases = {(r["tokens"], r["variant"]) for r in report["prefill"] if "error" not in r}
    assert cases == {(n, v) for n in (64, 128) for v in ("dense", "fused", "ring_d1")}
    assert all(0 < r["mfu"] and r["tokens_per_s"] > 0 for r in report["prefill"])
    assert set(report["ring_overhead"]["128"]) == {"ring_over_dense", "ring_over_fused"}
    assert all(r["bandwidth_fraction"] > 0 for r in report["decode"])
    assert set(report["targets"]) >= {"prefill_target_ge_0_5", "decode_target_ge_0_7", "ring_target_within_10pct"}
    model = CostModel.load_json(cost_model_path)
    assert model.provenance == "measured" and model.dops == tuple(range(1, 17))
    profile = [r for r in report["profile"] if "seconds" in r]
    assert len(profile) == 6 and model.metadata["samples"] == 6
    # d = 1 is fitted to what was measured: its predictions are of the right size.
    for row in profile:
        if row["kind"] == "profile_prefill":
            predicted = model.prefill_time(1, row["lengths"])
        else:
            predicted = model.decode_time(1, row["batch"], row["batch"] * (row["context"] + 1))
        assert predicted == pytest.approx(row["seconds"], rel=1.0)
