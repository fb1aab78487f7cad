"""Conversions between the wire (protobuf messages) and loong_jax's Python values, both directions.

Data flow:
  1. Client side: `sampling_to_proto(dict)` sets exactly the fields the caller gave (unset fields keep
     the engine's defaults); `prompt_to_request(...)` picks the `oneof` arm from the prompt's type
     (str -> text, ints -> token_ids, dicts -> chat messages).
  2. Server side: `sampling_from_proto(pb)` builds a validated `SamplingParams` (a bad value raises
     `ValueError` naming the field); `chat_messages_from_proto` gives the template's input.
  3. Server side: `delta_to_proto` / `finished_to_proto` turn the engine's `RequestOutput` deltas into
     the streamed `GenerateDelta`s and the closing `GenerateFinished`; client side `delta_from_proto`
     turns them back into `Delta` values with `loong_jax.outputs.TokenLogprobs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from loong_jax.outputs import CompletionOutput, TokenLogprobs
from loong_jax.sampling.params import SamplingParams
from loong_jax.server.generated import generation_pb2 as pb

FINISH_REASON_TO_PROTO = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
FINISH_REASON_FROM_PROTO = {value: key for key, value in FINISH_REASON_TO_PROTO.items()}
LIST_FIELDS = ("stop", "stop_token_ids")


# ---------------------------------------------------------------- sampling params
def sampling_to_proto(values: Mapping[str, Any] | SamplingParams | None) -> pb.SamplingParams:
    """A proto with exactly the given fields set (a SamplingParams sets all of them)."""
    if values is None:
        return pb.SamplingParams()
    if isinstance(values, SamplingParams):
        values = {key: value for key, value in values.to_dict().items() if value is not None}
    message = pb.SamplingParams()
    for field, value in values.items():
        if value is None:
            continue
        if field in LIST_FIELDS:
            getattr(message, field).extend([value] if isinstance(value, str) else value)
        else:
            setattr(message, field, value)
    return message


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Validated params; unset fields take SamplingParams' defaults. ValueError names a bad field."""
    values: dict[str, Any] = {}
    for field in SamplingParams.field_names():
        if field in LIST_FIELDS:
            items = list(getattr(message, field))
            if items:
                values[field] = items
        elif message.HasField(field):
            values[field] = getattr(message, field)
    return SamplingParams.from_dict(values)


# ---------------------------------------------------------------- prompts
def chat_messages_to_proto(messages: Sequence[Mapping[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def chat_messages_from_proto(message: pb.ChatMessages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in message.messages]


def prompt_to_request(prompt: str | Sequence[int] | Sequence[Mapping[str, str]], *,
                      sampling: pb.SamplingParams, request_id: str | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=sampling)
    if request_id is not None:
        request.request_id = request_id
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(item, Mapping) for item in prompt):
        request.messages.CopyFrom(chat_messages_to_proto(prompt))
    else:
        request.token_ids.CopyFrom(pb.TokenIds(ids=list(prompt)))
    return request


# ---------------------------------------------------------------- outputs, server side
def logprobs_to_proto(entries: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob, rank=entry.rank,
                            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top])
            for entry in entries]


def delta_to_proto(output: CompletionOutput) -> pb.GenerateDelta:
    return pb.GenerateDelta(index=output.index, token_ids=output.token_ids, text=output.text,
                            logprobs=logprobs_to_proto(output.logprobs or ()))


def sample_finish_to_proto(output: CompletionOutput, completion_tokens: int) -> pb.SampleFinish:
    finish = pb.SampleFinish(index=output.index, completion_tokens=completion_tokens,
                             finish_reason=FINISH_REASON_TO_PROTO.get(output.finish_reason,
                                                                      pb.FINISH_REASON_UNSPECIFIED))
    if isinstance(output.stop_reason, str):
        finish.stop_string = output.stop_reason
    elif isinstance(output.stop_reason, int):
        finish.stop_token_id = output.stop_reason
    return finish


def timings_to_proto(metrics) -> pb.Timings:
    """Timings from a `RequestMetrics`; spans that never happened stay 0."""
    if metrics is None:
        return pb.Timings()
    return pb.Timings(queue_s=metrics.queue_time or 0.0,
                      time_to_first_token_s=metrics.time_to_first_token or 0.0,
                      decode_s=metrics.decode_time or 0.0, e2e_s=metrics.latency or 0.0)


def finished_to_proto(prompt_tokens: int, n: int, finish_outputs: Mapping[int, CompletionOutput],
                      completion_tokens: Mapping[int, int], metrics) -> pb.GenerateFinished:
    """The closing message: each sample's finish (samples end at different steps, so each one's finish
    reason is taken from its own last delta), usage summed over samples, the engine's timings."""
    samples = [sample_finish_to_proto(finish_outputs.get(index, CompletionOutput(index=index)),
                                      completion_tokens.get(index, 0)) for index in range(n)]
    n_completion = sum(completion_tokens.values())
    return pb.GenerateFinished(
        finish_reason=samples[0].finish_reason, samples=samples,
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=n_completion,
                       total_tokens=prompt_tokens + n_completion),
        timings=timings_to_proto(metrics))


# ---------------------------------------------------------------- outputs, client side
@dataclasses.dataclass(frozen=True)
class Delta:
    """New tokens of one sample, as streamed."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None


@dataclasses.dataclass
class Sample:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclasses.dataclass
class Completion:
    """A whole answer, folded from a stream."""

    request_id: str
    prompt_tokens: int
    samples: list[Sample]
    usage: pb.Usage | None = None
    timings: pb.Timings | None = None

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason


def delta_from_proto(message: pb.GenerateDelta) -> Delta:
    logprobs = [TokenLogprobs(token_id=e.token_id, logprob=e.logprob, rank=e.rank,
                              top=tuple((t.token_id, t.logprob) for t in e.top))
                for e in message.logprobs]
    return Delta(index=message.index, token_ids=list(message.token_ids), text=message.text,
                 logprobs=logprobs or None)


class CompletionBuilder:
    """Folds the stream's messages into a `Completion`; `feed` returns the Delta a message carries."""

    def __init__(self):
        self.request_id: str | None = None
        self.prompt_tokens: int | None = None
        self._samples: dict[int, Sample] = {}
        self.completion: Completion | None = None

    def feed(self, message: pb.GenerateResponse) -> Delta | None:
        event = message.WhichOneof("event")
        if event == "started":
            self.request_id = message.request_id
            self.prompt_tokens = message.started.prompt_tokens
            return None
        if event == "delta":
            delta = delta_from_proto(message.delta)
            sample = self._samples.setdefault(delta.index, Sample(index=delta.index))
            sample.text += delta.text
            sample.token_ids += delta.token_ids
            if delta.logprobs is not None:
                sample.logprobs = (sample.logprobs or []) + delta.logprobs
            return delta
        if event == "finished":
            for finish in message.finished.samples:
                sample = self._samples.setdefault(finish.index, Sample(index=finish.index))
                sample.finish_reason = FINISH_REASON_FROM_PROTO.get(finish.finish_reason)
                reason = finish.WhichOneof("stop_reason")
                sample.stop_reason = getattr(finish, reason) if reason else None
            self.completion = Completion(
                request_id=self.request_id or message.request_id, prompt_tokens=self.prompt_tokens or 0,
                samples=[self._samples[i] for i in sorted(self._samples)] or [Sample(index=0)],
                usage=message.finished.usage, timings=message.finished.timings)
            return None
        raise ValueError(f"GenerateResponse without an event: {message!r}")
