"""`AsyncLLM`: the engine for asyncio programs (servers, notebooks that stream).

Data flow:
  1. `AsyncLLM(...)` builds an `LLM` (same arguments: `EngineConfig`'s options, or `engine_config=`) and
     starts ONE background thread that owns the engine: nothing else ever steps or changes it, so the
     engine needs no locks.
  2. `async for out in engine.generate(prompt, params, request_id)`: the request is tokenized and validated
     in the caller (`LLM.prepare`: a malformed or empty prompt is a ValueError before anything is queued),
     then posted to the engine thread, which adds it at its next iteration. Each `engine.step()` there
     produces delta outputs, handed to the caller's event loop (`call_soon_threadsafe`) and yielded as they
     come; the last one has `finished=True`.
  3. `await engine.abort(request_id)` (or leaving the `async for` early) posts an abort: the engine frees
     the request's pages at its next iteration, or when the unit the request is part of returns (within one
     step); `abort` returns once the pages are free and the request's final output has left the engine.
     A stream left early stays registered (`_Stream.left`) until that final output comes, which is then
     dropped: its id cannot be reused before, so an old request's output never reaches a new stream.
  4. `shutdown()` aborts what is left and stops the thread.
  5. `is_scheduled(request_id)`: the engine has begun the request (scheduled or already answered); a
     server counts its waiting queue with it, from the engine's state rather than from its own writes.
  6. Introspection from any thread: `snapshot()` (the engine's state at this instant, read without
     stopping the engine thread: `loong_jax.engine.snapshot`), `describe()` (the set-up in force),
     `tokenizer` and `model_config`; a server needs nothing else of the engine.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
from typing import Any, AsyncIterator

from loong_jax.engine.llm_engine import PreparedRequest
from loong_jax.engine.snapshot import EngineSnapshot
from loong_jax.entrypoints.llm import LLM, Prompt
from loong_jax.outputs import RequestOutput
from loong_jax.sampling.params import SamplingParams

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0  # the engine thread sleeps this long at most when it has nothing to do


class EngineDeadError(RuntimeError):
    """The engine thread failed; the error that killed it is the cause."""


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Answer an abort's future, unless its caller gave up waiting (a cancelled `await engine.abort(...)`):
    that must never stop the engine thread."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its caller


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    left: bool = False  # the consumer went away before the final output: outputs are dropped
    ended: bool = False  # the final output (or an error) was handed over: nothing more will come


class AsyncLLM:
    def __init__(self, *args: Any, **kwargs: Any):
        self.llm = LLM(*args, **kwargs)
        self._lock = threading.Lock()
        self._commands: collections.deque = collections.deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._unscheduled: set[str] = set()  # streams whose request the engine has not begun yet
        self._aborts: dict[str, list[tuple[concurrent.futures.Future, bool]]] = {}  # id -> (future, found)
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loong-jax-engine", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------------------------------
    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | dict | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request; leaving the loop early aborts it.

        The prompt forms are `LLM.generate`'s (`loong_jax.entrypoints.prompts`): a malformed or empty one raises
        ValueError at the first iteration, before anything is queued. sampling_params None =
        `SamplingParams()`: temperature 1.0 (sampling) like vLLM; temperature=0 is greedy."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            request = self.llm.prepare(prompt, sampling_params, request_id)  # checks the id's type first
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already running")
            self._streams[request.request_id] = stream
            self._unscheduled.add(request.request_id)
        self._post(("add", request))  # outside the lock: _post takes it (threading.Lock is not reentrant)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, ValueError):  # refused when the engine added it
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine thread failed") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._post(("abort", request.request_id, None))
            with self._lock:
                if stream.ended:
                    self._streams.pop(request.request_id, None)
                    self._unscheduled.discard(request.request_id)
                else:  # the engine still owes this id its final output: keep the id until it comes
                    stream.left = True

    async def abort(self, request_id: str) -> bool:
        """Cancel a request; returns once its pages are free and its final output has left the engine, so its
        id may be used again (False if it was not running)."""
        self._check_alive()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("abort", request_id, done))
        return await asyncio.wrap_future(done)

    def is_scheduled(self, request_id: str) -> bool:
        """The request's stream is open and the engine has begun it (False while it waits or before it is
        posted). Safe from any thread."""
        with self._lock:
            return request_id in self._streams and request_id not in self._unscheduled

    def stats(self) -> dict:
        return self.llm.stats()

    def snapshot(self) -> EngineSnapshot:
        """The engine's state at this instant (queues, KV pages, DoPs, programs, token limits). Safe from any
        thread: plain reads of the engine thread's state, nothing waits for a step."""
        return self.llm.snapshot()

    def describe(self) -> dict:
        """The set-up in force (`LLM.describe`): model, devices, instances x tp, policy, KV pages, ..."""
        return self.llm.describe()

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def model_config(self):
        """The model's config: context length, vocabulary size, layers, heads, dtype."""
        return self.llm.config

    @property
    def dead_error(self) -> BaseException | None:
        """The error that killed the engine thread, or over several processes a lost process (the engine
        thread may then be stuck in a collective with it); None while it runs (the server's health reads it)."""
        return self._dead or self.llm.executor.cluster_failure()

    def shutdown(self) -> None:
        """Abort every running request, stop the engine thread and release the executor."""
        with self._lock:
            self._stopping = True
        self._wakeup.set()
        # A thread stuck in a collective with a lost process never returns: do not wait for it.
        self._thread.join(timeout=None if self.llm.executor.cluster_failure() is None else 1.0)
        self.llm.close()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _post(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
        self._wakeup.set()

    def _check_alive(self) -> None:
        dead = self.dead_error
        if dead is not None:
            raise EngineDeadError("the engine thread failed") from dead
        if self._stopping:
            raise RuntimeError("AsyncLLM is shut down")

    def _run(self) -> None:
        engine = self.llm.engine
        try:
            while True:
                with self._lock:
                    commands, self._commands = list(self._commands), collections.deque()
                    stopping = self._stopping
                    self._wakeup.clear()
                for command in commands:
                    self._handle(engine, command)
                if stopping:
                    for request_id in list(self._streams):
                        engine.abort(request_id)
                if engine.has_unfinished():
                    self._deliver(engine.step())
                    self._note_scheduled(engine)
                    self._resolve_aborts(engine)
                elif stopping:
                    self._resolve_aborts(engine, every=True)  # nothing runs any more: no caller waits forever
                    return
                else:
                    self._resolve_aborts(engine)
                    self._wakeup.wait(IDLE_WAIT_S)
        except BaseException as error:  # every waiting caller learns why, instead of hanging
            logger.exception("engine thread failed")
            self._dead = error
            with self._lock:
                streams = list(self._streams.values())
                aborts = [future for pending in self._aborts.values() for future, _ in pending]
            for stream in streams:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            for future in aborts:
                _settle(future, error=EngineDeadError("the engine thread failed"))

    def _handle(self, engine, command: tuple) -> None:
        if command[0] == "add":
            request: PreparedRequest = command[1]
            try:
                engine.add_request(request)
            except ValueError as error:
                self._deliver_error(request.request_id, error)
            return
        _, request_id, done = command
        running = engine.abort(request_id)
        if done is not None:
            self._aborts.setdefault(request_id, []).append((done, running))  # resolved when the id is free

    def _note_scheduled(self, engine) -> None:
        with self._lock:
            waiting = list(self._unscheduled)
        begun = [request_id for request_id in waiting if engine.was_scheduled(request_id)]
        with self._lock:
            self._unscheduled.difference_update(begun)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._hand_over(output.request_id, output, output.finished)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._hand_over(request_id, error, True)

    def _hand_over(self, request_id: str, item: RequestOutput | BaseException, final: bool) -> None:
        """Queue an output (or an error) for the request's stream; a left stream's final item frees its id."""
        with self._lock:
            self._unscheduled.discard(request_id)  # answered: begun (or refused, or finished)
            stream = self._streams.get(request_id)
            if stream is None:
                return
            stream.ended = stream.ended or final
            if stream.left:
                if final:
                    del self._streams[request_id]
                return
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _resolve_aborts(self, engine, every: bool = False) -> None:
        """An abort returns once the engine no longer runs the request and its final output has left."""
        if not self._aborts:  # the common step: no abort waits (nothing to scan)
            return
        with self._lock:
            owed = set() if every else {r for r, stream in self._streams.items() if not stream.ended}
        for request_id in [r for r in self._aborts if not engine.is_running(r) and r not in owed]:
            for future, found in self._aborts.pop(request_id):
                _settle(future, found)
