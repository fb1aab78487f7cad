"""Segment-aware block-sparse attention over a packed token stream (flash-style,
float32 online softmax), with the (out, lse) contract of `partial_attention`.

A packed prefill puts many prompts in one stream; a dense [q, k] mask computes
(sum of lengths)^2 scores where sum(length^2) are needed. Here queries and keys
are cut into static tiles and only tile pairs that can meet are computed.

Data flow of `blocked_partial_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg)`:
  1. Pad q rows to whole `q_tile`s and kv rows to whole `kv_tile`s (padding
     rows get segment -1: they neither see nor are seen).
  2. Tile summaries: the (segment, position) of each tile's first and last
     real row. The real rows of a packed stream (and of one member's rows in a
     striped layout) are sorted by (segment, position), wherever padding sits
     between them; then the key tiles a query tile can meet form one contiguous
     range [first, end): from the first key tile whose last segment reaches
     the query tile's first segment, to the last key tile whose first row is
     not after the query tile's last row. If either side is not sorted so, the
     range is every key tile: slower, never wrong, because step 3 still masks
     every score by segment and position.
  3. For each query tile (`lax.map`), a loop of dynamic trip count over its
     key range: scores of the tile pair, masked (same segment >= 0 and
     kv_pos <= q_pos), folded into a running max, sum and output in float32.
     Key tiles are slices of k, v, or, given `kv_rows`, rows gathered from a
     storage such as one layer of a paged KV pool (context prefill).
  4. out = acc / sum and lse = log(sum) + max; a row that saw no key gets
     out 0 and lse -inf, never NaN.

`segment_attention` picks this or the dense `partial_attention` (cheaper when
both sides fit in about one tile) from the static shapes.

This is the XLA reference path (what CPU programs run). On CUDA the flash
kernel `models.kernels.prefill_attention` replaces steps 3-4 with one launch,
visiting the same `key_tile_ranges`; `pad_rows` and `key_tile_ranges` are
shared with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loong_jax.models.attention import NEG_INF, attention_mask, partial_attention

# Tile sizes chosen on a 2-core CPU: 64 x 64 was the fastest of 32..256 both on the peer
# benchmark's packed stream (64 prompts of 17..509 tokens) and on one causal 8K prompt.
Q_TILE = 64
KV_TILE = 64


def pad_rows(x, rows: int, fill):
    """Pad the leading axis of x to `rows` with `fill`."""
    pad = rows - x.shape[0]
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)], axis=0)


def _lex_le(seg_a, pos_a, seg_b, pos_b):
    """(seg_a, pos_a) <= (seg_b, pos_b) in lexicographic order (no int64 needed)."""
    return (seg_a < seg_b) | ((seg_a == seg_b) & (pos_a <= pos_b))


def _is_stream_sorted(positions, segments):
    """True when the real rows (segment >= 0), wherever the padding between them
    is, are sorted by (segment, position)."""
    real = segments >= 0
    rows = jnp.arange(segments.shape[0])
    last_real = jax.lax.cummax(jnp.where(real, rows, -1))  # [T] latest real row at or before each row
    previous = jnp.concatenate([jnp.full((1,), -1, last_real.dtype), last_real[:-1]])  # [T] real row before it
    safe = jnp.maximum(previous, 0)
    in_order = _lex_le(segments[safe], positions[safe], segments, positions)
    return jnp.all(~real | (previous < 0) | in_order)


def _tile_ends(positions, segments, tile: int):
    """Per tile: (segment, position) of its first and of its last real row, and
    whether it has any. Each [tiles]."""
    real = segments.reshape(-1, tile) >= 0  # [tiles, tile]
    first = jnp.argmax(real, axis=1)[:, None]  # [tiles, 1]
    last = tile - 1 - jnp.argmax(real[:, ::-1], axis=1)[:, None]

    def pick(per_row, index):  # [tiles * tile] -> [tiles], the row `index` of each tile
        return jnp.take_along_axis(per_row.reshape(-1, tile), index, axis=1)[:, 0]

    return (pick(segments, first), pick(positions, first), pick(segments, last), pick(positions, last),
            jnp.any(real, axis=1))


def key_tile_ranges(q_positions, q_segments, kv_positions, kv_segments, q_tile: int, kv_tile: int):
    """(first [q_tiles], count [q_tiles]) int32: the key tiles each query tile visits.

    Inputs are padded to whole tiles ([q_tiles * q_tile], [kv_tiles * kv_tile]).
    Tight when both sides are sorted streams (see the module docstring); every
    key tile for every query tile otherwise.
    """
    kv_tiles = kv_segments.shape[0] // kv_tile
    q_first_seg, _, q_last_seg, q_last_pos, q_real = _tile_ends(q_positions, q_segments, q_tile)
    k_first_seg, k_first_pos, k_last_seg, _, k_real = _tile_ends(kv_positions, kv_segments, kv_tile)
    # [q_tiles, kv_tiles]: in a sorted key stream, the tiles reaching the query tile's first
    # segment are a suffix, and the tiles starting no later than its last row are a prefix.
    reaches = k_real[None, :] & (k_last_seg[None, :] >= q_first_seg[:, None])
    starts_before = k_real[None, :] & _lex_le(k_first_seg[None, :], k_first_pos[None, :],
                                              q_last_seg[:, None], q_last_pos[:, None])
    first = jnp.where(jnp.any(reaches, axis=1), jnp.argmax(reaches, axis=1), kv_tiles)
    end = jnp.where(jnp.any(starts_before, axis=1), kv_tiles - jnp.argmax(starts_before[:, ::-1], axis=1), 0)
    count = jnp.where(q_real, jnp.maximum(end - first, 0), 0)
    sorted_streams = _is_stream_sorted(q_positions, q_segments) & _is_stream_sorted(kv_positions, kv_segments)
    first = jnp.where(sorted_streams, first, 0).astype(jnp.int32)
    count = jnp.where(sorted_streams, count, kv_tiles).astype(jnp.int32)
    return first, count


def blocked_partial_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, scale: float, *,
                              kv_rows=None, v_rows=None, q_tile: int = Q_TILE,
                              kv_tile: int = KV_TILE) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of q over the keys that share its segment (>= 0) and
    are not after it, computed tile pair by tile pair.

    q: [q_tokens, q_heads, head_dim]; q_positions, q_segments: [q_tokens] int32;
    kv_positions, kv_segments: [kv_tokens] int32, the key stream.
    k, v: [kv_tokens, kv_heads, head_dim], or any [stored, kv_heads, head_dim]
    storage (a pool layer's slots) when kv_rows [kv_tokens] int32 says where
    each key of the stream is stored; v_rows [kv_tokens] int32, where its value
    is stored when that differs (keys and values in one storage, such as a
    whole pool viewed as rows). Tiles larger than a stream shrink to it.
    Returns out [q_tokens, q_heads, head_dim] float32 and lse [q_tokens, q_heads]
    float32 (-inf where the query sees no key; out is 0 there), as `partial_attention`.
    """
    q_tokens, q_heads, head_dim = q.shape
    kv_tokens, kv_heads = kv_segments.shape[0], k.shape[1]
    group = q_heads // kv_heads
    q_tile, kv_tile = min(q_tile, q_tokens), min(kv_tile, kv_tokens)
    q_padded = -(-q_tokens // q_tile) * q_tile
    kv_padded = -(-kv_tokens // kv_tile) * kv_tile
    q_positions, q_segments = pad_rows(q_positions, q_padded, 0), pad_rows(q_segments, q_padded, -1)
    kv_positions, kv_segments = pad_rows(kv_positions, kv_padded, 0), pad_rows(kv_segments, kv_padded, -1)
    first_tile, tile_count = key_tile_ranges(q_positions, q_segments, kv_positions, kv_segments, q_tile, kv_tile)
    q = pad_rows(q.astype(jnp.float32), q_padded, 0.0).reshape(-1, q_tile, kv_heads, group, head_dim) * scale
    if kv_rows is None:  # the stream itself: tiles are slices of k, v (padded like the stream)
        k, v = pad_rows(k, kv_padded, 0), pad_rows(v, kv_padded, 0)
    else:  # tiles are gathered from the storage
        kv_rows = pad_rows(kv_rows, kv_padded, 0)
        v_rows = kv_rows if v_rows is None else pad_rows(v_rows, kv_padded, 0)

    def key_tile(x, rows, start):
        """[K, kvh, hd] float32 rows start .. start + K - 1 of the key stream."""
        if rows is None:
            return jax.lax.dynamic_slice_in_dim(x, start, kv_tile).astype(jnp.float32)
        return x[jax.lax.dynamic_slice_in_dim(rows, start, kv_tile)].astype(jnp.float32)

    def query_tile(inputs):
        q_t, pos_t, seg_t, first, count = inputs  # [Q, kvh, g, hd], [Q], [Q], (), ()

        def visit(step, carry):
            row_max, row_sum, acc = carry  # [kvh, g, Q], [kvh, g, Q], [kvh, g, Q, hd]
            start = (first + step) * kv_tile
            kv_seg_t = jax.lax.dynamic_slice_in_dim(kv_segments, start, kv_tile)  # [K]
            k_t = key_tile(k, kv_rows, start)  # [K, kvh, hd]
            # Padding and unwritten slots may hold anything, even NaN: zero them, as 0 * NaN is NaN.
            v_t = jnp.where((kv_seg_t >= 0)[:, None, None], key_tile(v, v_rows, start), 0.0)
            mask = attention_mask(pos_t, seg_t, jax.lax.dynamic_slice_in_dim(kv_positions, start, kv_tile),
                                  kv_seg_t)  # [Q, K]
            scores = jnp.where(mask, jnp.einsum("qhgd,khd->hgqk", q_t, k_t), NEG_INF)  # [kvh, g, Q, K]
            new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            rescale = jnp.exp(row_max - safe_max)  # 0 while the row has seen nothing (-inf - 0)
            weights = jnp.exp(scores - safe_max[..., None])  # masked: exp(-inf) = 0
            row_sum = row_sum * rescale + jnp.sum(weights, axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum("hgqk,khd->hgqd", weights, v_t)
            return new_max, row_sum, acc

        # Carries derived from q keep its per-member variance inside a shard_map.
        acc = jnp.zeros_like(q_t).transpose(1, 2, 0, 3)  # [kvh, g, Q, hd]
        row_sum = acc[..., 0]
        row_max = jnp.full_like(row_sum, NEG_INF)
        row_max, row_sum, acc = jax.lax.fori_loop(0, count, visit, (row_max, row_sum, acc))
        seen = row_sum > 0
        out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
        lse = jnp.where(seen, jnp.log(jnp.where(seen, row_sum, 1.0)) + row_max, NEG_INF)
        return out.transpose(2, 0, 1, 3), lse.transpose(2, 0, 1)  # [Q, kvh, g, hd], [Q, kvh, g]

    out, lse = jax.lax.map(query_tile, (q, q_positions.reshape(-1, q_tile), q_segments.reshape(-1, q_tile),
                                        first_tile, tile_count))
    out = out.reshape(q_padded, q_heads, head_dim)[:q_tokens]
    return out, lse.reshape(q_padded, q_heads)[:q_tokens]


def segment_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments,
                      scale: float) -> tuple[jax.Array, jax.Array]:
    """`partial_attention` with the packed-stream mask, dense when both sides fit in
    about one tile (one tile pair costs no less), block-sparse otherwise."""
    if q.shape[0] <= Q_TILE and k.shape[0] <= KV_TILE:
        mask = attention_mask(q_positions, q_segments, kv_positions, kv_segments)
        return partial_attention(q, k, v, mask, scale)
    return blocked_partial_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, scale)
