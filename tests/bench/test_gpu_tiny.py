"""benchmarks/gpu_h200.py and benchmarks/gpu_run.sh: the FLOP and byte accounting, the time caps, and the whole
one-command run at tiny shapes on CPU (the kernels in Pallas interpret mode), as a GPU machine would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from loong_jax.scheduler.cost.model import CostModel
from tests.scripts import BENCHMARKS, load_benchmark_script


@pytest.fixture(scope="module")
def gpu_bench():
    return load_benchmark_script("gpu_h200")


def test_llama2_7b_accounting(gpu_bench):
    accounting = sys.modules["gpu_accounting"]
    shape = accounting.shape_of(gpu_bench.LLAMA2_7B)
    assert shape.total_params == 6_738_415_616  # Llama-2-7B's published parameter count
    # 4K tokens: 2 FLOPs per layer parameter per token + causal attention 2·L·h·T² + one logit row.
    tokens = 4096
    expected = 2 * 6_476_267_520 * tokens + 2 * 32 * 4096 * tokens**2 + 2 * 4096 * 32000
    assert accounting.prefill_flops(shape, [tokens]) == pytest.approx(expected)
    assert accounting.attention_flops(shape, tokens) == pytest.approx(2 * 4096 * tokens**2)  # one layer
    # Decode reads every weight except the embedding table, and 512 KiB of KV per context token (16 KiB a layer).
    assert accounting.decode_bytes(shape, 32, 4096) == pytest.approx(
        (6_738_415_616 - 32000 * 4096) * 2 + 32 * 4097 * 524_288)
    assert accounting.decode_kv_bytes(shape, 32, 4096) == 32 * 4096 * 16_384
    # What the model phase runs fits an H100's 92% pool: weights plus 8 x 4K of KV.
    h100_pool = 0.92 * 79.6e9
    assert accounting.decode_fits(shape, 8, 4096, h100_pool) and not accounting.decode_fits(shape, 32, 32768, 141e9)


def test_timed_calls_stop_at_the_cap(gpu_bench):
    accounting = sys.modules["gpu_accounting"]  # the sibling module the script imported
    result = accounting.timed(lambda: time.sleep(0.05), repeats=1000, warmup=0, cap_s=0.2)
    assert 1 <= result["repeats"] <= 6 and result["seconds"] >= 0.05


def test_a_report_cut_short_is_started_afresh(gpu_bench, tmp_path):
    report = tmp_path / "gpu_h200.json"
    assert gpu_bench.read_report(report) == {}
    report.write_text('{"device": "H100", "ceilings": {"matmul')  # a writer killed mid-file (before the fix)
    assert gpu_bench.read_report(report) == {}


def test_a_case_starts_only_while_the_budget_allows(gpu_bench):
    attention = sys.modules["gpu_attention"]
    accounting = sys.modules["gpu_accounting"]
    settings = gpu_bench.TINY_SETTINGS
    spent = accounting.Budget(deadline=time.monotonic() - 1.0, case_cap_s=1.0)
    rows = attention.run_attention_phase(settings, accounting.shape_of(settings.config), {}, "interpret", spent,
                                         None, record=lambda row: row)
    assert rows and all(row["skipped"] == "time budget" for row in rows)
    assert {row["variant"] for row in rows} == {"kernel", "cudnn", "current"}


def test_one_command_cpu_smoke_run_measures_every_case(tmp_path):
    environment = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_run.sh"), "--cpu-smoke", "--link-farm", str(tmp_path)],
                         capture_output=True, text=True, timeout=500, env=environment)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = (tmp_path / "gpu_run.log").read_text()
    farm = [line for line in log.splitlines() if line.startswith("gpu_run: project: loong_jax from ")]
    assert farm and not farm[0].endswith(str(Path("loong_jax/__init__.py").resolve()))  # the linked copy ran
    report = json.loads((tmp_path / "gpu_h200.json").read_text())
    assert report["mode"] == "tiny" and report["attention_impl"] == {"attention_phase_kernel": "interpret",
                                                                  "model": "reference"}
    assert report["environment"]["versions"]["jax"] and report["ceilings"]["matmul_tflops"] > 0
    measured = [row for row in report["attention"] if "seconds" in row]
    assert len(measured) == len(report["attention"]), report["attention"]
    assert {(row.get("tokens"), row.get("batch"), row["variant"]) for row in measured} == {
        (64, None, "kernel"), (64, None, "cudnn"), (64, None, "current"), (128, None, "kernel"),
        (128, None, "cudnn"), (None, 4, "kernel"), (None, 4, "current"), (None, 1, "kernel"), (None, 1, "current")}
    assert all(row["compile_s"] > 0 and row["repeats"] >= 1 for row in measured)
    model = report["model"]
    assert [row["kind"] for row in model] == ["model_prefill"] * 3 + ["model_decode"] * 3
    assert all(row["seconds"] > 0 for row in model) and model[0]["mfu"] > 0
    assert set(report["model_compile_s"]) == {"prefill 64", "decode"}
    exactness = report["exactness"]  # on a CPU both engines run the XLA code: the plumbing, not the kernels
    assert exactness["equal"] and exactness["tokens"] == 48 and exactness["first_difference"] is None
    targets = report["targets"]
    assert targets["float32_greedy_tokens_equal_cpu"] is True
    assert set(targets["prefill_kernel_speed_over_cudnn"]) == {"64", "128"}
    assert set(targets["decode_kernel_copy_fraction"]) == {"4x64", "1x200"}
    cost_model = CostModel.load_json(tmp_path / "gpu_cost_model.json")
    assert cost_model.provenance == "measured" and cost_model.dops == tuple(range(1, 17))
    assert cost_model.metadata["samples"] == 6
    for dop in cost_model.dops:  # the measured d = 1 beside projected wider groups: none faster than its members
        assert cost_model.prefill_efficiency(dop, [64]) <= 1 + 1e-12
        assert dop * cost_model.decode_time(dop, 4, 256) >= cost_model.decode_time(1, 4, 256) * (1 - 1e-12)


def test_full_size_model_programs_lower_for_cuda(gpu_bench):
    """The model phase's 7B programs (prefill 4K, decode 8 x 4K, kernels in) lower for CUDA on a CPU, from
    abstract weights: what the GPU run compiles is known to trace before a GPU is lent."""
    bench = gpu_bench.ModelBench(gpu_bench.FULL, jax.devices("cpu")[0], "kernel", abstract=True)
    rows, context = gpu_bench.FULL.model_decode_capacity
    for program, args in ((bench.prefill_program, bench.prefill_args(gpu_bench.FULL.model_prefill[0])),
                          (bench.decode_program, bench.decode_args(rows, context))):
        text = program.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        # One attention kernel a layer: once in the layer scan's body, whatever the depth.
        config = gpu_bench.LLAMA2_7B
        assert text.count("xla.gpu.triton") == (1 if config.scan_layers else config.num_layers)


def test_engine_decode_shapes_fit_the_gpus_the_engine_run_picks(gpu_bench):
    """`gpu_run.sh --engine`: batch 32 x 4K on a GPU of 120 GB or more (an H200), 16 on an H100; the random
    model has the shape asked for and the demo model's vocabulary (every sampled id detokenizes)."""
    accounting = sys.modules["gpu_accounting"]
    engine_decode = load_benchmark_script("engine_decode")
    shape = accounting.shape_of(gpu_bench.LLAMA2_7B)
    context = 4096 + 32
    assert accounting.decode_fits(shape, 32, context, 0.92 * 141e9)
    assert accounting.decode_fits(shape, 16, context, 0.92 * 79.6e9)
    assert not accounting.decode_fits(shape, 32, context, 0.92 * 79.6e9)
    model = engine_decode.random_model("tiny", context)
    assert model.config.hidden_size == engine_decode.SHAPES["tiny"]["hidden_size"] and model.config.dtype == "bfloat16"
    assert model.config.vocab_size == 4096 and model.config.max_position_embeddings >= context
    assert {k: getattr(gpu_bench.LLAMA2_7B, k) for k in engine_decode.SHAPES["llama2-7b"]} == \
        engine_decode.SHAPES["llama2-7b"]
