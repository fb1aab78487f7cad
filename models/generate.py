"""Reference generation: one sequence, one device, a contiguous KV cache.

This is the ground truth that the distributed engine is compared against, so
it is deliberately plain.

Data flow of `generate(model, prompt_ids, ...)`:
  1. Allocate `ContiguousKVCache` [layers, max_len, kv_heads, head_dim]; the
     key / value of the token at position p live in slot p.
  2. Prefill: run the whole prompt (padded to a bucket with segment id -1) with
     `contiguous_cache_attention`, which writes each token's k, v into its
     slot (padding goes to an out-of-range slot and is dropped) and then
     attends every query over the cache with `kv_position <= q_position`.
     Only the last prompt token's logits are computed.
  3. Sample the next token from those logits (greedy when temperature == 0,
     else temperature / top-k / top-p with a PRNG key folded with the step).
  4. Decode: feed that one token at the next position, same attention
     function, sample again; stop on an EOS id or after max_new_tokens.
Both steps are jitted once per shape bucket and donate the cache they update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from loong_jax.models.attention import attention_mask, partial_attention
from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import LlamaForCausalLM

PREFILL_BUCKET = 32  # prompts are padded to a multiple of this to bound recompiles
CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContiguousKVCache:
    keys: jax.Array  # [layers, max_len, kv_heads, head_dim]
    values: jax.Array  # [layers, max_len, kv_heads, head_dim]

    @classmethod
    def empty(cls, config: ModelConfig, max_len: int) -> "ContiguousKVCache":
        shape = (config.num_layers, max_len, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, config.jnp_dtype), jnp.zeros(shape, config.jnp_dtype))

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]


def contiguous_cache_attention(layer: int, q, k, v, positions, segment_ids, cache: ContiguousKVCache):
    """AttentionFn for one sequence: write k, v at slot = position, attend over the cache.

    q: [T, q_heads, head_dim]; k, v: [T, kv_heads, head_dim]; positions,
    segment_ids: [T] (segment -1 = padding, whose k, v are dropped and whose
    output is 0). Every slot at or before a query's position has been written
    (earlier steps, or this call), so causality alone masks the cache.
    """
    slots = jnp.where(segment_ids >= 0, positions, cache.max_len)  # [T]; out of range -> dropped
    keys = cache.keys.at[layer, slots].set(k.astype(cache.keys.dtype), mode="drop")
    values = cache.values.at[layer, slots].set(v.astype(cache.values.dtype), mode="drop")
    kv_positions = jnp.arange(cache.max_len, dtype=jnp.int32)  # [max_len]
    kv_segments = jnp.zeros((cache.max_len,), jnp.int32)
    q_segments = jnp.where(segment_ids >= 0, 0, -1)
    mask = attention_mask(positions, q_segments, kv_positions, kv_segments)  # [T, max_len]
    out, _ = partial_attention(q, keys[layer], values[layer], mask, scale=q.shape[-1] ** -0.5)
    return out.astype(q.dtype), ContiguousKVCache(keys, values)


def sample_token(logits, key, temperature, top_k, top_p):
    """One token id from logits [vocab] float32.

    temperature <= 0: argmax. Otherwise softmax(logits / temperature) restricted
    to the top_k largest (top_k <= 0: no limit) and then to the smallest set of
    most likely tokens whose probability reaches top_p (tokens tied with the
    last one kept are kept too).
    """
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_desc = jnp.sort(scaled)[::-1]  # [vocab]
    keep_k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < keep_k
    probs_sorted = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf))
    mass_before = jnp.cumsum(probs_sorted) - probs_sorted
    keep_count = jnp.maximum(jnp.sum(in_top_k & (mass_before < top_p)), 1)
    cutoff = sorted_desc[keep_count - 1]
    sampled = jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step(graphdef, params, tokens, positions, segment_ids, last_index, cache, key, temperature, top_k,
          top_p):
    """Runs tokens [T] through the model with the cache; samples after row last_index."""
    model = nnx.merge(graphdef, params)
    logits, cache = model(tokens, positions, segment_ids, attention=contiguous_cache_attention,
                          kv_cache=cache, logits_indices=last_index[None])  # [1, vocab]
    token = sample_token(logits[0], key, temperature, top_k, top_p)
    return token, logits[0], cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, the stopping EOS included
    finish_reason: str  # "stop" (an EOS id) or "length" (max_new_tokens)
    logits: np.ndarray | None = None  # [len(tokens), vocab] float32, the logits each token came from


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(model: LlamaForCausalLM, prompt_ids: Sequence[int], max_new_tokens: int, *,
             eos_token_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, return_logits: bool = False) -> GenerationResult:
    """Continues `prompt_ids` by up to `max_new_tokens` tokens (greedy by default)."""
    config: ModelConfig = model.config
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise ValueError("generate needs a prompt of at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > config.max_context:
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's context of {config.max_context}")

    graphdef, params = nnx.split(model)
    cache = ContiguousKVCache.empty(config, _round_up(prompt_len + max_new_tokens, CACHE_BUCKET))
    base_key = jax.random.key(seed)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    padded_len = _round_up(prompt_len, PREFILL_BUCKET)
    tokens = np.zeros(padded_len, np.int32)  # [padded_len]
    tokens[:prompt_len] = prompt_ids
    positions = np.arange(padded_len, dtype=np.int32)
    segment_ids = np.where(positions < prompt_len, 0, -1).astype(np.int32)
    token, logits, cache = _step(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions),
                                 jnp.asarray(segment_ids), jnp.int32(prompt_len - 1), cache,
                                 jax.random.fold_in(base_key, 0), *sampling)

    eos = set(int(i) for i in eos_token_ids)
    generated: list[int] = []
    step_logits: list[np.ndarray] = []
    zero_segment = jnp.zeros((1,), jnp.int32)
    while True:
        generated.append(int(token))
        if return_logits:
            step_logits.append(np.asarray(logits))
        if generated[-1] in eos:
            finish_reason = "stop"
            break
        if len(generated) == max_new_tokens:
            finish_reason = "length"
            break
        position = prompt_len + len(generated) - 1  # where the token just sampled goes
        token, logits, cache = _step(graphdef, params, jnp.asarray([generated[-1]], jnp.int32),
                                     jnp.asarray([position], jnp.int32), zero_segment, jnp.int32(0),
                                     cache, jax.random.fold_in(base_key, len(generated)), *sampling)
    return GenerationResult(generated, finish_reason, np.stack(step_logits) if return_logits else None)
