"""The load generator: send requests at their arrival times over gRPC and time every streamed chunk.

Data flow:
  1. `run_load(client, requests, send_times, ...)` starts one asyncio task per request at its send time
     (offsets from `arrivals.arrival_times`); with `max_concurrency` a semaphore holds a request back until
     fewer than that many are in flight, and its send time is when it really goes out (as vLLM does).
  2. Each task opens one streaming `Generate` call (`AsyncLoongClient.generate`, token-id prompt, greedy,
     `max_tokens` = the request's output length) and appends (time, tokens) for every delta it receives;
     a gRPC error is recorded on the request, never raised, so one failure does not stop the run.
  3. A tqdm bar counts finished requests. The run's duration is from the first send to the last finish;
     `metrics.compute_metrics` turns the results into the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Sequence

import grpc

from loong_jax.bench.datasets import BenchRequest
from loong_jax.bench.metrics import RequestResult


async def send_one(client: Any, request: BenchRequest, sampling: dict, clock_start: float,
                   timeout: float | None) -> RequestResult:
    """One streamed request, timed on the run's clock (seconds since `clock_start`)."""
    result = RequestResult(input_len=request.input_len, send_time=time.perf_counter() - clock_start)
    try:
        stream = client.generate(list(request.prompt_token_ids), timeout=timeout,
                                 **{**sampling, "max_tokens": request.output_len})
        async for delta in stream:
            result.chunks.append((time.perf_counter() - clock_start, len(delta.token_ids)))
        result.finish_time = time.perf_counter() - clock_start
        completion = stream.completion
        result.finish_reason = completion.finish_reason if completion is not None else None
        if completion is None:
            result.error = "stream ended without a finished message"
    except grpc.aio.AioRpcError as error:
        result.error = f"{error.code().name}: {error.details()}"
    except Exception as error:  # noqa: BLE001 - whatever breaks one stream is that request's failure
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(client: Any, requests: Sequence[BenchRequest], send_times: Sequence[float], *,
                   sampling: dict | None = None, max_concurrency: int | None = None, progress: bool = True,
                   timeout: float | None = None, description: str = "bench") -> tuple[list[RequestResult], float]:
    """Send every request at its offset; returns the results (in request order) and the run's duration."""
    if len(send_times) != len(requests):
        raise ValueError(f"{len(send_times)} send times for {len(requests)} requests")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    sampling = dict(sampling or {})
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=description, unit="req", disable=None)
    start = time.perf_counter()

    async def scheduled(request: BenchRequest) -> RequestResult:
        async with gate:
            result = await send_one(client, request, sampling, start, timeout)
        if bar is not None:
            bar.update(1)
        return result

    tasks = []
    try:
        for request, offset in zip(requests, send_times):
            delay = start + float(offset) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(scheduled(request)))
        results = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        if bar is not None:
            bar.close()
    ends = [r.finish_time for r in results if r.finish_time is not None]
    duration = (max(ends) if ends else time.perf_counter() - start) - min(r.send_time for r in results)
    return results, max(duration, 1e-9)
