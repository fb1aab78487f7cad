"""Host side of sampling: per-row parameters in, device arrays out, and back.

Data flow:
  1. The engine describes each row of a decode batch as a `SamplingRow`
     (the request's SamplingParams, its prompt ids, the ids it generated so far,
     which of its n samples this is).
  2. `pack_sampling_batch(rows, vocab_size, eos_token_ids)` turns them into
     one `SamplingBatch` of numpy arrays, padded to a batch bucket (padding rows
     are greedy and their tokens are ignored) and to power-of-two history
     buckets, so the jitted sampler sees few distinct shapes. Histories are
     filled only for rows that use penalties, so batches without penalties
     carry [batch, 1] placeholders.
  3. `loong_jax.sampling.sampler.sample` runs on device and returns one int32 matrix
     per step (tokens and logprobs together: one device->host transfer).
  4. `unpack_sampler_output(matrix, rows)` reads it back into token ids and
     `TokenLogprobs` per row, trimmed to what each request asked for.
Inside a program (`loong_jax.executor.programs`): rows that are all plain greedy (no temperature, penalties
or logprobs) travel as a `GreedyBatch` of 3 arrays instead of 14; `sampling_signature` gives the static
shapes of either (`SamplingSignature`, part of the program key), and `abstract_sampling` the abstract
arrays a program is lowered with. The signature also carries `SamplerPaths` (`sampler_paths(rows)`): which
of the sampler's optional stages any row needs, decided here on the host so that the sampler compiled for a
GPU has no data-dependent branch (there each one would copy its predicate to the host and wait).
`differs_next_step_in_steps_only` says when the next step's batch is this one with every step + 1 (what
`executor.decode_steps` advances instead of packing the rows again).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from typing import NamedTuple, Sequence

import jax
import numpy as np

from loong_jax.outputs import TokenLogprobs
from loong_jax.sampling.params import MAX_LOGPROBS, SamplingParams

OUTPUT_FIXED_COLUMNS = 3  # token, sampled logprob (float bits), sampled rank
# Smallest widths of the padded id lists. Every row with up to 8 stop ids, and every penalised history of up to
# 256 tokens, shares one compiled sampler; wider lists double. Small minimums would compile a new program each
# time a generation's history doubled (1, 2, 4, ... tokens).
STOP_IDS_BUCKET_MIN = 8
HISTORY_BUCKET_MIN = 256
TOP_CANDIDATES = 256  # the sampler looks for top_k / top_p among this many largest logits, else sorts the row


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far; its length is the step index
    sample_index: int = 0  # which of the request's n samples (each gets its own random stream)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as arrays (numpy on the host, jax inside jit)."""

    temperature: np.ndarray  # [batch] float32, 0 = greedy
    top_p: np.ndarray  # [batch] float32, 1 = off
    top_k: np.ndarray  # [batch] int32, 0 = off
    min_p: np.ndarray  # [batch] float32, 0 = off
    repetition_penalty: np.ndarray  # [batch] float32, 1 = off
    presence_penalty: np.ndarray  # [batch] float32
    frequency_penalty: np.ndarray  # [batch] float32
    seed_words: np.ndarray  # [batch, 2] uint32, (low, high) words of the 64-bit seed
    sample_index: np.ndarray  # [batch] int32
    step: np.ndarray  # [batch] int32, tokens generated so far by the row's sequence
    min_tokens: np.ndarray  # [batch] int32
    stop_token_ids: np.ndarray  # [batch, stops] int32, padded with vocab_size (out of range)
    prompt_token_ids: np.ndarray  # [batch, prompt_bucket] int32, padded with vocab_size
    output_token_ids: np.ndarray  # [batch, output_bucket] int32, padded with vocab_size

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]


def bucket_size(count: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(count, minimum)."""
    size = max(count, minimum, 1)
    return 1 << (size - 1).bit_length()


def _row_seed(params: SamplingParams) -> int:
    # An unseeded request draws fresh randomness at every step: valid, not reproducible.
    return params.seed if params.seed is not None else secrets.randbits(64)


def _padded_lists(lists: list[Sequence[int]], pad: int, minimum: int) -> np.ndarray:
    width = bucket_size(max((len(ids) for ids in lists), default=0), minimum)
    out = np.full((len(lists), width), pad, np.int32)
    for row, ids in enumerate(lists):
        out[row, :len(ids)] = np.asarray(ids, np.int32)
    return out


def pack_sampling_batch(rows: Sequence[SamplingRow], vocab_size: int,
                        eos_token_ids: Sequence[int] = (), batch_bucket: int | None = None,
                        min_history_bucket: int = HISTORY_BUCKET_MIN) -> SamplingBatch:
    """Arrays for `sampler.sample`; `batch_bucket` defaults to the next power of two."""
    if not rows:
        raise ValueError("pack_sampling_batch needs at least one row")
    batch = batch_bucket if batch_bucket is not None else bucket_size(len(rows))
    if batch < len(rows):
        raise ValueError(f"batch_bucket must be >= the number of rows ({len(rows)}), got {batch}")
    padding = batch - len(rows)
    params = [row.params for row in rows]

    def column(values, dtype, pad_value):
        return np.asarray(list(values) + [pad_value] * padding, dtype=dtype)

    seeds = [_row_seed(p) for p in params] + [0] * padding
    seed_words = np.array([[s & 0xFFFFFFFF, s >> 32] for s in seeds], dtype=np.uint32)
    stop_lists = [p.all_stop_token_ids(tuple(eos_token_ids)) if p.min_tokens > len(row.output_token_ids)
                  else () for p, row in zip(params, rows)] + [()] * padding
    # Histories only where a penalty reads them (the prompt only for repetition_penalty); a [batch, 1]
    # placeholder when no row reads one.
    reads_prompt = [row.params.repetition_penalty != 1.0 for row in rows]
    reads_output = [row.params.uses_penalties for row in rows]

    def histories(lists, reads):
        padded = [ids if read else () for ids, read in zip(lists, reads)] + [()] * padding
        return _padded_lists(padded, vocab_size, minimum=min_history_bucket if any(reads) else 1)

    return SamplingBatch(
        temperature=column((p.temperature for p in params), np.float32, 0.0),
        top_p=column((p.top_p for p in params), np.float32, 1.0),
        top_k=column((p.top_k for p in params), np.int32, 0),
        min_p=column((p.min_p for p in params), np.float32, 0.0),
        repetition_penalty=column((p.repetition_penalty for p in params), np.float32, 1.0),
        presence_penalty=column((p.presence_penalty for p in params), np.float32, 0.0),
        frequency_penalty=column((p.frequency_penalty for p in params), np.float32, 0.0),
        seed_words=seed_words,
        sample_index=column((row.sample_index for row in rows), np.int32, 0),
        step=column((len(row.output_token_ids) for row in rows), np.int32, 0),
        min_tokens=column((p.min_tokens for p in params), np.int32, 0),
        stop_token_ids=_padded_lists(stop_lists, vocab_size, minimum=STOP_IDS_BUCKET_MIN),
        prompt_token_ids=histories([row.prompt_token_ids for row in rows], reads_prompt),
        output_token_ids=histories([row.output_token_ids for row in rows], reads_output),
    )


def num_logprobs_columns(rows: Sequence[SamplingRow]) -> int | None:
    """The sampler's static `num_top_logprobs`: None when no row asks, else the fixed maximum
    (one compiled variant serves every k; rows are trimmed on the host)."""
    return MAX_LOGPROBS if any(row.params.logprobs is not None for row in rows) else None


@dataclasses.dataclass(frozen=True)
class SampledRows:
    token_ids: np.ndarray  # [rows] int32
    logprobs: list[TokenLogprobs | None]  # per row; None where the request did not ask


def unpack_sampler_output(packed: np.ndarray, rows: Sequence[SamplingRow]) -> SampledRows:
    """Reads `sampler.sample`'s int32 matrix [batch, 3 (+ 2k)] back for the real rows."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.ndim != 2:
        raise ValueError(f"expected the sampler's int32 [batch, columns] matrix, got {packed.dtype} "
                         f"{packed.shape}")
    packed = packed[:len(rows)]
    tokens = packed[:, 0].copy()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    top_width = (packed.shape[1] - OUTPUT_FIXED_COLUMNS) // 2
    if packed.shape[1] > 1:
        sampled_logprob = packed[:, 1].view(np.float32)
        ranks = packed[:, 2]
        top_ids = packed[:, OUTPUT_FIXED_COLUMNS:OUTPUT_FIXED_COLUMNS + top_width]
        top_values = packed[:, OUTPUT_FIXED_COLUMNS + top_width:].view(np.float32)
        for index, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                continue
            top = tuple((int(top_ids[index, j]), float(top_values[index, j])) for j in range(k))
            logprobs[index] = TokenLogprobs(token_id=int(tokens[index]),
                                            logprob=float(sampled_logprob[index]),
                                            rank=int(ranks[index]), top=top)
    return SampledRows(token_ids=tokens, logprobs=logprobs)


class SamplerPaths(NamedTuple):
    """Which optional stages of `sampler.sample_logits` a batch needs (static: chosen when it is traced).
    Running a stage no row needs leaves every token unchanged, so `ALL_PATHS` is right for any batch; a
    stage left out is compiled out."""

    penalties: bool  # some row has a repetition, presence or frequency penalty
    random_draws: bool  # some row samples (temperature > 0)
    top_k_top_p: bool  # some sampling row filters by top_k or top_p
    full_sort: bool  # some sampling row's top_k / top_p may reach past the TOP_CANDIDATES largest logits


ALL_PATHS = SamplerPaths(True, True, True, True)
NO_PATHS = SamplerPaths(False, False, False, False)


def sampler_paths(rows: Sequence[SamplingRow]) -> SamplerPaths:
    """The stages `rows` need. A sampling row's top_k / top_p threshold is found among the TOP_CANDIDATES
    largest logits when 0 < top_k <= TOP_CANDIDATES; otherwise (top_p alone, or a larger top_k) its
    nucleus may be wider, which only the logits can tell: such a row asks for the full sort."""
    sampling = [row.params for row in rows if row.params.temperature > 0]
    return SamplerPaths(
        penalties=any(row.params.uses_penalties for row in rows),
        random_draws=bool(sampling),
        top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sampling),
        full_sort=any(p.top_k > TOP_CANDIDATES or (p.top_k == 0 and p.top_p < 1.0) for p in sampling))


class SamplingSignature(NamedTuple):
    """The static shapes of a program's sampling inputs (hashable: part of a `ProgramKey`'s bucket)."""

    stop_ids: int  # width of the padded stop id lists
    prompt_width: int  # prompt history bucket (1: no row reads it)
    output_width: int  # output history bucket (1: no row reads it)
    logprobs_columns: int | None  # the sampler's `num_top_logprobs` (None: no row asks)
    plain_greedy: bool  # every row plain greedy: the sampler is an argmax (no random path compiled)
    paths: SamplerPaths = ALL_PATHS  # the sampler's stages compiled in (a tuple without it: all of them)


# Sampling signature of the common case: greedy, no penalties, no logprobs.
PLAIN_GREEDY = SamplingSignature(STOP_IDS_BUCKET_MIN, 1, 1, None, True, NO_PATHS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GreedyBatch:
    """What plain greedy rows need of a `SamplingBatch` (`sampler.apply_min_tokens`'s fields), so that a
    greedy program carries 3 small arrays instead of 14."""

    step: np.ndarray  # [batch] int32, tokens generated so far
    min_tokens: np.ndarray  # [batch] int32
    stop_token_ids: np.ndarray  # [batch, stops] int32, padded with vocab_size


def is_plain_greedy(rows: Sequence[SamplingRow]) -> bool:
    return all(row.params.temperature == 0.0 and not row.params.uses_penalties and row.params.logprobs is None
               for row in rows)


def sampling_signature(rows: Sequence[SamplingRow], batch: SamplingBatch | GreedyBatch) -> SamplingSignature:
    """The static part of a sampling batch: history widths, logprobs columns, whether every row is plain
    greedy (then the program's sampler is an argmax and skips compiling the random path), and the
    sampler's stages the rows need."""
    if isinstance(batch, GreedyBatch):
        return PLAIN_GREEDY._replace(stop_ids=batch.stop_token_ids.shape[1])
    return SamplingSignature(batch.stop_token_ids.shape[1], batch.prompt_token_ids.shape[1],
                             batch.output_token_ids.shape[1], num_logprobs_columns(rows), False,
                             sampler_paths(rows))


def differs_next_step_in_steps_only(batch: SamplingBatch | GreedyBatch, rows: Sequence[SamplingRow]) -> bool:
    """Whether the batch of `rows` one token further on (the same parameters) is `batch` with each row's
    `step` one higher and nothing else changed: no row masks its stop ids any more (min_tokens), reads a
    token history (penalties) or draws a fresh seed every step (unseeded)."""
    if np.any(batch.min_tokens > batch.step):
        return False
    if isinstance(batch, GreedyBatch):
        return True
    return (batch.prompt_token_ids.shape[1] == 1 and batch.output_token_ids.shape[1] == 1
            and all(row.params.seed is not None for row in rows))


def greedy_batch(rows: Sequence[SamplingRow], vocab_size: int, eos_token_ids: Sequence[int]) -> GreedyBatch:
    """The min_tokens inputs of plain greedy rows (EOS and stop ids are masked while step < min_tokens)."""
    steps = np.fromiter((len(row.output_token_ids) for row in rows), np.int32, len(rows))
    minimums = np.fromiter((row.params.min_tokens for row in rows), np.int32, len(rows))
    blocked = [row.params.all_stop_token_ids(tuple(eos_token_ids)) if row.params.min_tokens > step else ()
               for row, step in zip(rows, steps)]
    width = bucket_size(max(map(len, blocked)), STOP_IDS_BUCKET_MIN)
    stops = np.full((len(rows), width), vocab_size, np.int32)
    for index, ids in enumerate(blocked):
        if ids:  # most rows are past min_tokens: nothing to block
            stops[index, :len(ids)] = ids
    return GreedyBatch(step=steps, min_tokens=minimums, stop_token_ids=stops)


def abstract_sampling(rows: int, signature: SamplingSignature, sharding) -> SamplingBatch | GreedyBatch:
    """The abstract sampling inputs of `rows` rows with this signature (to lower a program; nothing runs)."""
    s = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
    if signature.plain_greedy:
        return GreedyBatch(step=s((rows,), np.int32), min_tokens=s((rows,), np.int32),
                           stop_token_ids=s((rows, signature.stop_ids), np.int32))
    return SamplingBatch(
        temperature=s((rows,), np.float32), top_p=s((rows,), np.float32), top_k=s((rows,), np.int32),
        min_p=s((rows,), np.float32), repetition_penalty=s((rows,), np.float32),
        presence_penalty=s((rows,), np.float32), frequency_penalty=s((rows,), np.float32),
        seed_words=s((rows, 2), np.uint32), sample_index=s((rows,), np.int32), step=s((rows,), np.int32),
        min_tokens=s((rows,), np.int32), stop_token_ids=s((rows, signature.stop_ids), np.int32),
        prompt_token_ids=s((rows, signature.prompt_width), np.int32),
        output_token_ids=s((rows, signature.output_width), np.int32))
