"""Paged decode attention (Pallas, Triton backend): one query per request over
the tokens a member holds of it, read in place from the member's pool, split-K,
returning (out, lse) so that partials of several members merge exactly.

Inputs are those of `sharding.decode_attention`: the member's pool in its
native layout [1, layers, 2, pages, page_size, kv_heads, head_dim] and its
flat page entries (row, page, tokens held), sorted by row and padded.

Data flow of `paged_decode_partials`:
  1. XLA, no loop: each row's page table is the range of its entries that
     hold tokens, [first, first + count) (`row_entry_ranges`; integer
     min / max, deterministic). Padding entries and padding rows get count 0.
     The pool is viewed as rows [layers * 2 * pages * page_size, kvh, hd]
     (a reshape, no copy); the layer's keys start at row
     2 * layer * pages * page_size, its values one store later (`layer`
     may be traced: a BlockSpec could not select it).
     Queries are grouped by kv head and the group padded to >= 16 rows (the
     smallest Triton matmul tile): q [R, kvh, G, hd].
  2. One `pallas_call`, grid (rows, kv_heads, splits). Program (r, h, s)
     takes split s of row r's entries (equal shares of `pages_per_tile`
     entries) and loops over them a tile at a time inside the kernel: the
     tile's `pages_per_tile * page_size` slots are gathered from the pool
     (page of each entry * page_size + offset), keys past an entry's held
     tokens are masked, and scores (float32 accumulation, scale applied)
     fold into a natural-log online softmax. A program whose share is empty
     (padding rows, short rows) does no loads: padding costs nothing.
  3. Each split writes out [G, hd] float32 (normalised over its keys) and lse
     [G]; the splits are merged in split order with `merge_partials`, a fixed
     order of float32 operations (deterministic), giving out [R, hq, hd] and
     lse [R, hq] float32 (-inf where the member holds nothing of the row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from loong_jax.models.attention import NEG_INF, merge_partials
from loong_jax.models.kernels.dispatch import is_power_of_two, kernel_output, varying_alike

TILE_TOKENS = 64  # keys gathered per loop step (whole pages: at least one page)
MIN_QUERY_ROWS = 16  # Triton's smallest matmul tile: a query group is padded to this
TARGET_PROGRAMS = 512  # splits are raised until rows x kv_heads x splits reaches about this
MAX_SPLITS = 16
NUM_WARPS = 4
NUM_STAGES = 2


def supports(head_dim: int, page_size: int) -> bool:
    """Whether the kernel can tile this head size and page size."""
    return head_dim >= 16 and is_power_of_two(head_dim) and is_power_of_two(page_size)


def pages_per_tile(page_size: int) -> int:
    return max(1, TILE_TOKENS // page_size)


def choose_splits(rows: int, kv_heads: int, entries: int, page_size: int) -> int:
    """Static split count: enough programs to fill a GPU, never more than the tiles an entry list has."""
    tiles = -(-entries // pages_per_tile(page_size))
    splits = 1
    while splits < MAX_SPLITS and rows * kv_heads * splits < TARGET_PROGRAMS and splits * 2 <= tiles:
        splits *= 2
    return splits


def row_entry_ranges(entry_rows, entry_tokens, rows: int):
    """(first [rows], count [rows]) int32: row r's entries holding tokens are first .. first + count - 1.

    entry_rows, entry_tokens: [E] int32, sorted by row (padding entries hold 0 tokens)."""
    entries = entry_rows.shape[0]
    index = jnp.arange(entries, dtype=jnp.int32)
    holds = entry_tokens > 0
    row = jnp.clip(entry_rows, 0, rows - 1)
    first = jax.ops.segment_min(jnp.where(holds, index, entries), row, num_segments=rows,
                                indices_are_sorted=True)  # [rows]; empty rows: a large value
    last = jax.ops.segment_max(jnp.where(holds, index, -1), row, num_segments=rows, indices_are_sorted=True)
    count = jnp.where(last >= first, last - first + 1, 0)
    return jnp.clip(first, 0, entries - 1).astype(jnp.int32), count.astype(jnp.int32)


def _decode_kernel(first_ref, count_ref, store_base_ref, pages_ref, tokens_ref, q_ref, stores_ref, out_ref,
                   lse_ref, *, scale: float, page_size: int, pages_per_tile: int, splits: int):
    """One (row, kv head, split) program.

    first_ref, count_ref: [R]; store_base_ref: [2] first row of the layer's keys and of its values in
    stores_ref; pages_ref, tokens_ref: [E]; q_ref: [G, D];
    stores_ref: [layers * 2 * pages * page_size, D] (this kv head, every layer); out_ref: [G, D]; lse_ref: [G].
    """
    row, split = pl.program_id(0), pl.program_id(2)
    first, count = first_ref[row], count_ref[row]
    k_base, v_base = store_base_ref[0], store_base_ref[1]
    share = pl.cdiv(pl.cdiv(count, splits), pages_per_tile) * pages_per_tile  # entries per split
    begin = jnp.minimum(split * share, count)
    end = jnp.minimum(begin + share, count)
    tile_keys = pages_per_tile * page_size
    key = jax.lax.broadcasted_iota(jnp.int32, (tile_keys,), 0)
    entry_of_key, offset = key // page_size, key % page_size  # [K]
    q = q_ref[...]  # [G, D]

    def visit(step, carry):
        row_max, row_sum, acc = carry  # [G], [G], [G, D]
        entry = begin + step * pages_per_tile + entry_of_key  # [K], within the row's range
        listed = entry < end
        entry = first + jnp.where(listed, entry, 0)
        page, held = pages_ref[entry], tokens_ref[entry]  # [K]
        valid = listed & (offset < held)
        slots = page * page_size + offset  # [K], in range (pages clipped): loads need no mask
        k = stores_ref[k_base + slots, :].astype(q.dtype)  # [K, D]
        v = stores_ref[v_base + slots, :].astype(q.dtype)
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # stale slots may hold NaN
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale  # [G, K]
        scores = jnp.where(valid[None, :], scores, NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        safe_max = jnp.where(new_max == NEG_INF, 0.0, new_max)
        rescale = jnp.exp(row_max - safe_max)
        weights = jnp.exp(scores - safe_max[:, None])  # [G, K]
        row_sum = row_sum * rescale + jnp.sum(weights, axis=1)
        update = jax.lax.dot_general(weights.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [G, D]
        return new_max, row_sum, acc * rescale[:, None] + update

    group, head_dim = q.shape
    start = (jnp.full((group,), NEG_INF, jnp.float32), jnp.zeros((group,), jnp.float32),
             jnp.zeros((group, head_dim), jnp.float32))
    row_max, row_sum, acc = jax.lax.fori_loop(0, pl.cdiv(end - begin, pages_per_tile), visit, start)
    seen = row_sum > 0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out_ref[...] = acc / safe_sum[:, None]
    lse_ref[...] = jnp.where(seen, jnp.log(safe_sum) + row_max, NEG_INF)


def paged_decode_partials(q_all, pool, layer: int | jax.Array, entry_rows, entry_pages, entry_tokens,
                          scale: float, *, interpret: bool = False,
                          splits: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Partial attention of every row's query over the tokens this member holds of the row's request.

    q_all: [R, q_heads, head_dim]; pool: [1, layers, 2, pages, page_size, kv_heads, head_dim];
    layer: the pool layer (an int, or an int32 scalar traced by a layer scan);
    entry_rows, entry_pages, entry_tokens: [E] int32 (sorted by row; padding holds 0 tokens);
    splits: static split-K count (None: `choose_splits`).
    Returns out [R, q_heads, head_dim] float32 and lse [R, q_heads] float32.
    """
    rows, q_heads, head_dim = q_all.shape
    layers, num_pages, page_size, kv_heads = pool.shape[1], pool.shape[3], pool.shape[4], pool.shape[5]
    entries, group = entry_rows.shape[0], q_heads // kv_heads
    padded_group = max(MIN_QUERY_ROWS, 1 << (group - 1).bit_length())
    splits = splits or choose_splits(rows, kv_heads, entries, page_size)
    per_tile = pages_per_tile(page_size)
    q = q_all.reshape(rows, kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))  # [R, kvh, G, D]
    layer_slots = num_pages * page_size
    stores = pool.reshape(layers * 2 * layer_slots, kv_heads, head_dim)  # a view: no copy
    # A BlockSpec's index map cannot read a traced layer: the kernel sees every layer's rows and offsets
    # its loads by the first row of the layer's keys (store 2 * layer) and values (2 * layer + 1).
    store_base = (2 * jnp.asarray(layer, jnp.int32) + jnp.arange(2, dtype=jnp.int32)) * layer_slots  # [2]
    first, count = row_entry_ranges(entry_rows, entry_tokens, rows)
    pages = jnp.clip(entry_pages, 0, num_pages - 1)

    def whole(length):
        return pl.BlockSpec((length,), lambda r, h, s: (0,))

    inputs = varying_alike(first, count, store_base, pages, entry_tokens, q, stores)
    out, lse = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, page_size=page_size, pages_per_tile=per_tile,
                          splits=splits),
        grid=(rows, kv_heads, splits),
        in_specs=[whole(rows), whole(rows), whole(2), whole(entries), whole(entries),
                  pl.BlockSpec((None, None, padded_group, head_dim), lambda r, h, s: (r, h, 0, 0)),
                  pl.BlockSpec((stores.shape[0], None, head_dim), lambda r, h, s: (0, h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, padded_group, head_dim), lambda r, h, s: (r, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, padded_group), lambda r, h, s: (r, h, s, 0))],
        out_shape=[kernel_output((rows, kv_heads, splits, padded_group, head_dim), jnp.float32, inputs[0]),
                   kernel_output((rows, kv_heads, splits, padded_group), jnp.float32, inputs[0])],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="loong_paged_decode",
    )(*inputs)
    merged_out, merged_lse = out[:, :, 0], lse[:, :, 0]  # [R, kvh, G, D], [R, kvh, G]
    for split in range(1, splits):  # a fixed order: the same sums every run
        merged_out, merged_lse = merge_partials(merged_out, merged_lse, out[:, :, split], lse[:, :, split])
    merged_out = merged_out[:, :, :group].reshape(rows, q_heads, head_dim)
    return merged_out, merged_lse[:, :, :group].reshape(rows, q_heads)
