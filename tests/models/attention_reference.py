"""float64 numpy reference of packed causal attention (what every attention path is compared with), and a
dense attention hook that records every layer's k, v (what pool contents are compared with)."""

import jax
import jax.numpy as jnp
import numpy as np

from loong_jax.models.attention import dense_attention


def reference_attention(q, k, v, q_positions, q_segments, kv_positions=None, kv_segments=None):
    """Softmax attention of each query over the keys of its segment (>= 0) at or before its position.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; positions, segments: [Tq] / [Tk] (kv default: the q stream).
    Returns out [Tq, Hq, D] and lse [Tq, Hq] in float64; a query that sees no key gets 0 and -inf.
    """
    kv_positions = q_positions if kv_positions is None else kv_positions
    kv_segments = q_segments if kv_segments is None else kv_segments
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    mask = ((q_segments[:, None] == kv_segments[None, :]) & (kv_segments[None, :] >= 0)
            & (kv_positions[None, :] <= q_positions[:, None]))  # [q, k]
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[None], scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    denom = weights.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", weights / np.where(denom > 0, denom, 1.0), v)
    with np.errstate(divide="ignore"):
        lse = np.where(denom > 0, np.log(denom) + row_max, -np.inf)[..., 0].T
    return out, lse


def recording_dense_attention(layer, q, k, v, positions, segment_ids, kept):
    """The model's dense attention hook that also writes the layer's k, v (RoPE applied) into
    kept [layers, 2, tokens, kv_heads, head_dim] at `layer` (an int, or traced by the model's layer scan)."""
    out, _ = dense_attention(layer, q, k, v, positions, segment_ids, None)
    return out, kept.at[layer].set(jnp.stack([k, v]).astype(kept.dtype))


def empty_kv_record(config, tokens: int) -> jax.Array:
    """The `kept` buffer `recording_dense_attention` starts from: [layers, 2, tokens, kv_heads, head_dim]."""
    return jnp.zeros((config.num_layers, 2, tokens, config.num_kv_heads, config.head_dim), config.jnp_dtype)
