"""Hostile clients and a hostile environment: huge prompts, clients that never read, admission bursts, a taken
port, a missing server, a second signal during the drain, and what GetModelInfo tells about the disk.

Each test runs a real server over loopback (in-process, on the session's shared engine) and checks what the
issue asked: the refusal and its message, and that everybody else is still served."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import grpc
import pytest

from loong_jax.server.client import AsyncLoongClient, LoongClient, client_main
from loong_jax.server.cli import serve_main
from loong_jax.scheduler.plan import Plan
from loong_jax.server.generated import generation_pb2 as pb
from tests.server.harness import start_server, wait_pages_free, wait_until
from tests.server.raw_http2 import StalledCall

PROMPT = "Return the number of"
HUGE_PROMPT_BYTES = 8 * 1024 * 1024
GENERATE_PATH = "/loong_jax.v1.Generation/Generate"


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class _PeakRss:
    """The process's highest RSS while the block runs, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.baseline = self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- huge prompts
def test_huge_prompts_are_refused_before_tokenizing_and_stall_no_stream(loop_thread, engine_port):
    handle = start_server(loop_thread, engine_port)  # the default 16 MiB message limit: 8 MiB prompts arrive
    huge_text = "many words " * (HUGE_PROMPT_BYTES // len("many words "))
    huge_prompts = [huge_text] * 4 + [[{"role": "user", "content": huge_text}]] * 2
    try:
        with LoongClient(handle.target) as client:
            stream = client.generate(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, timeout=120)
            deltas = iter(stream)
            next(deltas)  # the greedy stream runs
            refusals: list = []

            def send(prompt) -> None:
                try:
                    client.complete(prompt, max_tokens=4, timeout=60)
                    refusals.append((grpc.StatusCode.OK, ""))
                except grpc.RpcError as error:
                    refusals.append((error.code(), error.details()))

            senders = [threading.Thread(target=send, args=(prompt,)) for prompt in huge_prompts]
            gaps, last = [], time.monotonic()
            with _PeakRss() as rss:
                for sender in senders:
                    sender.start()
                for _ in deltas:  # read on while the huge prompts arrive, until they are all answered
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                    if not any(sender.is_alive() for sender in senders):
                        break
            stream.cancel()
            for sender in senders:
                sender.join(60)
    finally:
        handle.stop()
    assert len(refusals) == len(huge_prompts)
    for code, details in refusals:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens" in details, (code, details)
    assert max(gaps) < 1.0, f"longest inter-token gap {max(gaps):.2f} s"
    assert rss.growth < 500 * 1024 * 1024, f"RSS grew by {rss.growth / 2**20:.0f} MiB"
    wait_pages_free(engine_port)


def test_a_prompt_that_may_fit_is_still_tokenized_and_judged_by_its_tokens(server):
    limit = server.server.servicer._admission.max_prompt_tokens()
    with LoongClient(server.target) as client:
        text = "word " * 100
        assert client.complete(text, max_tokens=1).prompt_tokens == len(client.tokenize(text))
        with pytest.raises(grpc.RpcError) as error:  # over the limit by tokens, under the byte bound
            client.complete("x " * limit, max_tokens=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokens, more than max_prompt_tokens" in error.value.details()


# ---------------------------------------------------------------------------------------------- never-reading clients
def _stalled_request() -> bytes:
    return pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(
        max_tokens=200, temperature=0, ignore_eos=True)).SerializeToString()


def test_clients_that_never_read_hold_no_queue_slot(loop_thread, engine_port):
    handle = start_server(loop_thread, engine_port, max_queued_requests=4, write_timeout=120)
    stalled = [StalledCall("127.0.0.1", handle.port, GENERATE_PATH, _stalled_request()) for _ in range(4)]
    try:
        with LoongClient(handle.target) as client:
            wait_until(lambda: client.server_info().open_streams == 4, what="the four stalled calls admitted")
            started = time.monotonic()
            # Their requests run in the engine within a step or two; unread answers hold no queue slot.
            wait_until(lambda: client.server_info().queue_length == 0, timeout=10, what="the queue empty")
            completion = client.complete(PROMPT, max_tokens=4, temperature=0, timeout=10)
            assert completion.finish_reason == "length" and time.monotonic() - started < 10
            assert client.server_info().open_streams == 4  # the stalled calls are still open, just not queued
    finally:
        for call in stalled:
            call.close()
        handle.stop()
    wait_pages_free(engine_port)


def test_a_write_the_client_never_takes_ends_its_call(loop_thread, engine_port):
    handle = start_server(loop_thread, engine_port, write_timeout=1.0)
    stalled = [StalledCall("127.0.0.1", handle.port, GENERATE_PATH, _stalled_request()) for _ in range(2)]
    try:
        wait_until(lambda: handle.server.servicer.open_requests == 0 and engine_port.pages_used() == 0,
                   timeout=30, what="stalled calls ended by the write deadline and their pages freed")
        with LoongClient(handle.target) as client:  # the server serves on
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
    finally:
        for call in stalled:
            call.close()
        handle.stop()


# ---------------------------------------------------------------------------------------------- admission bursts
def _burst_codes(target: str, n: int, prompt: str) -> list[grpc.StatusCode]:
    async def burst() -> list[grpc.StatusCode]:
        async with AsyncLoongClient(target) as client:
            async def one() -> grpc.StatusCode:
                try:
                    await client.complete(prompt, max_tokens=1, temperature=0, timeout=120)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    assert "waiting queue is full" in error.details(), error.details()
                    return error.code()

            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(burst())


@pytest.mark.parametrize("limit_of", ["requests", "tokens"])
def test_50_concurrent_admissions_never_exceed_the_queue_limit(loop_thread, engine, engine_port, limit_of):
    prompt = ("Return the number of words " * 700)[:17_000]  # tokenized in a worker thread: admission awaits
    n_prompt = len(engine_port.tokenizer.encode(prompt))
    limit = dict(max_queued_requests=4) if limit_of == "requests" else dict(max_queued_tokens=4 * n_prompt)
    handle = start_server(loop_thread, engine_port, **limit)
    engine_core = engine.llm.engine
    healthy_step, release = engine_core.step, threading.Event()

    def held_step():  # nothing is scheduled during the burst: every admitted call stays in the queue
        assert release.wait(60)
        return healthy_step()

    engine_core.step = held_step
    results: list = []
    try:
        burst = threading.Thread(target=lambda: results.extend(_burst_codes(handle.target, 50, prompt)))
        burst.start()
        # Every call is answered or admitted while the engine is held; then let the admitted ones run.
        wait_until(lambda: handle.server.servicer.open_requests + _queue_full_answers(handle) >= 50,
                   timeout=60, what="every call of the burst admitted or refused")
        release.set()
        burst.join(120)
    finally:
        release.set()
        engine_core.step = healthy_step
        handle.stop()
    assert results.count(grpc.StatusCode.OK) == 4, results
    assert results.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 46
    wait_pages_free(engine_port)


def test_a_request_the_scheduler_refuses_ends_resource_exhausted(loop_thread, engine, engine_port):
    """What a policy rejects (admission control: too late to meet its deadline) ends its call with
    RESOURCE_EXHAUSTED, not with a normal finish; its pages are free and the server serves on."""
    handle = start_server(loop_thread, engine_port)
    policy = engine.llm.engine.core.policy
    healthy_schedule = policy.schedule
    policy.schedule = lambda view: Plan(rejections=tuple(r.request_id for r in view.waiting)) if view.waiting \
        else healthy_schedule(view)
    try:
        with LoongClient(handle.target) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.complete(PROMPT, max_tokens=4, temperature=0)
            del policy.schedule  # the class's method again
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
    finally:
        policy.__dict__.pop("schedule", None)
        handle.stop()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "scheduler refused" in refused.value.details()
    wait_pages_free(engine_port)


def _queue_full_answers(handle) -> int:
    samples = handle.server.metrics.registry.get_sample_value
    return int(samples("loong_jax_requests_rejected_total", {"code": "RESOURCE_EXHAUSTED"}) or 0)


# ---------------------------------------------------------------------------------------------- ports
@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_serve_on_a_taken_port_says_so_in_one_line(which, capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--port", str(port)] if which == "--port" else ["--port", "0", "--metrics-port", str(port)]
        assert serve_main(["--host", "127.0.0.1", *flags]) == 1
    err = capfd.readouterr().err
    assert err.strip().splitlines() == [f"loong-jax serve: error: cannot listen on 127.0.0.1:{port}"
                                        + (" (metrics)" if which == "--metrics-port" else "")
                                        + ": address already in use"], err


def test_client_without_a_server_says_connection_refused(capsys):
    target = f"127.0.0.1:{_free_port()}"
    assert client_main(["--target", target, "hello"]) == 1
    err = capsys.readouterr().err
    assert f"no server at {target}: connection refused" in err and "not ready" not in err


# ---------------------------------------------------------------------------------------------- drain, model info
def test_second_signal_is_reported_as_such_not_as_a_drain_timeout(loop_thread, engine_port, caplog):
    handle = start_server(loop_thread, engine_port)
    caplog.set_level(logging.WARNING, logger="loong_jax.server.app")
    try:
        with LoongClient(handle.target) as client:
            stream = client.generate(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
            deltas = iter(stream)
            next(deltas)

            async def drain_after_second_signal() -> bool:
                hurry = asyncio.Event()
                hurry.set()
                return await handle.server.drain(timeout=60, hurry=hurry)

            assert loop_thread.run(drain_after_second_signal()) is False
            with pytest.raises(grpc.RpcError):
                list(deltas)
    finally:
        handle.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert "second signal: aborting 1 open requests" in messages, messages
    assert not any("drain timeout" in message for message in messages)
    wait_pages_free(engine_port)


def test_model_info_names_the_model_not_its_path(server):
    with LoongClient(server.target) as client:
        assert client.model_info().model == "demo"
