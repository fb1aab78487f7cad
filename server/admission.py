"""Admission of a Generate call: validation and limits, before anything reaches the engine.

Data flow of `Admission.admit(request, running_ids)`:
  1. The request id: the client's (1-128 printable ASCII characters) or a fresh one.
  2. `SamplingParams` from the proto; a bad value raises INVALID_ARGUMENT naming the field (the
     engine's own validation is the single source of the ranges).
  3. The prompt as token ids, checked by `loong_jax.entrypoints.prompts` as the Python API checks it (so both refuse
     the same prompts: empty text, ids or chat, ids outside the vocabulary, empty roles): text is tokenized
     (long texts off the event loop), chat messages go through the model's template. Before that, text
     and chat contents longer in bytes than `max_prompt_tokens` tokens can ever spell are refused
     (`check_prompt_size`: no tokenizing of megabytes only to refuse them); long texts are tokenized
     and long chats rendered in a worker thread (the tokenizer releases the GIL), so a huge prompt
     stalls neither the event loop nor the engine thread.
  4. Limits, in the order a client can act on them: prompt over `max_prompt_tokens` and prompt +
     max_tokens over the context (INVALID_ARGUMENT), more KV than the cluster can ever hold for one
     request (RESOURCE_EXHAUSTED), the id already running (ALREADY_EXISTS).
  5. `check_queue(n_prompt, queued_requests, queued_tokens)`: the waiting queue full by requests or
     by prompt tokens (RESOURCE_EXHAUSTED). The servicer calls it with the counts of that moment and
     records the call with no await in between, so concurrent admissions cannot overshoot a limit.
Every refusal is a `Rejected(code, message)`; the servicer turns it into the call's status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Container, Sequence

import grpc

from loong_jax.entrypoints import prompts
from loong_jax.sampling.params import SamplingParams
from loong_jax.server.engine_port import EnginePort
from loong_jax.server.generated import generation_pb2 as pb
from loong_jax.server.wire import chat_messages_from_proto, sampling_from_proto

MAX_REQUEST_ID_CHARS = 128
INLINE_TOKENIZE_CHARS = 16_384  # longer texts are tokenized in a worker thread
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


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
    write_timeout_s: float = 30.0  # a response message the client does not take within this ends its call


@dataclasses.dataclass(frozen=True)
class Admitted:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def request_id_of(request: pb.GenerateRequest) -> str:
    if not request.HasField("request_id"):
        return uuid.uuid4().hex
    request_id = request.request_id
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS or not all(" " <= c <= "~" for c in request_id):
        shown = request_id[:40] + ("..." if len(request_id) > 40 else "")
        raise Rejected(INVALID, f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters, "
                                f"got {shown!r}")
    return request_id


async def encode_text(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    if len(text) > INLINE_TOKENIZE_CHARS:  # megabytes of text would stall every other call
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
    return tokenizer.encode(text, add_special_tokens)


def check_prompt_size(texts: Sequence[str], max_prompt_tokens: int, longest_token_bytes: int, field: str) -> None:
    """Refuses, without tokenizing, texts that cannot fit `max_prompt_tokens`: a token stands for at most
    `longest_token_bytes` bytes, so more bytes than max_prompt_tokens * longest_token_bytes are more tokens
    than allowed."""
    limit = max_prompt_tokens * longest_token_bytes
    chars = sum(map(len, texts))
    if chars * 4 <= limit:  # a character is at most 4 UTF-8 bytes: it fits, no need to count bytes
        return
    size = chars if chars > limit else sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size > limit:  # (chars <= bytes, so "at least")
        raise Rejected(INVALID, f"{field} has at least {size} bytes; a prompt of max_prompt_tokens "
                                f"({max_prompt_tokens}) tokens spells at most {limit} bytes "
                                f"({longest_token_bytes} bytes per token at most)")


def invalid_unless(check, *args):
    """`check(*args)`, one of the prompt checks the Python API runs too; its ValueError -> INVALID_ARGUMENT."""
    try:
        return check(*args)
    except ValueError as err:
        raise Rejected(INVALID, str(err)) from None


def check_token_ids(ids, vocab_size: int, field: str) -> None:
    invalid_unless(prompts.check_token_ids, list(ids), vocab_size, field)


async def render_chat(tokenizer, messages: list[dict[str, str]], field: str = "messages") -> list[int]:
    if sum(len(message.get("content") or "") for message in messages) > INLINE_TOKENIZE_CHARS:
        # jinja2 over megabytes takes seconds (it holds the GIL, but a thread yields it every few ms)
        return (await asyncio.to_thread(invalid_unless, prompts.render_chat, tokenizer, messages, field))[1]
    return invalid_unless(prompts.render_chat, tokenizer, messages, field)[1]


class Admission:
    def __init__(self, engine: EnginePort, limits: ServingLimits):
        self._engine = engine
        self.limits = limits

    def max_prompt_tokens(self) -> int:
        room = self._engine.context_length - 1  # at least one token must be generated
        return room if self.limits.max_prompt_tokens is None else min(self.limits.max_prompt_tokens, room)

    async def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        arm = request.WhichOneof("prompt")
        if arm is None:
            raise Rejected(INVALID, "prompt: one of text, token_ids or messages is required")
        if arm == "text":
            invalid_unless(prompts.check_text, request.text, "text")
            self._check_size([request.text], "text")
            return await encode_text(self._engine.tokenizer, request.text)
        if arm == "token_ids":
            return invalid_unless(prompts.check_prompt_token_ids, list(request.token_ids.ids),
                                  self._engine.vocab_size, "token_ids.ids")
        messages = chat_messages_from_proto(request.messages)
        self._check_size([message["content"] for message in messages], "messages (their contents)")
        return await render_chat(self._engine.tokenizer, messages)

    def _check_size(self, texts: Sequence[str], field: str) -> None:
        check_prompt_size(texts, self.max_prompt_tokens(), self._engine.longest_token_bytes, field)

    async def admit(self, request: pb.GenerateRequest, running_ids: Container[str]) -> Admitted:
        """The request, validated and within every limit but the waiting queue's (`check_queue`)."""
        request_id = request_id_of(request)
        try:
            params = sampling_from_proto(request.sampling)
            params.check_vocab(self._engine.vocab_size)
        except ValueError as err:
            raise Rejected(INVALID, f"sampling: {err}") from None
        prompt_ids = await self._prompt_ids(request)
        self._check_lengths(len(prompt_ids), params)
        if request_id in running_ids:
            raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already running")
        return Admitted(request_id, prompt_ids, params)

    def _check_lengths(self, n_prompt: int, params: SamplingParams) -> None:
        limit = self.max_prompt_tokens()
        if n_prompt > limit:
            raise Rejected(INVALID, f"prompt has {n_prompt} tokens, more than max_prompt_tokens ({limit})")
        context_length = self._engine.context_length
        if n_prompt + params.max_tokens > context_length:
            raise Rejected(INVALID, f"sampling.max_tokens: prompt ({n_prompt} tokens) + max_tokens "
                                    f"({params.max_tokens}) exceeds the model's context length ({context_length})")
        longest_prompt, largest_peak = self._engine.token_limits()
        peak = n_prompt + params.max_tokens - 1  # KV holds every token but the last generated one
        if n_prompt > longest_prompt or peak > largest_peak:
            raise Rejected(EXHAUSTED, f"request can never fit this cluster's KV: it needs {peak} tokens (prompt "
                                      f"{n_prompt} + max_tokens {params.max_tokens} - 1), at most {largest_peak} fit "
                                      f"one request (prompts up to {longest_prompt}); lower max_tokens or shorten "
                                      "the prompt")

    def check_queue(self, n_prompt: int, queued_requests: int, queued_tokens: int) -> None:
        """Read the counts just before recording the call, with no await in between (no overshoot)."""
        max_requests, max_tokens = self.limits.max_queued_requests, self.limits.max_queued_tokens
        if max_requests and queued_requests >= max_requests:
            raise Rejected(EXHAUSTED, f"waiting queue is full ({queued_requests} requests, --max-queued-requests "
                                      f"{max_requests}); retry later")
        if max_tokens and queued_tokens + n_prompt > max_tokens:
            raise Rejected(EXHAUSTED, f"waiting queue is full ({queued_tokens} + {n_prompt} prompt tokens over "
                                      f"--max-queued-tokens {max_tokens}); retry later")
