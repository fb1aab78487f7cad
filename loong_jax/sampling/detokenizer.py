"""Incremental detokenization and stop conditions of one generated sequence.

Data flow (one `SequenceDetokenizer` per sample of a request):
  1. The engine calls `update(new_token_ids, new_logprobs)` after each step.
  2. Each token is first checked against the token stops: a stop token id, or
     EOS unless ignore_eos, ends the sequence with finish_reason "stop" (the
     token id is kept, its text is not), but only once more than min_tokens
     tokens exist (the sampler masks those ids before that anyway).
  3. Otherwise `IncrementalDetokenizer` turns the token into text with the
     prefix-offset / read-offset technique: it decodes a short window of
     recent tokens twice (without and with the new ones) and keeps the
     difference, holding it back while the window still ends in U+FFFD (an
     incomplete UTF-8 sequence). Decoding a window rather than the token alone
     keeps the spaces that tokenizers such as SentencePiece attach to the
     neighbouring token, and costs O(window) per token instead of O(length).
  4. The new text goes through the `StopStringMatcher`; the first stop string
     to complete cuts the text just before it (finish_reason "stop"). While
     running, the trailing characters that could still start a stop string
     are held back, and nothing else is.
  5. Reaching max_tokens ends the sequence with "length"; at any end the
     held-back text is released. `update` returns a `CompletionOutput` delta:
     the token ids, logprobs and text that are new since the last call.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from loong_jax.outputs import CompletionOutput, FinishReason, TokenLogprobs
from loong_jax.sampling.params import SamplingParams
from loong_jax.sampling.stop_strings import ROOT, StopStringMatcher

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete or invalid UTF-8 sequence
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first outputs, for spacing


class TokenDecoder(Protocol):
    """What the detokenizer needs: loong_jax.models.tokenizer.Tokenizer and tokenizers.Tokenizer both fit."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted in pieces that are never a broken character.

    Invariant: the text of `ids[:read_offset]` has been emitted, and decoding
    `ids[prefix_offset:read_offset]` ends on a character boundary, so the text
    of any later window starting at prefix_offset extends it exactly.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt's last tokens are context only: their text is never emitted.
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (a final incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset:])
        complete = len(window_text) > len(prefix_text) and not window_text.endswith(REPLACEMENT_CHAR)
        if not (complete or final):
            return ""
        delta = window_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


class SequenceDetokenizer:
    """Tokens in, streamable text and finish state out, for one sample of a request."""

    def __init__(self, tokenizer: TokenDecoder, params: SamplingParams,
                 prompt_token_ids: Sequence[int] = (), eos_token_ids: Sequence[int] = (),
                 index: int = 0, stop_matcher: StopStringMatcher | None = None):
        self.index = index
        self._params = params
        self._stop_token_ids = frozenset(params.all_stop_token_ids(tuple(eos_token_ids)))
        self._eos_token_ids = frozenset(eos_token_ids)
        self._text_decoder = IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                    params.skip_special_tokens)
        if stop_matcher is None and params.stop:
            stop_matcher = StopStringMatcher(params.stop)
        self._matcher = stop_matcher
        self._matcher_state = ROOT
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self._text = ""  # decoded, stop-checked text; only its first _released chars are out
        self._released = 0
        self._tokens_emitted = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return list(self._token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    def output(self) -> CompletionOutput:
        """Cumulative output: everything released so far."""
        return CompletionOutput(
            index=self.index, text=self._text[:self._released], token_ids=list(self._token_ids),
            logprobs=None if self._logprobs is None else list(self._logprobs),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)

    # ------------------------------------------------------------------ updates
    def update(self, new_token_ids: Sequence[int],
               new_logprobs: Sequence[TokenLogprobs] | None = None) -> CompletionOutput:
        """Consumes the step's tokens (those after a stop are dropped); returns the delta."""
        if self.finished:
            raise RuntimeError(f"sequence {self.index} already finished ({self.finish_reason}); "
                               "it takes no more tokens")
        if self._logprobs is not None and (new_logprobs is None or len(new_logprobs) != len(new_token_ids)):
            got = "no" if new_logprobs is None else len(new_logprobs)
            raise ValueError(f"this request asked for logprobs: got {got} logprobs for "
                             f"{len(new_token_ids)} tokens")
        for position, token_id in enumerate(new_token_ids):
            token_id = int(token_id)
            self._token_ids.append(token_id)
            if self._logprobs is not None:
                self._logprobs.append(new_logprobs[position])
            self._consume(token_id)
            if self.finished:
                break
        return self._take_delta()

    def abort(self, reason: FinishReason = "abort") -> CompletionOutput:
        """Ends the sequence now (client gone or cancelled: "abort"; refused by the scheduler: "rejected");
        releases held-back text."""
        if not self.finished:
            self._finish(reason, None, stops_allowed=False)
        return self._take_delta()

    def _consume(self, token_id: int) -> None:
        stops_allowed = len(self._token_ids) > self._params.min_tokens
        if stops_allowed and token_id in self._stop_token_ids:
            # vLLM semantics: the stop token is part of token_ids, not of the text.
            plain_eos = token_id in self._eos_token_ids and token_id not in self._params.stop_token_ids
            reason = None if plain_eos else token_id
            self._finish("stop", reason, stops_allowed)
            return
        self._append_text(self._text_decoder.add_token(token_id), stops_allowed)
        if not self.finished and len(self._token_ids) >= self._params.max_tokens:
            self._finish("length", None, stops_allowed)

    def _append_text(self, text: str, stops_allowed: bool) -> None:
        if self._matcher is None or not text:
            self._text += text
            return
        self._matcher_state, match = self._matcher.feed(self._matcher_state, text, report=stops_allowed)
        if match is None:
            self._text += text
            return
        self._text += text[:match.end]
        self._text = self._text[:len(self._text) - len(match.stop)]  # cut before the stop string
        self.finish_reason, self.stop_reason = "stop", match.stop
        self._released = min(self._released, len(self._text))

    def _finish(self, reason: FinishReason, stop_reason: str | int | None, stops_allowed: bool) -> None:
        # The last incomplete character (if any) is released as U+FFFD, like a full decode;
        # it may still complete a stop string, which then wins.
        self._append_text(self._text_decoder.flush(), stops_allowed)
        if not self.finished:
            self.finish_reason, self.stop_reason = reason, stop_reason

    def _take_delta(self) -> CompletionOutput:
        if self.finished:
            releasable = len(self._text)
        else:
            held = self._matcher.hold_back(self._matcher_state) if self._matcher is not None else 0
            releasable = len(self._text) - held
        releasable = max(releasable, self._released)
        text = self._text[self._released:releasable]
        self._released = releasable
        new_ids = self._token_ids[self._tokens_emitted:]
        new_logprobs = None if self._logprobs is None else self._logprobs[self._tokens_emitted:]
        self._tokens_emitted = len(self._token_ids)
        return CompletionOutput(index=self.index, text=text, token_ids=new_ids, logprobs=new_logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)
