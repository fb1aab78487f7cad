"""What a request gives back: completions, per-token logprobs, timings.

Data flow:
  1. The engine records a request's timings in its `RequestMetrics` as they
     happen (arrival, first scheduled, first token, finished).
  2. Each generated sequence (one per sample, `n` per request) is detokenized
     by `loong_jax.sampling.detokenizer.SequenceDetokenizer`, which returns a
     `CompletionOutput` in *delta* form after every step (only the token ids,
     text and logprobs new since the last emit) and a cumulative one on demand.
  3. The engine wraps them in a `RequestOutput`: `delta=True` for streaming
     (`AsyncLLM`), cumulative for `LLM.generate`. `RequestOutput.merged(delta)`
     folds a stream of deltas back into the cumulative form, so a client can
     rebuild the full answer from what it streamed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "rejected"]  # rejected: the scheduler refused it
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "rejected")


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities around one generated token (from the raw model logits)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token of the vocabulary
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (token id, logprob), best first


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence, cumulative or (in a delta RequestOutput) only its new part."""

    index: int  # which of the request's n samples
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # one entry per token id; None when not asked
    finish_reason: FinishReason | None = None  # None while the sequence is still running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def __post_init__(self):
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, "
                             f"got {self.finish_reason!r}")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def concatenated(cls, parts: "list[CompletionOutput]") -> "CompletionOutput":
        """Consecutive deltas of one sample joined in one pass (linear in the total output)."""
        index = parts[0].index
        if any(part.index != index for part in parts):
            raise ValueError(f"cannot concatenate outputs of different samples {sorted({p.index for p in parts})}")
        logprobs = None
        if any(part.logprobs is not None for part in parts):
            logprobs = [entry for part in parts for entry in part.logprobs or ()]
        finish_reasons = [part.finish_reason for part in parts if part.finish_reason is not None]
        stop_reasons = [part.stop_reason for part in parts if part.stop_reason is not None]
        return cls(index=index, text="".join(part.text for part in parts),
                   token_ids=[token for part in parts for token in part.token_ids], logprobs=logprobs,
                   finish_reason=finish_reasons[-1] if finish_reasons else None,
                   stop_reason=stop_reasons[-1] if stop_reasons else None)

    def merged(self, delta: "CompletionOutput") -> "CompletionOutput":
        """This output extended by a later delta of the same sequence."""
        return CompletionOutput.concatenated([self, delta])


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock instants of one request (seconds, from one monotonic clock)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def record_scheduled(self, now: float) -> None:
        if self.first_scheduled_time is None:  # a preempted request keeps its first schedule
            self.first_scheduled_time = now

    def record_token(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def record_finished(self, now: float) -> None:
        if self.finished_time is None:
            self.finished_time = now

    @staticmethod
    def _span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled."""
        return self._span(self.arrival_time, self.first_scheduled_time)

    @property
    def time_to_first_token(self) -> float | None:
        return self._span(self.arrival_time, self.first_token_time)

    @property
    def decode_time(self) -> float | None:
        """First token to finish."""
        return self._span(self.first_token_time, self.finished_time)

    @property
    def latency(self) -> float | None:
        """Arrival to finish."""
        return self._span(self.arrival_time, self.finished_time)


@dataclasses.dataclass
class RequestOutput:
    """Everything a request has produced so far (or, with delta=True, since the last emit)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    delta: bool = False

    # The common n=1 case reads like the wording: out.text, out.token_ids ...
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    def merged(self, delta: "RequestOutput") -> "RequestOutput":
        """The cumulative output after applying a streamed delta (samples matched by index)."""
        return self.merged_all([delta])

    def merged_all(self, deltas: "list[RequestOutput]") -> "RequestOutput":
        """This output after a whole stream of deltas, in one pass: linear in the total output, where merging
        after every step would copy the growing token lists each time."""
        if not deltas:
            return self
        parts: dict[int, list[CompletionOutput]] = {output.index: [output] for output in self.outputs}
        metrics = self.metrics
        for delta in deltas:
            if delta.request_id != self.request_id:
                raise ValueError(f"cannot merge a delta of request {delta.request_id!r} "
                                 f"into request {self.request_id!r}")
            for part in delta.outputs:
                parts.setdefault(part.index, []).append(part)
            metrics = delta.metrics if delta.metrics is not None else metrics
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[CompletionOutput.concatenated(parts[index]) for index in sorted(parts)],
            finished=deltas[-1].finished, metrics=metrics, delta=False)
