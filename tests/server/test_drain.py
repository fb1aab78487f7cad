"""`loong-jax serve` in a subprocess: ready after warm-up, SIGTERM during load drains every in-flight
request to its end, health turns NOT_SERVING, new calls get UNAVAILABLE, and the process exits 0."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc

from loong_jax.server.client import SERVICE_NAME, LoongClient, client_main
from tests.server.harness import wait_until

N_IN_FLIGHT = 12
MAX_TOKENS = 24
PROMPTS = ["Return the number of", "This module provides", "Create a new socket", "If the file does not"]


def _start_server(model_dir) -> tuple[subprocess.Popen, str, queue.Queue]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loong_jax.entrypoints.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--kv-pages", "256", "--drain-timeout", "60", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout_lines: queue.Queue = queue.Queue()
    stderr_lines: queue.Queue = queue.Queue()
    for stream, sink in ((process.stdout, stdout_lines), (process.stderr, stderr_lines)):
        threading.Thread(target=lambda s=stream, q=sink: [q.put(line) for line in s], daemon=True).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = stdout_lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, f"server exited early with {process.returncode}"
            continue
        if line.startswith("loong-jax serving on "):
            return process, line.split()[-1], stderr_lines
    process.kill()
    raise AssertionError("the server did not announce its port within 120 s")


def test_sigterm_drains_in_flight_requests_and_exits_zero(model_dir, reference_llm):
    from loong_jax.sampling.params import SamplingParams

    expected = reference_llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                              ignore_eos=True), use_tqdm=False)
    quick_start = reference_llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0),
                                         use_tqdm=False)[0]
    process, target, stderr_lines = _start_server(model_dir)
    try:
        with LoongClient(target) as client:
            assert client.health("") == "SERVING"  # live as soon as the port is open
            # The README's quick start: `loong-jax client` waits for readiness and streams one answer.
            printed = io.StringIO()
            assert client_main(["--target", target, "--wait-ready", "120", "--max-tokens", "8", PROMPTS[0]],
                               stdout=printed) == 0
            assert printed.getvalue() == quick_start.text + "\n"
            assert client.health(SERVICE_NAME) == "SERVING"
            streams = [client.generate(PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0.0,
                                       ignore_eos=True, timeout=120) for i in range(N_IN_FLIGHT)]
            iterators = [iter(stream) for stream in streams]
            first_deltas = [next(iterator) for iterator in iterators]  # every request is in flight
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: client.health(SERVICE_NAME) == "NOT_SERVING", what="NOT_SERVING after SIGTERM")
            try:
                client.complete(PROMPTS[0], max_tokens=1, timeout=30)
                refused = grpc.StatusCode.OK
            except grpc.RpcError as error:
                refused = error.code()
            assert refused == grpc.StatusCode.UNAVAILABLE
            for index, (stream, iterator, first) in enumerate(zip(streams, iterators, first_deltas)):
                rest = list(iterator)  # the drain lets it run to the end
                completion = stream.completion
                assert completion.finish_reason == "length"
                assert completion.token_ids == expected[index % len(PROMPTS)].token_ids
                assert first.token_ids + [t for d in rest for t in d.token_ids] == completion.token_ids
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    log_lines = []
    while not stderr_lines.empty():
        line = stderr_lines.get_nowait()
        if line.startswith("{"):
            log_lines.append(json.loads(line))
    finished = [line for line in log_lines if line.get("event") == "request_finished"]
    assert sum(line["outcome"] == "length" for line in finished) == N_IN_FLIGHT + 1  # + the quick start's
    assert any(line.get("event") == "draining" and line["open_requests"] == N_IN_FLIGHT for line in log_lines)
    assert log_lines[-1]["event"] == "stopped"
