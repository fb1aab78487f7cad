"""The `loong_jax.v1.Generation` servicer: admits a call, hands it to the engine, streams the answer.

Data flow of one Generate call:
  1. Refuse early: UNAVAILABLE while the engine loads and warms up, while draining, or once the
     engine has died.
  2. Admit (`admission.Admission`): request id, validated `SamplingParams`, prompt token ids, and
     the limits (prompt length, context, KV capacity, duplicate id); then the waiting queue is checked
     and the call recorded with no await in between (concurrent admissions cannot overshoot it). A
     refusal is the call's status code with a message naming the field. The waiting queue is what
     the engine has not begun yet (`EnginePort.is_scheduled`), whatever the client has read.
  3. Hand the request to the engine, then stream: a `started` message, one `delta` per new piece of a
     sample, then `finished` (finish reason per sample, usage, timings). The engine's outputs are
     awaited together with the engine's death, so a dead engine ends the call with INTERNAL (UNAVAILABLE
     over several processes: a lost process) instead of leaving it hanging. Each message is written with a deadline (`write_timeout_s`): a client that
     stops reading loses its call (and the engine its request) instead of holding them forever.
  4. Whatever way the call ends (finished, client cancel, deadline, error), `finally` closes the
     engine stream and waits for the abort of a request still running — its KV pages are free when
     the id is released — then records the metrics and the request's one log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from loong_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loong_jax.server.admission import (Admission, Rejected, ServingLimits, check_token_ids, encode_text,
                                        render_chat)
from loong_jax.server.engine_port import EngineDeadError, EnginePort
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.generated import generation_pb2_grpc as pb_grpc
from loong_jax.server.logging_setup import log_request_finished
from loong_jax.server.metrics import ServerMetrics
from loong_jax.server.wire import chat_messages_from_proto, delta_to_proto, finished_to_proto

logger = logging.getLogger(__name__)

__all__ = ["GenerationServicer", "ServingLimits", "ServingState"]


@dataclasses.dataclass
class ServingState:
    """What the servicer and the server assembly share: drain and death."""

    draining: bool = False
    dead_reason: str | None = None
    # Set when the engine dies; every open Generate waits on it beside the engine's next output.
    engine_dead: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclasses.dataclass
class _Call:
    """One open Generate call: what the queue limits, the drain and the closing message need."""

    prompt_tokens: int
    peer: str
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    scheduled: bool = False  # the engine has begun it (sticky: read from the engine until true)
    shutdown_aborted: bool = False  # aborted by the server's drain deadline, not by a client
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # sample index -> tokens
    finishes: dict[int, CompletionOutput] = dataclasses.field(default_factory=dict)  # sample -> its last delta
    final: RequestOutput | None = None
    outcome: str = "cancelled"
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED
    detail: str = ""

    def note_finish(self, sample: CompletionOutput) -> None:
        if sample.finish_reason is not None:
            self.finishes[sample.index] = sample

    def note_tokens(self, sample: CompletionOutput, now: float) -> float | None:
        """Counts a sample's new tokens; returns the seconds since the call's previous delta."""
        self.completion_tokens[sample.index] = self.completion_tokens.get(sample.index, 0) + len(sample.token_ids)
        gap = None if self.last_token_at is None else now - self.last_token_at
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.scheduled = True
        return gap

    def end(self, outcome: str, code: grpc.StatusCode, detail: str = "") -> None:
        self.outcome, self.code, self.detail = outcome, code, detail

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: EnginePort, limits: ServingLimits, metrics: ServerMetrics, state: ServingState):
        self._engine = engine
        self._admission = Admission(engine, limits)
        self._limits = limits
        self._metrics = metrics
        self._state = state
        self._calls: dict[str, _Call] = {}

    # ------------------------------------------------------------------ what the server assembly reads
    @property
    def open_requests(self) -> int:
        return len(self._calls)

    def queued(self) -> tuple[int, int]:
        """(requests, prompt tokens) of this server's calls that the engine has not begun: waiting in its
        queue or about to be handed to it. Read from the engine, not from what was written to the client,
        so a client that never reads holds no queue slot once its request runs."""
        for request_id, call in self._calls.items():
            if not call.scheduled:
                call.scheduled = self._engine.is_scheduled(request_id)
        waiting = [call for call in self._calls.values() if not call.scheduled]
        return len(waiting), sum(call.prompt_tokens for call in waiting)

    async def abort_all_for_shutdown(self) -> int:
        """Drain deadline passed: abort every open request (their calls end UNAVAILABLE)."""
        open_calls = list(self._calls.items())
        for _, call in open_calls:
            call.shutdown_aborted = True
        await asyncio.gather(*(self._engine.abort(request_id) for request_id, _ in open_calls),
                             return_exceptions=True)
        return len(open_calls)

    # ------------------------------------------------------------------ helpers
    def _dead_reason(self) -> str | None:
        return self._state.dead_reason or self._engine.dead_reason()

    async def _reject(self, context, code: grpc.StatusCode, message: str) -> None:
        self._metrics.observe_rejected(code.name)
        await context.abort(code, message)

    async def _refuse_if_unavailable(self, context) -> None:
        if (reason := self._dead_reason()) is not None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"the engine is not running ({reason})")
        if self._state.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another one")
        if not self._engine.is_ready():
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the model is loading and warming up; retry")

    async def _write(self, context, message: pb.GenerateResponse) -> None:
        """One response message, taken by the client (HTTP/2 flow control) within `write_timeout_s`."""
        try:
            async with asyncio.timeout(self._limits.write_timeout_s):
                await context.write(message)
        except TimeoutError:
            raise _ClientNotReading() from None

    async def _next_or_death(self, next_output: asyncio.Future, dead_waiter: asyncio.Future) -> RequestOutput:
        """The engine's next output (`next_output`); raises EngineDeadError as soon as the engine dies."""
        try:
            await asyncio.wait({next_output, dead_waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # client cancel or deadline: let the engine stream close first
            await _cancel_and_wait(next_output)
            raise
        if next_output.done():
            return next_output.result()  # StopAsyncIteration ends the stream
        await _cancel_and_wait(next_output)
        raise EngineDeadError(self._dead_reason() or "the engine loop died")

    # ------------------------------------------------------------------ Generate
    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        """Server streaming through `context.write` (not `yield`), so that every write has a deadline."""
        peer = context.peer()  # read while the call is alive: grpc.aio crashes on peer() of a cancelled call
        await self._refuse_if_unavailable(context)
        try:
            admitted = await self._admission.admit(request, self._calls)
            # No await from here to the call's record: the queue count cannot change in between.
            self._admission.check_queue(len(admitted.prompt_ids), *self.queued())
        except Rejected as err:
            await self._reject(context, err.code, err.message)
        request_id = admitted.request_id
        call = self._calls[request_id] = _Call(prompt_tokens=len(admitted.prompt_ids), peer=peer)
        self._metrics.open_streams.inc()
        dead_waiter = asyncio.ensure_future(self._state.engine_dead.wait())
        outputs = self._engine.generate(admitted.prompt_ids, admitted.params, request_id)
        # Started now, not after the first write: the request reaches the engine even if that write stalls.
        next_output: asyncio.Future | None = asyncio.ensure_future(anext(outputs))
        try:
            await self._write(context, pb.GenerateResponse(request_id=request_id, started=pb.GenerateStarted(
                prompt_tokens=call.prompt_tokens)))
            while call.final is None:
                output = await self._next_or_death(next_output or asyncio.ensure_future(anext(outputs)),
                                                   dead_waiter)
                next_output = None
                now = time.monotonic()
                for sample in output.outputs:
                    call.note_finish(sample)
                    if sample.token_ids or sample.text:
                        self._metrics.observe_tokens(len(sample.token_ids), call.note_tokens(sample, now))
                        await self._write(context, pb.GenerateResponse(request_id=request_id,
                                                                       delta=delta_to_proto(sample)))
                if output.finished:
                    call.final = output
            if call.shutdown_aborted:
                call.end("shutdown", grpc.StatusCode.UNAVAILABLE, "drain timeout passed")
                await context.abort(call.code, "server shut down before the request finished (drain timeout)")
            if call.final.finish_reason == "rejected":  # the scheduler refused it (e.g. admission control)
                call.end("rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, "refused by the scheduler")
                await context.abort(call.code, "the scheduler refused the request: it cannot fit the instances or, "
                                               "with admission control, meet its deadline under the present load")
            call.end(call.final.finish_reason or "stop", grpc.StatusCode.OK)
            await self._write(context, pb.GenerateResponse(request_id=request_id, finished=finished_to_proto(
                call.prompt_tokens, admitted.params.n, call.finishes, call.completion_tokens, call.final.metrics)))
        except (EngineDeadError, StopAsyncIteration) as err:  # a stream must end with a finished output
            # Over several processes a death is a lost process: UNAVAILABLE (retry elsewhere), not INTERNAL.
            code = grpc.StatusCode.UNAVAILABLE if self._engine.death_is_unavailable() else grpc.StatusCode.INTERNAL
            call.end("error", code, self._dead_reason() or str(err) or "stream ended early")
            await context.abort(call.code, f"the engine loop died: {call.detail}")
        except ValueError as err:  # the engine's own validation (e.g. an id running via another server)
            call.end("rejected", grpc.StatusCode.INVALID_ARGUMENT, str(err))
            await self._reject(context, call.code, str(err))
        except _ClientNotReading:
            detail = f"the client took no response message for {self._limits.write_timeout_s:g} s"
            call.end("stalled", grpc.StatusCode.CANCELLED, detail)
            # No status can reach a client that does not read (it would queue behind the stuck message, and
            # grpc refuses a second send while one is pending): end the handler as a cancelled call does.
            raise asyncio.CancelledError(detail) from None
        finally:
            dead_waiter.cancel()
            if next_output is not None:  # the engine stream must be idle before it is closed
                await _cancel_and_wait(next_output)
            await self._release(request_id, call, outputs)

    async def _release(self, request_id: str, call: _Call, outputs) -> None:
        # Closing the engine stream before its last output aborts the request; waiting for the abort
        # keeps the id reserved until the engine has freed the request's pages (within one step).
        await _close_quietly(outputs)
        if call.final is None:
            try:
                await self._engine.abort(request_id)
            except (Exception, asyncio.CancelledError):  # a dead engine has nothing left to free
                logger.debug("abort after the call ended failed", exc_info=True)
        del self._calls[request_id]
        self._metrics.open_streams.dec()
        self._record_finished(request_id, call)

    def _record_finished(self, request_id: str, call: _Call) -> None:
        timings: RequestMetrics | None = call.final.metrics if call.final is not None else None
        if timings is not None:
            queue_s, ttft_s, e2e_s = timings.queue_time, timings.time_to_first_token, timings.latency
        else:  # ended before the engine finished it: the server's own clock
            queue_s = None
            ttft_s = None if call.first_token_at is None else call.first_token_at - call.arrival
            e2e_s = time.monotonic() - call.arrival
        self._metrics.observe_finished(call.outcome, call.prompt_tokens, queue_s, ttft_s, e2e_s)
        log_request_finished(request_id=request_id, outcome=call.outcome, code=call.code.name,
                             prompt_tokens=call.prompt_tokens, completion_tokens=call.total_completion_tokens,
                             queue_s=queue_s, time_to_first_token_s=ttft_s, e2e_s=e2e_s, peer=call.peer,
                             message=call.detail)

    # ------------------------------------------------------------------ unary calls
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if request.request_id not in self._calls:  # only requests of this server's clients
            return pb.AbortResponse(found=False)
        return pb.AbortResponse(found=await self._engine.abort(request.request_id))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        await self._refuse_if_unavailable(context)
        tokenizer = self._engine.tokenizer
        try:
            arm = request.WhichOneof("input")
            if arm is None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "input: one of text or messages is required")
            if arm == "text":
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = await encode_text(tokenizer, request.text, add_special)
            elif request.HasField("add_special_tokens"):
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                               "add_special_tokens: applies to text only (a chat template writes its own)")
            else:
                ids = await render_chat(tokenizer, chat_messages_from_proto(request.messages))
        except Rejected as err:
            await self._reject(context, err.code, err.message)
        return pb.TokenizeResponse(token_ids=ids, tokens=[tokenizer.id_to_token(i) or "" for i in ids])

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        await self._refuse_if_unavailable(context)
        tokenizer = self._engine.tokenizer
        try:
            check_token_ids(request.token_ids, tokenizer.vocab_size, "token_ids")
        except Rejected as err:
            await self._reject(context, err.code, err.message)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=tokenizer.decode(list(request.token_ids), skip_special_tokens=skip))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        await self._refuse_if_unavailable(context)
        return self._engine.model_info(self._admission.max_prompt_tokens())

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        """Answers while loading and draining too: operators watch those phases with it."""
        info = self._engine.server_info()
        queued_requests, queued_tokens = self.queued()
        info.queue_length = max(info.queue_length, queued_requests)
        info.queued_tokens = max(info.queued_tokens, queued_tokens)
        info.ready = self._engine.is_ready() and not self._state.draining and self._dead_reason() is None
        info.draining = self._state.draining
        info.max_queued_requests = self._limits.max_queued_requests
        info.max_queued_tokens = self._limits.max_queued_tokens
        info.open_streams = len(self._calls)
        return info


class _ClientNotReading(Exception):
    """A response message was not taken within the write deadline."""


async def _cancel_and_wait(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_quietly(outputs) -> None:
    try:
        await outputs.aclose()
    except (Exception, asyncio.CancelledError):  # a generator cut short may complain; its request is aborted
        logger.debug("closing an engine stream raised", exc_info=True)
