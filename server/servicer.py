"""The `loong_jax.v1.Generation` servicer: validates a call, hands it to the engine, streams the answer.

Data flow of one Generate call:
  1. Refuse early: UNAVAILABLE while the engine loads and warms up, while draining, or once the
     engine has died.
  2. Prepare (`_prepare`): request id (given or fresh), `SamplingParams` from the proto (a bad value
     -> INVALID_ARGUMENT naming the field), the prompt as token ids (text is tokenized here, chat
     messages go through the model's template), then the limits: empty prompt, prompt over
     `max_prompt_tokens`, prompt + max_tokens over the context length (INVALID_ARGUMENT), over the
     cluster's KV (RESOURCE_EXHAUSTED), a request id already running (ALREADY_EXISTS), the waiting
     queue full by requests or by tokens (RESOURCE_EXHAUSTED).
  3. Stream: a `started` message, then one `delta` per new piece of a sample, then `finished`
     (finish reason per sample, usage, timings). The engine's outputs are awaited together with the
     engine's death, so a dead engine ends the call with INTERNAL instead of leaving it hanging.
  4. Whatever way the call ends (finished, client cancel, deadline, error), `finally` aborts the
     request in the engine if it is still running — that frees its KV pages — and records metrics
     and the one log line of the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import grpc

from loong_jax.outputs import CompletionOutput
from loong_jax.server.engine_port import EngineDeadError, EnginePort
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.generated import generation_pb2_grpc as pb_grpc
from loong_jax.server.logging_setup import log_request_finished
from loong_jax.server.metrics import ServerMetrics
from loong_jax.server.wire import (chat_messages_from_proto, delta_to_proto, sample_finish_to_proto,
                                   sampling_from_proto, timings_to_proto)
from loong_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
INLINE_TOKENIZE_CHARS = 16_384  # longer texts are tokenized off the event loop


class Rejected(Exception):
    """A call refused before it reaches the engine: a status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    max_prompt_tokens: int | None = None  # None = the model's context length - 1
    max_queued_requests: int = 0  # 0 = unlimited
    max_queued_tokens: int = 0  # 0 = unlimited


@dataclasses.dataclass
class ServingState:
    """What the servicer and the server assembly share: drain and death."""

    draining: bool = False
    dead_reason: str | None = None
    # Set when the engine dies; every open Generate waits on it beside the engine's next output.
    engine_dead: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclasses.dataclass
class _ActiveRequest:
    prompt_tokens: int
    queued: bool = True  # accepted, no token streamed yet
    shutdown_aborted: bool = False  # aborted by the server's drain deadline, not by a client


@dataclasses.dataclass
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def _check_request_id(request: pb.GenerateRequest) -> str:
    if not request.HasField("request_id"):
        return uuid.uuid4().hex
    request_id = request.request_id
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS or not all(" " <= c <= "~" for c in request_id):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                       f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters, "
                       f"got {request_id[:40]!r}{'...' if len(request_id) > 40 else ''}")
    return request_id


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: EnginePort, limits: ServingLimits, metrics: ServerMetrics, state: ServingState):
        self._engine = engine
        self._limits = limits
        self._metrics = metrics
        self._state = state
        self._active: dict[str, _ActiveRequest] = {}

    # ------------------------------------------------------------------ bookkeeping the server reads
    @property
    def open_requests(self) -> int:
        return len(self._active)

    def queued(self) -> tuple[int, int]:
        """(requests, prompt tokens) accepted by this server that have not streamed a token yet."""
        waiting = [active for active in self._active.values() if active.queued]
        return len(waiting), sum(active.prompt_tokens for active in waiting)

    def max_prompt_tokens(self) -> int:
        room = self._engine.context_length - 1  # at least one token must be generated
        return room if self._limits.max_prompt_tokens is None else min(self._limits.max_prompt_tokens, room)

    async def abort_all_for_shutdown(self) -> int:
        """Drain deadline passed: abort every open request (their calls end UNAVAILABLE)."""
        open_requests = list(self._active.items())
        for _, active in open_requests:
            active.shutdown_aborted = True
        await asyncio.gather(*(self._engine.abort(request_id) for request_id, _ in open_requests),
                             return_exceptions=True)
        return len(open_requests)

    # ------------------------------------------------------------------ helpers
    def _dead_reason(self) -> str | None:
        return self._state.dead_reason or self._engine.dead_reason()

    async def _refuse_if_unavailable(self, context) -> None:
        if (reason := self._dead_reason()) is not None:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, f"the engine is not running ({reason})")
        if self._state.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another one")
        if not self._engine.is_ready():
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the model is loading and warming up; retry")

    async def _reject(self, context, code: grpc.StatusCode, message: str) -> None:
        self._metrics.observe_rejected(code.name)
        await context.abort(code, message)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        tokenizer = self._engine.tokenizer
        arm = request.WhichOneof("prompt")
        if arm is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "prompt: one of text, token_ids or messages is required")
        if arm == "text":
            if not request.text:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "text: the prompt is empty")
            if len(request.text) > INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(tokenizer.encode, request.text)
            return tokenizer.encode(request.text)
        if arm == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids: the prompt is empty")
            vocab_size = self._engine.vocab_size
            for index, token in enumerate(ids):
                if not 0 <= token < vocab_size:
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"token_ids.ids[{index}] must be a token id in [0, {vocab_size - 1}], got {token}")
            return ids
        messages = chat_messages_from_proto(request.messages)
        if not messages:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "messages: the conversation is empty")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except ValueError as err:  # TokenizerError: no template, or the template refused the messages
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"messages: {err}") from None
        if not ids:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "messages: the chat template rendered an empty prompt")
        return ids

    async def _prepare(self, request: pb.GenerateRequest) -> _Prepared:
        request_id = _check_request_id(request)
        try:
            params = sampling_from_proto(request.sampling)
            params.check_vocab(self._engine.vocab_size)
        except ValueError as err:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {err}") from None
        prompt_ids = await self._prompt_ids(request)
        n_prompt = len(prompt_ids)
        limit = self.max_prompt_tokens()
        if n_prompt > limit:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"prompt has {n_prompt} tokens, more than max_prompt_tokens ({limit})")
        context_length = self._engine.context_length
        if n_prompt + params.max_tokens > context_length:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                           f"sampling.max_tokens: prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) "
                           f"exceeds the model's context length ({context_length})")
        longest_prompt, largest_peak = self._engine.token_limits()
        peak = n_prompt + params.max_tokens - 1  # KV holds every token but the last generated one
        if n_prompt > longest_prompt or peak > largest_peak:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request can never fit this cluster's KV: it needs {peak} tokens (prompt {n_prompt} + "
                           f"max_tokens {params.max_tokens} - 1), at most {largest_peak} fit one request "
                           f"(prompts up to {longest_prompt}); lower max_tokens or shorten the prompt")
        if request_id in self._active:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running")
        queued_requests, queued_tokens = self.queued()
        if self._limits.max_queued_requests and queued_requests >= self._limits.max_queued_requests:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"waiting queue is full ({queued_requests} requests, --max-queued-requests "
                           f"{self._limits.max_queued_requests}); retry later")
        if self._limits.max_queued_tokens and queued_tokens + n_prompt > self._limits.max_queued_tokens:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"waiting queue is full ({queued_tokens} + {n_prompt} prompt tokens over "
                           f"--max-queued-tokens {self._limits.max_queued_tokens}); retry later")
        return _Prepared(request_id, prompt_ids, params)

    async def _next_or_death(self, outputs, dead_waiter: asyncio.Future):
        """The engine's next output; raises EngineDeadError as soon as the engine dies."""
        next_output = asyncio.ensure_future(outputs.__anext__())
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
    async def Generate(self, request: pb.GenerateRequest, context):
        # Read the peer while the call is alive: grpc.aio crashes on peer() of a call already cancelled.
        peer = context.peer()
        await self._refuse_if_unavailable(context)
        try:
            prepared = await self._prepare(request)
        except Rejected as err:
            await self._reject(context, err.code, err.message)
        request_id = prepared.request_id
        active = self._active[request_id] = _ActiveRequest(prompt_tokens=len(prepared.prompt_ids))
        self._metrics.open_streams.inc()
        arrival = time.monotonic()
        first_token_at = last_token_at = None
        completion_tokens: dict[int, int] = {}
        finish_outputs = {}  # sample index -> its CompletionOutput carrying the finish reason
        final = None
        outcome, code, detail = "cancelled", grpc.StatusCode.CANCELLED, ""
        dead_waiter = asyncio.ensure_future(self._state.engine_dead.wait())
        outputs = self._engine.generate(prepared.prompt_ids, prepared.params, request_id)
        try:
            yield pb.GenerateResponse(request_id=request_id,
                                      started=pb.GenerateStarted(prompt_tokens=len(prepared.prompt_ids)))
            while True:
                try:
                    output = await self._next_or_death(outputs, dead_waiter)
                except StopAsyncIteration:
                    break
                now = time.monotonic()
                for sample in output.outputs:
                    if sample.finish_reason is not None:
                        finish_outputs[sample.index] = sample
                    if not sample.token_ids and not sample.text:
                        continue
                    completion_tokens[sample.index] = completion_tokens.get(sample.index, 0) + len(sample.token_ids)
                    self._metrics.observe_tokens(len(sample.token_ids),
                                                 None if last_token_at is None else now - last_token_at)
                    first_token_at = first_token_at or now
                    last_token_at = now
                    active.queued = False
                    yield pb.GenerateResponse(request_id=request_id, delta=delta_to_proto(sample))
                if output.finished:
                    final = output
                    break
            if final is None:
                raise EngineDeadError("the engine ended the stream without a finished output")
            if active.shutdown_aborted:
                outcome, code, detail = "shutdown", grpc.StatusCode.UNAVAILABLE, "drain timeout passed"
                await context.abort(code, "server shut down before the request finished (drain timeout)")
            # Samples finish at different steps: each one's finish reason came with its own last delta.
            samples = [sample_finish_to_proto(finish_outputs.get(index, CompletionOutput(index=index)),
                                              completion_tokens.get(index, 0))
                       for index in range(prepared.params.n)]
            n_completion = sum(completion_tokens.values())
            outcome, code = final.finish_reason or "stop", grpc.StatusCode.OK
            yield pb.GenerateResponse(request_id=request_id, finished=pb.GenerateFinished(
                finish_reason=samples[0].finish_reason, samples=samples,
                usage=pb.Usage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=n_completion,
                               total_tokens=len(prepared.prompt_ids) + n_completion),
                timings=timings_to_proto(final.metrics)))
        except EngineDeadError as err:
            detail = self._dead_reason() or str(err)
            outcome, code = "error", grpc.StatusCode.INTERNAL
            await context.abort(code, f"the engine loop died: {detail}")
        except ValueError as err:  # the engine's own validation (e.g. an id running via another server)
            outcome, code, detail = "rejected", grpc.StatusCode.INVALID_ARGUMENT, str(err)
            await self._reject(context, code, str(err))
        finally:
            dead_waiter.cancel()
            # Closing the engine stream before its last output aborts the request; waiting for the abort
            # keeps the id reserved until the engine has freed the request's pages (within one step).
            await _close_quietly(outputs)
            if final is None:
                try:
                    await self._engine.abort(request_id)
                except (Exception, asyncio.CancelledError):  # a dead engine frees nothing more
                    logger.debug("abort after the call ended failed", exc_info=True)
            del self._active[request_id]
            self._metrics.open_streams.dec()
            timings = final.metrics if final is not None else None
            self._record_finished(request_id, outcome, code, len(prepared.prompt_ids),
                                  sum(completion_tokens.values()), arrival, first_token_at, timings, peer, detail)

    def _record_finished(self, request_id, outcome, code, prompt_tokens, completion_tokens, arrival,
                         first_token_at, timings, peer, detail) -> None:
        now = time.monotonic()
        queue_s = timings.queue_time if timings is not None else None
        ttft_s = (timings.time_to_first_token if timings is not None
                  else None if first_token_at is None else first_token_at - arrival)
        e2e_s = timings.latency if timings is not None and timings.latency is not None else now - arrival
        self._metrics.observe_finished(outcome, prompt_tokens, queue_s, ttft_s, e2e_s)
        log_request_finished(request_id=request_id, outcome=outcome, code=code.name, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, queue_s=queue_s, time_to_first_token_s=ttft_s,
                             e2e_s=e2e_s, peer=peer, message=detail)

    # ------------------------------------------------------------------ unary calls
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        if request.request_id not in self._active:  # only requests of this server's clients
            return pb.AbortResponse(found=False)
        return pb.AbortResponse(found=await self._engine.abort(request.request_id))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        await self._refuse_if_unavailable(context)
        tokenizer = self._engine.tokenizer
        arm = request.WhichOneof("input")
        if arm is None:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, "input: one of text or messages is required")
        if arm == "text":
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            if len(request.text) > INLINE_TOKENIZE_CHARS:
                ids = await asyncio.to_thread(tokenizer.encode, request.text, add_special)
            else:
                ids = tokenizer.encode(request.text, add_special)
        else:
            if request.HasField("add_special_tokens"):
                await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                                   "add_special_tokens: applies to text only (a chat template writes its own)")
            try:
                ids = tokenizer.apply_chat_template(chat_messages_from_proto(request.messages), tokenize=True)
            except ValueError as err:
                await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, f"messages: {err}")
        return pb.TokenizeResponse(token_ids=ids, tokens=[tokenizer.id_to_token(i) or "" for i in ids])

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        await self._refuse_if_unavailable(context)
        tokenizer = self._engine.tokenizer
        vocab_size = tokenizer.vocab_size
        for index, token in enumerate(request.token_ids):
            if not 0 <= token < vocab_size:
                await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT,
                                   f"token_ids[{index}] must be a token id in [0, {vocab_size - 1}], got {token}")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=tokenizer.decode(list(request.token_ids), skip_special_tokens=skip))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        await self._refuse_if_unavailable(context)
        return self._engine.model_info(self.max_prompt_tokens())

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = self._engine.server_info()
        queued_requests, queued_tokens = self.queued()
        info.queue_length = max(info.queue_length, queued_requests)
        info.queued_tokens = max(info.queued_tokens, queued_tokens)
        info.ready = self._engine.is_ready() and not self._state.draining and self._state.dead_reason is None
        info.draining = self._state.draining
        info.open_streams = len(self._active)
        info.max_queued_requests = self._limits.max_queued_requests
        info.max_queued_tokens = self._limits.max_queued_tokens
        return info


async def _cancel_and_wait(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_quietly(outputs) -> None:
    try:
        await outputs.aclose()
    except (Exception, asyncio.CancelledError):  # a generator cut short may complain; its request is aborted
        logger.debug("closing an engine stream raised", exc_info=True)
