"""Load over loopback: 200 concurrent streams, 50 of them cancelled mid-stream, and the queue limits."""

from __future__ import annotations

import asyncio

import grpc

from loong_jax.sampling.params import SamplingParams
from loong_jax.server.client import AsyncLoongClient
from tests.server.harness import start_server, wait_pages_free, wait_until

N_CLIENTS = 200
N_CANCELLED = 50
N_CHANNELS = 4
MAX_TOKENS = 4
PROMPTS = ["Return the number of", "This module provides", "Create a new socket", "If the file does not",
           "Streams of bytes are", "A server answers", "The argument may be", "Each request is"]


def _references(reference_llm) -> dict[str, list[int]]:
    outputs = reference_llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                                     use_tqdm=False)
    return {prompt: output.token_ids for prompt, output in zip(PROMPTS, outputs)}


async def _load(target: str) -> tuple[list, list[str], int]:
    clients = [AsyncLoongClient(target) for _ in range(N_CHANNELS)]
    cancelled_after: list[int] = []

    async def complete(index: int):
        client = clients[index % N_CHANNELS]
        return index, await client.complete(PROMPTS[index % len(PROMPTS)], max_tokens=MAX_TOKENS,
                                            temperature=0.0, timeout=120)

    async def cancel_mid_stream(index: int) -> str:
        client = clients[index % N_CHANNELS]
        stream = client.generate(PROMPTS[index % len(PROMPTS)], max_tokens=200, temperature=0.0, ignore_eos=True,
                                 request_id=f"cancel-{index}", timeout=120)
        received = 0
        try:
            async for delta in stream:
                received += len(delta.token_ids)
                if received >= 2:
                    stream.cancel()
        except asyncio.CancelledError:  # grpc.aio raises this on the iterating side after cancel()
            pass
        cancelled_after.append(received)
        return stream.request_id

    try:
        kinds = [index % 4 == 3 for index in range(N_CLIENTS)]  # every 4th is cancelled: 50 of 200
        results = await asyncio.gather(*(cancel_mid_stream(i) if cancelled else complete(i)
                                         for i, cancelled in enumerate(kinds)))
    finally:
        for client in clients:
            await client.close()
    completions = [r for r, cancelled in zip(results, kinds) if not cancelled]
    cancelled_ids = [r for r, cancelled in zip(results, kinds) if cancelled]
    return completions, cancelled_ids, max(cancelled_after)


def test_200_concurrent_streams_and_50_cancelled(server, engine_port, reference_llm):
    expected = _references(reference_llm)
    completions, cancelled_ids, most_received = asyncio.run(_load(server.target))
    assert len(completions) == N_CLIENTS - N_CANCELLED and len(cancelled_ids) == N_CANCELLED
    for index, completion in completions:
        assert completion.token_ids == expected[PROMPTS[index % len(PROMPTS)]]
        assert completion.finish_reason in ("length", "stop")
    assert most_received < 200  # cancelled mid-stream, long before max_tokens
    wait_until(lambda: server.server.servicer.open_requests == 0, what="every call's handler finished")
    wait_pages_free(engine_port)  # the 50 cancelled requests gave their pages back


async def _burst(target: str, n: int) -> list[grpc.StatusCode]:
    async with AsyncLoongClient(target) as client:
        async def one(index: int) -> grpc.StatusCode:
            try:
                await client.complete(PROMPTS[index % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0.0,
                                      timeout=120)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                assert "waiting queue is full" in error.details()
                return error.code()

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_queue_limits_answer_resource_exhausted(loop_thread, engine_port):
    for limit in (dict(max_queued_requests=3), dict(max_queued_tokens=3 * 8)):
        handle = start_server(loop_thread, engine_port, **limit)
        try:
            codes = asyncio.run(_burst(handle.target, 48))
        finally:
            handle.stop()
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, limit
        assert codes.count(grpc.StatusCode.OK) >= 2, limit
    wait_pages_free(engine_port)
