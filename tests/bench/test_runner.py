"""The load generator: timing of streamed chunks and the concurrency gate (in-process client with known
delays), then `loong-jax bench` end to end against the real gRPC server on a tiny model."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from loong_jax.bench.cli import bench_main
from loong_jax.bench.datasets import BenchRequest
from loong_jax.bench.metrics import compute_metrics
from loong_jax.bench.runner import run_load
from tests.bench_fixtures import ENGINE


class ScriptedStream:
    """Yields `tokens` one-token deltas: the first after `first_delay` s, then one every `gap` s."""

    def __init__(self, client, tokens):
        self.client, self.tokens, self.completion = client, tokens, None

    async def __aiter__(self):
        self.client.in_flight += 1
        self.client.peak = max(self.client.peak, self.client.in_flight)
        try:
            await asyncio.sleep(self.client.first_delay)
            for index in range(self.tokens):
                if index:
                    await asyncio.sleep(self.client.gap)
                yield type("Delta", (), {"token_ids": [7]})()
            self.completion = type("Completion", (), {"finish_reason": "length"})()
        finally:
            self.client.in_flight -= 1


class ScriptedClient:
    def __init__(self, first_delay: float, gap: float):
        self.first_delay, self.gap = first_delay, gap
        self.in_flight = self.peak = 0
        self.sent: list[dict] = []

    def generate(self, prompt, timeout=None, **sampling):
        self.sent.append({"prompt": prompt, **sampling})
        return ScriptedStream(self, sampling["max_tokens"])


def test_runner_times_chunks_and_respects_max_concurrency():
    client = ScriptedClient(first_delay=0.05, gap=0.02)
    requests = [BenchRequest((5, 6, 7), 4)] * 6
    results, duration = asyncio.run(run_load(client, requests, [0.0] * 6, sampling={"temperature": 0.0},
                                             max_concurrency=2, progress=False))
    assert client.peak == 2  # six requests at once, never more than two in flight
    assert all(sent["max_tokens"] == 4 and sent["temperature"] == 0.0 for sent in client.sent)
    metrics = compute_metrics(results, duration)
    assert metrics["completed"] == 6 and metrics["total_output_tokens"] == 24
    assert metrics["mean_ttft_ms"] == pytest.approx(50, abs=25)  # timed from the real send, after the gate
    assert metrics["mean_tpot_ms"] == pytest.approx(20, abs=12)
    assert metrics["mean_itl_ms"] == pytest.approx(metrics["mean_tpot_ms"], rel=1e-6)
    # Three waves of two requests, each about 0.05 + 3 x 0.02 s long.
    assert duration == pytest.approx(3 * 0.11, abs=0.15)


def test_runner_follows_the_send_times():
    client = ScriptedClient(first_delay=0.0, gap=0.0)
    offsets = [0.0, 0.1, 0.25]
    results, _ = asyncio.run(run_load(client, [BenchRequest((1,), 1)] * 3, offsets, progress=False))
    np.testing.assert_allclose([r.send_time for r in results], offsets, atol=0.04)


@pytest.fixture(scope="module")
def server_port(tiny_checkpoint, compile_cache):
    from loong_jax.entrypoints.async_llm import AsyncLLM
    from loong_jax.server.app import GenerationServer, ServerOptions
    from loong_jax.server.engine_port import EnginePort

    engine = AsyncLLM(tiny_checkpoint, compilation_cache_dir=compile_cache, **ENGINE)
    started, box = threading.Event(), {}

    async def serve():
        server = GenerationServer(EnginePort.wrap(engine, tiny_checkpoint), ServerOptions(port=0))
        box["port"], box["loop"], box["stop"] = await server.start(), asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await box["stop"].wait()
        await server.stop(grace=0.5)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(60)
    yield box["port"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)
    engine.shutdown()


@pytest.mark.timeout(300)
def test_bench_end_to_end(server_port, tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code = bench_main(["--port", str(server_port), "--workload", "mixed", "--length-scale", "0.002",
                       "--num-prompts", "6", "--request-rates", "inf,20", "--max-concurrency", "4",
                       "--goodput", "ttft:60000", "tpot:60000", "--seed", "3", "--no-progress", "--timeout", "120",
                       "--warmup-pass", "--json", str(out), "--plot", str(plot), "--label", "tiny"])
    assert code == 0
    document = json.loads(out.read_text())
    assert [r["request_rate"] for r in document["results"]] == ["inf", 20.0]
    dataset = document["dataset"]
    for result in document["results"]:
        assert result["completed"] == 6 and result["failed"] == 0
        assert result["total_input_tokens"] == round(dataset["input_len"]["mean"] * 6)
        # ignore_eos: every request produced exactly its output length
        assert result["total_output_tokens"] == round(dataset["output_len"]["mean"] * 6)
        assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
        assert result["p99_ttft_ms"] >= result["median_ttft_ms"]
        assert result["slo_attainment"] == 1.0 and result["request_goodput"] > 0
        assert result["mean_normalized_latency_s"] > 0
        assert result["server_programs_ready"] > 0 and result["server_programs_compiled_during_run"] >= 0
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
