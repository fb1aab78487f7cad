"""Flash attention over packed token streams (Pallas, Triton backend), with the
(out, lse) contract of `attention.partial_attention`.

A query sees a key iff both carry the same segment id (>= 0) and
kv_position <= q_position; the mask is computed from per-row positions and
segment ids, so packed, striped and padded layouts all work. Keys are either
a contiguous stream (a ring step's block) or, through `kv_rows`, rows of a
storage such as a paged KV pool (context prefill over paged KV).

Data flow of `flash_attention`:
  1. Host-free planning in XLA: the query stream is `query_blocks` blocks of
     equal length, each sorted by (segment, position) with padding anywhere
     (one member's rows each). Every block is padded to whole `q_tile`s (so
     no query tile straddles two blocks) and the key stream to whole
     `kv_tile`s (padding gets segment -1). `blocked_attention.key_tile_ranges`
     gives, per query tile, the contiguous range [first, first + count) of
     key tiles it can meet; tiles outside it are never visited.
  2. One `pallas_call`, grid (query tiles, q_heads). Program (i, h) holds
     query tile i of head h ([q_tile, head_dim], bf16 or f32) and loops
     `count[i]` times (a loop inside the kernel, no host round trip): it loads
     key tile first[i] + step ([kv_tile, head_dim] of kv head h // group,
     sliced, or gathered row by row through kv_rows, from the rows of its
     store, offset by the store's index, which may be traced), its positions and
     segments, computes scores with float32 accumulation, masks them, and
     folds them into a running max, sum and output in float32 (natural-log
     online softmax). Values of padding keys are zeroed (they may be NaN).
  3. out = acc / sum, lse = log(sum) + max; a row that saw no key gets out 0
     and lse -inf. Outputs: out [q_tokens, q_heads, head_dim] float32 and
     lse [q_tokens, q_heads] float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from loong_jax.models.attention import NEG_INF
from loong_jax.models.blocked_attention import key_tile_ranges, pad_rows
from loong_jax.models.kernels.dispatch import is_power_of_two, kernel_output, varying_alike

# 64 x 64 tiles with 4 warps keep a [64, 128] float32 accumulator plus a
# [64, 64] score tile in registers for head_dim 128 (the usual flash setting).
Q_TILE = 64
KV_TILE = 64
NUM_WARPS = 4
NUM_STAGES = 2


def supports(head_dim: int) -> bool:
    """Whether the kernel can tile this head size (Triton needs power-of-two tiles of >= 16)."""
    return head_dim >= 16 and is_power_of_two(head_dim)


def _flash_kernel(first_ref, count_ref, store_base_ref, q_ref, q_pos_ref, q_seg_ref, k_ref, v_ref, kv_pos_ref,
                  kv_seg_ref, kv_rows_ref, out_ref, lse_ref, *, scale: float, kv_tile: int):
    """One (query tile, q head) program; refs as laid out by `flash_attention`'s BlockSpecs.

    first_ref, count_ref: [q_tiles]; store_base_ref: [2] first row of the key store in k_ref and of the
    value store in v_ref; q_ref: [Q, D]; q_pos_ref, q_seg_ref: [Q];
    k_ref, v_ref: [stores * slots, D] (this head's kv head); kv_pos_ref, kv_seg_ref,
    kv_rows_ref (or None): [kv_tokens]; out_ref: [Q, D]; lse_ref: [Q].
    """
    tile = pl.program_id(0)
    first, count = first_ref[tile], count_ref[tile]
    k_base, v_base = store_base_ref[0], store_base_ref[1]
    q = q_ref[...]  # [Q, D]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]  # [Q]

    def visit(step, carry):
        row_max, row_sum, acc = carry  # [Q], [Q], [Q, D]
        keys = pl.ds((first + step) * kv_tile, kv_tile)
        kv_pos, kv_seg = kv_pos_ref[keys], kv_seg_ref[keys]  # [K]
        if kv_rows_ref is None:
            k = k_ref[pl.ds(k_base + (first + step) * kv_tile, kv_tile), :]  # [K, D]
            v = v_ref[pl.ds(v_base + (first + step) * kv_tile, kv_tile), :]
        else:
            rows = kv_rows_ref[keys]  # [K] rows of the store
            k, v = k_ref[k_base + rows, :], v_ref[v_base + rows, :]
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        real = kv_seg >= 0
        v = jnp.where(real[:, None], v, jnp.zeros_like(v))  # 0 * NaN is NaN: clear padding first
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale  # [Q, K]
        mask = ((q_seg[:, None] == kv_seg[None, :]) & real[None, :]
                & (kv_pos[None, :] <= q_pos[:, None]))  # [Q, K]
        scores = jnp.where(mask, scores, NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)
        rescale = jnp.exp(row_max - safe_max)  # 0 while the row has seen nothing
        weights = jnp.exp(scores - safe_max[:, None])  # [Q, K]; masked: 0
        row_sum = row_sum * rescale + jnp.sum(weights, axis=1)
        update = jax.lax.dot_general(weights.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [Q, D]
        return new_max, row_sum, acc * rescale[:, None] + update

    rows, head_dim = q.shape
    start = (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    row_max, row_sum, acc = jax.lax.fori_loop(0, count, visit, start)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out_ref[...] = acc / safe_sum[:, None]
    lse_ref[...] = jnp.where(seen, jnp.log(safe_sum) + row_max, NEG_INF)


def _flash_call(q, k_store, v_store, k_index, v_index, q_positions, q_segments, kv_positions,
                kv_segments, kv_rows, first, count, *, scale: float, q_tile: int, kv_tile: int, interpret: bool):
    """The pallas_call on padded streams.

    q: [Tq, hq, D] (Tq = q_tiles * q_tile); k_store, v_store: [stores, slots, kvh, D],
    keys in store k_index, values in store v_index (ints or int32 scalars: traced by a layer scan);
    q_positions, q_segments: [Tq]; kv_positions, kv_segments, kv_rows (or None): [Tk] (Tk = kv_tiles * kv_tile);
    first, count: [q_tiles] int32. Returns out [Tq, hq, D] float32, lse [hq, Tq] float32.
    """
    q_tokens, q_heads, head_dim = q.shape
    kv_heads, slots, kv_tokens = k_store.shape[2], k_store.shape[1], kv_segments.shape[0]
    group = q_heads // kv_heads
    q_tiles = q_tokens // q_tile
    # A BlockSpec's index map cannot read a traced store index, so the kernel sees every store's rows
    # (a reshape: no copy) and offsets its loads by the first row of its store.
    k_rows, v_rows = k_store.reshape(-1, kv_heads, head_dim), v_store.reshape(-1, kv_heads, head_dim)
    store_base = jnp.stack([jnp.asarray(k_index, jnp.int32), jnp.asarray(v_index, jnp.int32)]) * slots  # [2]

    def whole(length):  # the whole 1-D array in every program
        return pl.BlockSpec((length,), lambda i, h: (0,))

    def rows_of_head(store_rows):  # every row of kv head h // group
        return pl.BlockSpec((store_rows, None, head_dim), lambda i, h: (0, h // group, 0))

    query_rows = pl.BlockSpec((q_tile,), lambda i, h: (i,))
    in_specs = [whole(q_tiles), whole(q_tiles), whole(2),
                pl.BlockSpec((q_tile, None, head_dim), lambda i, h: (i, h, 0)), query_rows, query_rows,
                rows_of_head(k_rows.shape[0]), rows_of_head(v_rows.shape[0]), whole(kv_tokens), whole(kv_tokens),
                None if kv_rows is None else whole(kv_tokens)]
    inputs = varying_alike(first, count, store_base, q, q_positions, q_segments, k_rows, v_rows, kv_positions,
                           kv_segments, kv_rows)
    return pl.pallas_call(
        functools.partial(_flash_kernel, scale=scale, kv_tile=kv_tile),
        grid=(q_tiles, q_heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((q_tile, None, head_dim), lambda i, h: (i, h, 0)),
                   pl.BlockSpec((None, q_tile), lambda i, h: (h, i))],
        out_shape=[kernel_output((q_tokens, q_heads, head_dim), jnp.float32, inputs[0]),
                   kernel_output((q_heads, q_tokens), jnp.float32, inputs[0])],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="loong_flash_prefill",
    )(*inputs)


def flash_attention(q, k_store, v_store, q_positions, q_segments, kv_positions, kv_segments, scale: float, *,
                    k_index: int | jax.Array = 0, v_index: int | jax.Array = 0, kv_rows=None,
                    query_blocks: int = 1, interpret: bool = False, q_tile: int = Q_TILE,
                    kv_tile: int = KV_TILE) -> tuple[jax.Array, jax.Array]:
    """Partial attention of a query stream over a key stream (see the module docstring).

    q: [q_tokens, q_heads, head_dim], `query_blocks` sorted blocks one after another;
    q_positions, q_segments: [q_tokens] int32 (segment -1 = padding);
    k_store, v_store: [stores, slots, kv_heads, head_dim]: the keys are store k_index,
    the values store v_index (ints, or int32 scalars traced by a layer scan; a stream
    [kv_tokens, ...] is k[None]);
    kv_positions, kv_segments: [kv_tokens] int32; kv_rows: [kv_tokens] int32 slot of each
    key in the stores, or None when key j is slot j.
    Returns out [q_tokens, q_heads, head_dim] float32 and lse [q_tokens, q_heads] float32.
    """
    q_tokens, q_heads, head_dim = q.shape
    kv_tokens = kv_segments.shape[0]
    block_rows = q_tokens // query_blocks
    block_padded = -(-block_rows // q_tile) * q_tile
    kv_padded = -(-kv_tokens // kv_tile) * kv_tile

    def per_block(x, fill):  # [q_tokens, ...] -> [blocks * block_padded, ...], each block padded
        blocks = x.reshape(query_blocks, block_rows, *x.shape[1:])
        blocks = jax.vmap(lambda b: pad_rows(b, block_padded, fill))(blocks)
        return blocks.reshape(query_blocks * block_padded, *x.shape[1:])

    q_positions, q_segments = per_block(q_positions, 0), per_block(q_segments, -1)
    kv_positions, kv_segments = pad_rows(kv_positions, kv_padded, 0), pad_rows(kv_segments, kv_padded, -1)
    if kv_rows is not None:
        kv_rows = pad_rows(kv_rows, kv_padded, 0)
    ranges = functools.partial(key_tile_ranges, q_tile=q_tile, kv_tile=kv_tile)
    first, count = jax.vmap(ranges, in_axes=(0, 0, None, None))(
        q_positions.reshape(query_blocks, block_padded), q_segments.reshape(query_blocks, block_padded),
        kv_positions, kv_segments)  # [blocks, tiles per block] each
    out, lse = _flash_call(per_block(q, 0), k_store, v_store, k_index, v_index, q_positions, q_segments,
                           kv_positions, kv_segments, kv_rows, first.reshape(-1), count.reshape(-1),
                           scale=scale, q_tile=q_tile, kv_tile=kv_tile, interpret=interpret)

    def unpad(x):  # [blocks * block_padded, ...] -> [q_tokens, ...]
        return x.reshape(query_blocks, block_padded, *x.shape[1:])[:, :block_rows].reshape(q_tokens, *x.shape[1:])

    return unpad(out), unpad(lse.T)


def stream_tiles(tokens: int, tile: int) -> int:
    """The tile for a stream of `tokens` rows: `tile`, or the smallest power of two >= 16 covering
    a shorter stream (less padding for tiny ring blocks)."""
    return min(tile, max(16, 1 << max(tokens - 1, 0).bit_length()))


def prefill_partial_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, scale: float, *,
                              interpret: bool = False, q_tile: int = Q_TILE,
                              kv_tile: int = KV_TILE) -> tuple[jax.Array, jax.Array]:
    """`blocked_attention.segment_attention` as one kernel: both streams contiguous.

    q: [q_tokens, q_heads, head_dim]; k, v: [kv_tokens, kv_heads, head_dim];
    positions, segments: [q_tokens] / [kv_tokens] int32.
    Returns out [q_tokens, q_heads, head_dim] float32 and lse [q_tokens, q_heads] float32.
    """
    kv_tile = stream_tiles(k.shape[0], kv_tile)
    kv_padded = -(-k.shape[0] // kv_tile) * kv_tile  # every key tile the kernel reads is in bounds
    k, v = pad_rows(k, kv_padded, 0), pad_rows(v, kv_padded, 0)
    return flash_attention(q, k[None], v[None], q_positions, q_segments, kv_positions, kv_segments, scale,
                           interpret=interpret, q_tile=stream_tiles(q.shape[0], q_tile), kv_tile=kv_tile)
