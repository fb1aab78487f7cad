"""Device side of sampling: batched logits in, next tokens (and logprobs) out.

Data flow of `sample_logits(logits, batch, num_top_logprobs, paths)` (all rows at once, each with its own
parameters from a `SamplingBatch`; vLLM's order of operations). `paths` (`sampling.batch.SamplerPaths`,
static, decided on the host from the rows) leaves out the stages no row needs: the sampler compiled for a GPU
has no data-dependent branch, because there each `lax.cond` copies its predicate to the host and waits.
  1. Raw logprobs = log_softmax(logits) when logprobs are asked for (vLLM's
     default "raw_logprobs": what the model said, before any processing).
  2. Penalties (compiled out when no row uses them):
     repetition_penalty on tokens seen in prompt or output (divide positive
     logits, multiply negative ones), then frequency_penalty * count and
     presence_penalty * [count > 0] subtracted for tokens seen in the output.
  3. min_tokens: EOS and stop_token_ids get -inf while step < min_tokens.
  4. Greedy rows (temperature 0) take the argmax of these logits.
  5. Sampled rows (compiled out when every row is greedy): divide by temperature,
     apply min_p (keep p >= min_p * p_max), then top_k and top_p together as
     one logit threshold per row (top_p on the distribution left by top_k),
     found among the 256 largest logits or, for rows whose nucleus is wider,
     over the whole row (compiled in only when some row's top_k / top_p could
     need it): by a full sort on GPUs, always; on a CPU, where XLA's sort is
     slow, by a bitwise select over the logits, run only when a row did not
     settle;
     then draw with the Gumbel-max trick. Row r at step s
     uses the key
     fold_in(fold_in(fold_in(fold_in(key(0), seed_lo), seed_hi), sample_index), s),
     so its draw depends only on its own request: the same seed gives the same
     tokens whatever the batch size, the row order or the degree of parallelism.
  6. Tokens, the sampled token's logprob and rank, and the top-k ids and
     logprobs are packed into one int32 matrix [batch, 3 + 2k] (floats by
     their bits) so the host fetches a step's results in one transfer;
     `sampling.batch.unpack_sampler_output` reads it.
Inside a program, `sample_tokens(logits, batch, signature)` picks the path by the static signature: plain
greedy rows (a `GreedyBatch`) take exactly the greedy path above (argmax after min_tokens), others
`sample_logits` with the signature's paths.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from loong_jax.sampling.batch import (ALL_PATHS, TOP_CANDIDATES, GreedyBatch, SampledRows, SamplerPaths,
                                      SamplingBatch, SamplingRow, SamplingSignature, num_logprobs_columns,
                                      pack_sampling_batch, sampler_paths, unpack_sampler_output)

NEG_INF = float("-inf")


def token_counts(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """How often each vocabulary id occurs per row; padding ids (>= vocab_size) are dropped."""
    # vmap of a 1-D scatter rather than a 2-D fancy index: it partitions cleanly along the
    # batch axis when the rows are sharded over a decode group.
    count_row = lambda ids: jnp.zeros((vocab_size,), jnp.int32).at[ids].add(1, mode="drop")
    return jax.vmap(count_row)(token_ids)  # [batch, vocab]


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Repetition (prompt + output), frequency and presence (output only) penalties."""
    vocab = logits.shape[-1]
    output_counts = token_counts(batch.output_token_ids, vocab)  # [batch, vocab]
    seen = (token_counts(batch.prompt_token_ids, vocab) > 0) | (output_counts > 0)  # [batch, vocab]
    repetition = jnp.where(seen, batch.repetition_penalty[:, None], 1.0)  # [batch, vocab]
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - batch.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - batch.presence_penalty[:, None] * (output_counts > 0).astype(jnp.float32)


def apply_min_tokens(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """EOS and stop ids cannot be drawn before min_tokens tokens exist."""
    blocked = jnp.where((batch.step < batch.min_tokens)[:, None], batch.stop_token_ids,
                        logits.shape[-1])  # [batch, stops]; out of range = dropped
    return jax.vmap(lambda row, ids: row.at[ids].set(NEG_INF, mode="drop"))(logits, blocked)


def apply_min_p(scaled: jax.Array, min_p: jax.Array) -> jax.Array:
    """Keep tokens with p >= min_p * p_max, i.e. logit >= max logit + log(min_p)."""
    floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]  # [batch, 1]
    return jnp.where(scaled >= floor, scaled, NEG_INF)


def _nucleus_threshold(descending: jax.Array, log_norm: jax.Array, top_k: jax.Array,
                       top_p: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Per-row logit threshold of top_k then top_p, from the row's `width` largest logits.

    descending: [batch, width] the largest scaled logits, sorted; log_norm: [batch, 1] the
    log-sum-exp of the whole row. Returns (threshold [batch, 1], settled [batch]); a row is
    settled when its answer cannot depend on logits beyond the first `width`.
    """
    width = descending.shape[-1]
    ranks = jnp.arange(width)[None, :]  # [1, width]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]  # [batch, 1]
    in_k = ranks < k  # [batch, width]
    probs = jnp.where(in_k, jnp.exp(descending - log_norm), 0.0)  # share of the whole row
    top_k_mass = jnp.where(k < vocab, jnp.sum(probs, axis=-1, keepdims=True), 1.0)  # [batch, 1]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix sum
    within_p = (top_p[:, None] >= 1.0) | (mass_before < top_p[:, None] * top_k_mass)
    kept = jnp.maximum(jnp.sum(in_k & within_p, axis=-1, keepdims=True), 1)  # [batch, 1]
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)  # [batch, 1]
    # Settled: top_k ends inside the prefix (so does everything kept), or top_k is off and
    # top_p stopped before the prefix ran out.
    settled = (width == vocab) | (k[:, 0] <= width) | ((k[:, 0] >= vocab) & (kept[:, 0] < width))
    unfiltered = (k[:, 0] >= vocab) & (top_p >= 1.0)
    return jnp.where(unfiltered[:, None], NEG_INF, threshold), settled | unfiltered


def _order_keys(values: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (negative floats: every bit flipped; others: sign bit set)."""
    bits = jax.lax.bitcast_convert_type(values, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _key_value(keys: jax.Array) -> jax.Array:
    """The float32 of `_order_keys`' keys."""
    bits = jnp.where(keys >> 31 == 1, keys ^ jnp.uint32(1 << 31), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_key(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """[batch, 1] per row the largest key K with sum(weights[keys >= K]) >= target, bit by bit from the top
    (32 masked sums, no sort); the measure only shrinks as K grows, so K is one of the row's keys."""

    def next_bit(bit, found):
        candidate = found | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
        measure = jnp.sum(jnp.where(keys >= candidate, weights, 0), axis=-1, keepdims=True)
        return jnp.where(measure >= target, candidate, found)

    return jax.lax.fori_loop(0, 32, next_bit, jnp.zeros(target.shape, jnp.uint32))


def _selected_threshold(scaled: jax.Array, log_norm: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`_nucleus_threshold` over the whole row without sorting it: the k-th largest logit by a count
    select, then the largest logit whose head (ties included) still holds top_p of the top_k mass, where,
    as in the sorted version, a tie at the k-th logit counts only as many tokens as reach k. (CPU only: it
    branches on whether any row has a top_k.)"""
    vocab = scaled.shape[-1]
    keys = _order_keys(scaled)  # [batch, vocab]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]  # [batch, 1]
    kth = jax.lax.cond(jnp.any(k < vocab),  # [batch, 1]; key 0: below every key (no top_k anywhere)
                       lambda: _largest_key(keys, jnp.ones_like(keys, jnp.int32), k),
                       lambda: jnp.zeros(k.shape, jnp.uint32))
    kth = jnp.where(k < vocab, kth, 0)
    above = keys > kth  # [batch, vocab] strictly inside the top_k
    probs = jnp.where(above, jnp.exp(scaled - log_norm), 0.0)  # shares of the whole row
    ties = k - jnp.sum(above, axis=-1, keepdims=True)  # tokens of the k-th logit's tie that count
    tie_mass = ties * jnp.exp(_key_value(kth) - log_norm)
    top_k_mass = jnp.where(k < vocab, jnp.sum(probs, axis=-1, keepdims=True) + tie_mass, 1.0)
    nucleus = _largest_key(keys, probs, top_p[:, None] * top_k_mass)  # 0 when only the tie is left
    threshold = jnp.where(top_p[:, None] >= 1.0, kth, jnp.maximum(nucleus, kth))
    return jnp.where(threshold == 0, NEG_INF, _key_value(threshold))  # key 0: keep everything


def apply_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, full_sort: bool = True) -> jax.Array:
    """Keep the top_k largest logits, then the smallest head of them whose mass reaches top_p.

    Works with a per-row threshold (ties with it are kept). Fast path: the
    threshold from the TOP_CANDIDATES largest logits (lax.top_k); rows whose
    nucleus reaches past them (flat distributions, large top_k) take it from a
    full sort instead. `full_sort` (static) compiles the sort in: the caller
    leaves it out only when every row is known to settle among the candidates
    (`sampling.batch.sampler_paths`). Where it is in, a CPU looks past the
    candidates only when some row did not settle (a branch on a CPU is no
    device round trip), and by a select instead of a sort (`_selected_threshold`:
    XLA's CPU sort of [32, 4096] takes 30 ms, the select a few); other platforms
    always sort (a branch there would wait for the host). Each row's path
    depends on that row alone, so the batch around it never changes its result.
    """
    vocab = scaled.shape[-1]
    log_norm = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # [batch, 1]
    width = min(TOP_CANDIDATES, vocab)
    head = jax.lax.top_k(scaled, width)[0]  # [batch, width], descending
    threshold, settled = _nucleus_threshold(head, log_norm, top_k, top_p, vocab)
    if width < vocab and full_sort:
        def with_full_sort():
            descending = -jnp.sort(-scaled, axis=-1)  # [batch, vocab]
            full = _nucleus_threshold(descending, log_norm, top_k, top_p, vocab)[0]
            return jnp.where(settled[:, None], threshold, full)

        def select_if_unsettled():
            def with_select():
                return jnp.where(settled[:, None], threshold, _selected_threshold(scaled, log_norm, top_k, top_p))

            return jax.lax.cond(jnp.all(settled), lambda: threshold, with_select)

        threshold = jax.lax.platform_dependent(cpu=select_if_unsettled, default=with_full_sort)
    return jnp.where(scaled >= threshold, scaled, NEG_INF)


def first_argmax(values: jax.Array) -> jax.Array:
    """jnp.argmax along the last axis (first index of the maximum) as two plain reductions,
    which XLA:CPU runs several times faster than its variadic arg-reduce. A NaN row yields
    the last id rather than an out-of-range one."""
    vocab = values.shape[-1]
    best = jnp.max(values, axis=-1, keepdims=True)  # [batch, 1]
    ids = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(values == best, ids, vocab), axis=-1), vocab - 1)


def row_keys(batch: SamplingBatch) -> jax.Array:
    """One PRNG key per row from (seed, sample index, step) only: batch-independent."""

    def key_of(seed_words, sample_index, step):
        key = jax.random.key(0)
        key = jax.random.fold_in(key, seed_words[0])
        key = jax.random.fold_in(key, seed_words[1])
        key = jax.random.fold_in(key, sample_index)
        return jax.random.fold_in(key, step)

    return jax.vmap(key_of)(batch.seed_words, batch.sample_index, batch.step)


def _draw(logits: jax.Array, batch: SamplingBatch, paths: SamplerPaths) -> jax.Array:
    """Random draws for every row (greedy rows included, their result is discarded)."""
    temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    scaled = apply_min_p(logits / temperature, batch.min_p)
    if paths.top_k_top_p:
        sampled_rows = batch.temperature > 0  # greedy and padding rows filter nothing
        top_k = jnp.where(sampled_rows, batch.top_k, 0)
        top_p = jnp.where(sampled_rows, batch.top_p, 1.0)
        scaled = apply_top_k_top_p(scaled, top_k, top_p, paths.full_sort)
    vocab = logits.shape[-1]
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(row_keys(batch))
    return first_argmax(scaled + gumbel)


def sample_logits(logits: jax.Array, batch: SamplingBatch, num_top_logprobs: int | None = None,
                  paths: SamplerPaths = ALL_PATHS) -> jax.Array:
    """Next token per row, packed with logprobs; traceable inside a larger jit.

    logits: [batch, vocab] (cast to float32). paths: the stages compiled in (static; `ALL_PATHS` suits any
    batch, `sampling.batch.sampler_paths(rows)` only what the rows need). Returns int32 [batch, 1] when
    num_top_logprobs is None, else [batch, 3 + 2 * num_top_logprobs]:
    token, sampled logprob bits, sampled rank, top ids, top logprob bits.
    """
    paths = SamplerPaths(*paths)  # a plain tuple from a hand-made program key reads by name too
    logits = logits.astype(jnp.float32)  # [batch, vocab]
    processed = apply_penalties(logits, batch) if paths.penalties else logits
    processed = apply_min_tokens(processed, batch)
    greedy_tokens = first_argmax(processed)  # [batch]
    tokens = greedy_tokens
    if paths.random_draws:
        tokens = jnp.where(batch.temperature <= 0.0, greedy_tokens, _draw(processed, batch, paths))  # [batch]
    if num_top_logprobs is None:
        return tokens[:, None]

    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [batch, vocab], raw model distribution
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)  # [batch, 1]
    rank = 1 + jnp.sum(logprobs > sampled, axis=-1, dtype=jnp.int32)  # [batch]
    top_values, top_ids = jax.lax.top_k(logprobs, num_top_logprobs)  # [batch, k]
    as_bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    return jnp.concatenate([tokens[:, None], as_bits(sampled), rank[:, None],
                            top_ids.astype(jnp.int32), as_bits(top_values)], axis=-1)


def sample_tokens(logits: jax.Array, batch: SamplingBatch | GreedyBatch, signature: SamplingSignature) -> jax.Array:
    """The sampler of a program: int32 [rows, 1 (+ logprobs columns)] (see `sample_logits`)."""
    if signature.plain_greedy:  # exactly sample_logits' greedy path (argmax after min_tokens)
        return jnp.argmax(apply_min_tokens(logits.astype(jnp.float32), batch), axis=-1).astype(jnp.int32)[:, None]
    return sample_logits(logits, batch, signature.logprobs_columns, signature.paths)


sample = jax.jit(sample_logits, static_argnames=("num_top_logprobs", "paths"))


def sample_rows(logits: jax.Array, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int] = (),
                batch_bucket: int | None = None) -> SampledRows:
    """Host convenience around `sample`: pack, run, fetch once, unpack.

    logits: [batch_bucket, vocab], rows in the same order as its first rows.
    Returns `sampling.batch.SampledRows` for the real rows.
    """
    vocab = logits.shape[-1]
    batch = pack_sampling_batch(rows, vocab, eos_token_ids,
                                batch_bucket=batch_bucket if batch_bucket is not None else logits.shape[0])
    packed = sample(logits, batch, num_top_logprobs=num_logprobs_columns(rows), paths=sampler_paths(rows))
    return unpack_sampler_output(jax.device_get(packed), rows)
