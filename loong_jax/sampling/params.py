"""Per-request sampling parameters, validated once at the edge.

Data flow:
  1. A caller builds `SamplingParams(...)` directly or with
     `SamplingParams.from_dict(json_like)` (unknown keys are rejected by name).
  2. `__post_init__` normalises the values (ints where floats are expected
     become floats, `stop` becomes a tuple, `top_k=-1` becomes 0) and checks
     every field; the first problem raises one `ValueError` that names the
     field, the allowed range and the value it got. Nothing invalid ever
     reaches the engine.
  3. The engine asks `check_vocab(vocab_size)` once it knows the model (token
     ids must exist) and turns the params into device arrays with
     `loong_jax.sampling.batch.pack_sampling_batch`.

Semantics follow vLLM where vLLM defines them:
  * temperature 0 means greedy (argmax of the penalised logits); the default is vLLM's 1.0, so
    `SamplingParams()` and a dict without "temperature" SAMPLE (the `loong-jax` commands default to 0);
  * top_k 0 or -1 means off (normalised to 0); top_p 1 means off; min_p 0 means off;
  * repetition_penalty divides positive / multiplies negative logits of every
    token seen in the prompt or the output; presence_penalty and
    frequency_penalty subtract from logits of tokens seen in the output only;
  * min_tokens: no stop (EOS, stop_token_ids, stop strings) is honoured before
    min_tokens tokens have been generated; the sampler masks EOS and
    stop_token_ids for those steps;
  * logprobs=k returns the sampled token's logprob and the k most likely
    tokens per generated token (0 = only the sampled one), computed from the
    raw model logits (vLLM's default "raw_logprobs");
  * seed makes the request reproducible whatever else shares its batch;
    None draws fresh randomness.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_N = 16
MAX_TOKENS_LIMIT = 2**31 - 1  # token counts travel as int32 on device
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_ADDITIVE_PENALTY = 2.0  # presence / frequency penalty magnitude (OpenAI's range)
MAX_SEED = 2**64 - 1  # folded into the PRNG key as two 32-bit words


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(field: str, allowed: str, value: Any) -> ValueError:
    try:
        shown = repr(value)
    except ValueError:  # ints beyond Python's digit limit refuse to print
        shown = f"<{type(value).__name__} too large to print>"
    if len(shown) > 80:  # hostile inputs (huge lists) must not flood the error message
        shown = shown[:77] + "..."
    return ValueError(f"{field} must be {allowed}, got {shown}")


def _check_int(field: str, value: Any, low: int, high: int, allowed: str | None = None) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _fail(field, allowed or f"an integer in [{low}, {high}]", value)
    return int(value)


def _check_float(field: str, value: Any, allowed: str, inside) -> float:
    try:
        number = float(value) if _is_real(value) else math.nan
    except OverflowError:  # an int too large for a float
        number = math.nan
    if not math.isfinite(number) or not inside(number):
        raise _fail(field, f"a finite number {allowed}", value)
    return number


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "a bool (True or False)", value)
    return value


def _check_stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _fail("stop", "a string or a list of strings", value)
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_STOP_STRING_CHARS:
            raise _fail(f"stop[{index}]", f"a non-empty string of at most {MAX_STOP_STRING_CHARS} "
                        "characters", item)
    return tuple(dict.fromkeys(value))  # duplicates change nothing; keep first-seen order


def _check_stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise _fail("stop_token_ids", "a list of token ids", value)
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}")
    ids = [_check_int(f"stop_token_ids[{i}]", token, 0, 2**31 - 1, "a token id >= 0")
           for i, token in enumerate(value)]
    return tuple(dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops. See the module docstring for semantics.

    Defaults are vLLM's: temperature=1.0 samples from the model's distribution (temperature=0.0 is
    greedy; the `loong-jax` command-line tools default to 0), max_tokens=16."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        normalised = self._validated()
        for field, value in normalised.items():
            object.__setattr__(self, field, value)  # frozen: normalise in place once

    def _validated(self) -> dict[str, Any]:
        """Every field checked in declaration order; returns the normalised values."""
        values: dict[str, Any] = {}
        values["n"] = _check_int("n", self.n, 1, MAX_N)
        values["max_tokens"] = _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        values["min_tokens"] = _check_int(
            "min_tokens", self.min_tokens, 0, values["max_tokens"],
            f"an integer in [0, max_tokens={values['max_tokens']}]")
        values["temperature"] = _check_float(
            "temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}] (0 = greedy)",
            lambda t: 0.0 <= t <= MAX_TEMPERATURE)
        values["top_p"] = _check_float("top_p", self.top_p, "in (0, 1]", lambda p: 0.0 < p <= 1.0)
        if not _is_int(self.top_k) or not (self.top_k >= -1):
            raise _fail("top_k", "-1 or 0 (off) or an integer >= 1", self.top_k)
        values["top_k"] = max(int(self.top_k), 0)  # -1 and 0 both mean "off"
        values["min_p"] = _check_float("min_p", self.min_p, "in [0, 1]", lambda p: 0.0 <= p <= 1.0)
        values["repetition_penalty"] = _check_float(
            "repetition_penalty", self.repetition_penalty,
            f"in (0, {MAX_REPETITION_PENALTY:g}] (1 = off)", lambda r: 0.0 < r <= MAX_REPETITION_PENALTY)
        for field in ("presence_penalty", "frequency_penalty"):
            values[field] = _check_float(
                field, getattr(self, field), f"in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}]",
                lambda x: -MAX_ADDITIVE_PENALTY <= x <= MAX_ADDITIVE_PENALTY)
        values["seed"] = (None if self.seed is None else
                          _check_int("seed", self.seed, 0, MAX_SEED, "None or an integer in [0, 2**64 - 1]"))
        values["stop"] = _check_stop_strings(self.stop)
        values["stop_token_ids"] = _check_stop_token_ids(self.stop_token_ids)
        values["ignore_eos"] = _check_bool("ignore_eos", self.ignore_eos)
        values["logprobs"] = (None if self.logprobs is None else
                              _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS,
                                         f"None or an integer in [0, {MAX_LOGPROBS}]"))
        values["skip_special_tokens"] = _check_bool("skip_special_tokens", self.skip_special_tokens)
        return values

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Builds params from JSON-like input; unknown keys are an error that names them."""
        if not isinstance(values, Mapping):
            raise _fail("sampling params", "a mapping of field names to values", values)
        known = set(cls.field_names())
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            shown = ", ".join(repr(key[:40]) for key in unknown[:8])
            more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
            raise ValueError(f"unknown sampling parameter(s) {shown}{more}; "
                             f"allowed: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        return values

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def all_stop_token_ids(self, eos_token_ids: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """Token ids that end the sequence: stop_token_ids, plus EOS unless ignore_eos."""
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        return tuple(dict.fromkeys(self.stop_token_ids + eos))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids must exist in the model's vocabulary (known only once the model is)."""
        for index, token in enumerate(self.stop_token_ids):
            if token >= vocab_size:
                raise _fail(f"stop_token_ids[{index}]", f"a token id in [0, {vocab_size - 1}]", token)
