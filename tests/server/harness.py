"""Helpers for the server tests: an event loop in a thread that hosts real servers on loopback.

1. `LoopThread` runs one asyncio loop in a daemon thread; `run(coro)` executes a coroutine there and
   returns its result (bounded by a timeout), so blocking test code can drive async servers.
2. `ServerHandle` is one `GenerationServer` started on 127.0.0.1 with an ephemeral port, over an
   `EnginePort`; `target` is what clients dial; `stop()` closes it.
3. `wait_until(predicate)` polls with a deadline (never an unbounded loop); `wait_pages_free(port)`
   waits for the engine to hand every KV page back.
4. `collect(stream)` drains a sync client stream into its `Completion`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Callable

import grpc

from loong_jax.server.app import GenerationServer, ServerOptions
from loong_jax.server.engine_port import EnginePort

DEFAULT_TIMEOUT_S = 60.0


class LoopThread:
    def __init__(self, name: str = "server-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float = DEFAULT_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclasses.dataclass
class ServerHandle:
    server: GenerationServer
    loop: LoopThread

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def engine_port(self) -> EnginePort:
        return self.server.engine

    def stop(self) -> None:
        self.loop.run(self.server.stop(grace=0.5))


def start_server(loop: LoopThread, engine_port: EnginePort, **options) -> ServerHandle:
    options.setdefault("host", "127.0.0.1")
    options.setdefault("port", 0)
    server = GenerationServer(engine_port, ServerOptions(**options))
    loop.run(server.start())
    handle = ServerHandle(server, loop)
    wait_until(lambda: engine_port.is_ready(), what="engine ready")
    return handle


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_pages_free(engine_port: EnginePort, timeout: float = 30.0) -> None:
    """Every KV page of every instance free again (the engine finishes aborts within a step)."""
    wait_until(lambda: engine_port.pages_used() == 0, timeout, what="all KV pages free")
    engine_port.engine.llm.engine.state.allocator.check_invariants()


def collect(stream):
    for _ in stream:
        pass
    return stream.completion


def status_code(call) -> grpc.StatusCode:
    """The gRPC status a blocking call ends with (OK when it returns)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK
