"""Attention as a function the model is given, plus the exact pieces every
attention implementation in loong_jax is built from.

Data flow:
  1. The model computes q, k, v (RoPE applied) for a packed token stream and
     calls `attention(layer, q, k, v, positions, segment_ids, kv_cache)`.
  2. The default `dense_attention` attends within the stream itself: a query
     sees a key iff both carry the same segment id (>= 0) and
     `kv_position <= q_position`. Positions and segment ids alone decide
     causality and packing, so any token layout (packed, striped, padded)
     gives the same answer.
  3. Distributed implementations (ring prefill, multi-master decode) compute
     `partial_attention` over the keys they hold, get (output, log-sum-exp) per
     query, and combine partials exactly with `merge_partials`.

All softmax arithmetic runs in float32; a query that sees no key at all gets
output 0 and log-sum-exp -inf instead of NaN.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class AttentionFn(Protocol):
    """What the model calls once per layer.

    q: [tokens, q_heads, head_dim]; k, v: [tokens, kv_heads, head_dim];
    positions, segment_ids: [tokens] int32 (segment -1 marks padding).
    Returns the attention output [tokens, q_heads, head_dim] in q's dtype and
    the (possibly updated) kv_cache pytree.
    """

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                 positions: jax.Array, segment_ids: jax.Array, kv_cache: Any) -> tuple[jax.Array, Any]:
        ...


def attention_mask(q_positions, q_segments, kv_positions, kv_segments) -> jax.Array:
    """[q_tokens, kv_tokens] bool: same non-padding segment and causal."""
    same_segment = (q_segments[:, None] == kv_segments[None, :]) & (kv_segments[None, :] >= 0)
    causal = kv_positions[None, :] <= q_positions[:, None]
    return same_segment & causal


def partial_attention(q, k, v, mask, scale: float) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of q over the keys given, normalised over those keys only.

    q: [q_tokens, q_heads, head_dim]; k, v: [kv_tokens, kv_heads, head_dim];
    mask: [q_tokens, kv_tokens] bool.
    Returns out [q_tokens, q_heads, head_dim] float32 and lse [q_tokens, q_heads]
    float32 (-inf where the query sees no key; out is 0 there).
    """
    q_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    qg = q.astype(jnp.float32).reshape(q_tokens, kv_heads, group, head_dim)
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k.astype(jnp.float32)) * scale  # [kvh, g, q, k]
    scores = jnp.where(mask[None, None], scores, NEG_INF)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - safe_max)  # masked entries: exp(-inf) = 0
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("hgqk,khd->qhgd", weights, v.astype(jnp.float32))
    out = out / jnp.where(denom > 0, denom, 1.0).transpose(2, 0, 1, 3)
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + safe_max, NEG_INF)
    lse = lse[..., 0].transpose(2, 0, 1)  # [q, kvh, g]
    return out.reshape(q_tokens, q_heads, head_dim), lse.reshape(q_tokens, q_heads)


def merge_partials(out_a, lse_a, out_b, lse_b) -> tuple[jax.Array, jax.Array]:
    """Exactly combines two partial attentions over disjoint key sets.

    out_*: [..., heads, head_dim] float32; lse_*: [..., heads] float32.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)[..., None]
    weight_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


def dense_attention(layer, q, k, v, positions, segment_ids, kv_cache):
    """The reference: every query of the stream over every key of the stream."""
    del layer
    mask = attention_mask(positions, segment_ids, positions, segment_ids)
    out, _ = partial_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)
    return out.astype(q.dtype), kv_cache
