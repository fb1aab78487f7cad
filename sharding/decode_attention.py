"""Multi-master distributed decode attention: one decode step of one layer over a group.

A decode batch of d * B_local requests runs on a group of d members (mesh
axes SEQ x TENSOR). Rows [m * B_local, (m + 1) * B_local) are the requests
member m is *master* of: it computed their q, k, v and keeps their new tokens.
The KV of a request may live on any number of members (scale-down left it
there, scale-up added new masters), each member holding some of its tokens in
its own pages. Each member describes what it holds as a flat, ragged list of
page entries (row, page, tokens held in that page), sorted by row and padded
to a power-of-two bucket, so its work follows the pages it actually holds,
not batch x longest request. Per layer, inside `jax.shard_map`:

  1. Append: each master writes the new k, v of its requests at their
     `append_slots` (flat slot `page * page_size + offset` in its own pool);
     padding rows carry slot -1 and are dropped.
  2. All-gather q over SEQ: every member sees every query of the batch.
  3. Partial attention: member m visits its page entries chunk by chunk; each
     entry gathers one page and the query of its row, scores its held tokens,
     and the entries of a row are combined with segment max / sum (exact
     softmax statistics) -> (out, log-sum-exp) per row in float32; chunks
     merge online. A row with no entries on m yields out 0, lse = -inf.
     That is the reference code (CPU); on CUDA (or with the "interpret"
     implementation, see `models.kernels.dispatch`) the paged decode kernel
     `models.kernels.paged_decode_attention` computes the same partials from
     the pool in place, split-K, visiting only the entries that hold tokens.
  4. All-to-all over SEQ: the partials of master m's rows go back to m.
  5. Exact merge: the master combines the d partials of each of its rows with
     `merge_partials` (log-sum-exp weights), which equals softmax attention
     over the union of the keys, whatever way they are spread.

Heads are split over TENSOR (kv heads and their query groups stay together),
so no tensor-axis communication is needed here. Attention never looks at key
order: RoPE was applied before the keys were stored, so a member may keep any
subset of a request's tokens densely in its pages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from loong_jax.models.attention import NEG_INF, merge_partials
from loong_jax.models.kernels import paged_decode_attention
from loong_jax.models.kernels.dispatch import AUTO, by_platform, checks_vma
from loong_jax.sharding.specs import BY_MEMBER_SPEC, HEADS_SPEC, POOL_SPEC, REPLICATED_SPEC
from loong_jax.sharding.topology import SEQ
# Page entries a member attends at once; more are visited chunk by chunk with an
# online log-sum-exp merge, which bounds the gathered KV however much is held.
PAGES_PER_CHUNK = 1024


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("pool", "entry_rows", "entry_pages", "entry_tokens", "append_slots"),
                   meta_fields=())
@dataclasses.dataclass
class DecodeKVCache:
    """What the decode attention hook carries from layer to layer (E = page entries per member).

    pool:         [d, layers, 2, pages, page_size, kv_heads, head_dim]  (POOL_SPEC)
    entry_rows:   [d, E] int32  batch row of member m's entry e; sorted (padding: the last row)
    entry_pages:  [d, E] int32  page of member m's pool the entry reads
    entry_tokens: [d, E] int32  tokens of the row held in that page (0 = padding entry),
                  including this step's append
    append_slots: [d * B_local] int32  flat slot in the master's pool for the new token; -1 = padding
    """

    pool: jax.Array
    entry_rows: jax.Array
    entry_pages: jax.Array
    entry_tokens: jax.Array
    append_slots: jax.Array


def _append_new_kv(pool, layer, k_new, v_new, append_slots):
    """Writes this step's k, v of the member's own rows into its pool (a scatter: in place).

    layer: [] int32; pool: [1, layers, 2, pages, page_size, kvh, hd]; k_new, v_new: [B_local, kvh, hd];
    append_slots: [B_local] (-1 = padding row, written nowhere).
    """
    num_pages, page_size = pool.shape[3], pool.shape[4]
    # Negative indices would wrap around, so padding goes to an index past the end,
    # which mode="drop" discards.
    page = jnp.where(append_slots >= 0, append_slots // page_size, num_pages)  # [B_local]
    offset = jnp.where(append_slots >= 0, append_slots % page_size, 0)  # [B_local]
    pool = pool.at[0, layer, 0, page, offset].set(k_new.astype(pool.dtype), mode="drop")
    return pool.at[0, layer, 1, page, offset].set(v_new.astype(pool.dtype), mode="drop")


def _chunk_partials(q_all, pool, layer, rows, pages, tokens, scale: float):
    """Partial attention of every row's query over one chunk of this member's page entries.

    q_all: [R, hq, hd]; layer: [] int32; rows, pages, tokens: [C] (sorted by row, pages in range).
    Returns out [R, hq, hd] float32 and lse [R, hq] float32 (-inf: no token of the row here).
    """
    num_rows, q_heads, head_dim = q_all.shape
    page_size, kv_heads = pool.shape[4], pool.shape[5]
    entries, group = rows.shape[0], q_heads // kv_heads
    # One gather each, indexed by the layer too: slicing the layer first would copy a whole
    # layer of the pool (a dynamic slice) when `layer` is traced.
    keys = pool[0, layer, 0, pages].astype(jnp.float32)  # [C, page_size, kvh, hd]
    values = pool[0, layer, 1, pages]  # [C, page_size, kvh, hd]
    held = jnp.arange(page_size)[None, :] < tokens[:, None]  # [C, page_size]
    # Slots past the held tokens may keep a former request's values; zero them so that
    # even a non-finite leftover cannot leak through a zero softmax weight.
    values = jnp.where(held[:, :, None, None], values, 0).astype(jnp.float32)
    q = q_all[rows].astype(jnp.float32).reshape(entries, kv_heads, group, head_dim)  # [C, kvh, g, hd]
    scores = jnp.einsum("ekgd,eskd->ekgs", q, keys) * scale  # [C, kvh, g, page_size]
    scores = jnp.where(held[:, None, None, :], scores, NEG_INF)
    row_max = jax.ops.segment_max(scores.max(axis=-1), rows, num_segments=num_rows,
                                  indices_are_sorted=True)  # [R, kvh, g]; -inf: nothing held
    safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - safe_max[rows][..., None])  # [C, kvh, g, page_size]; masked: 0
    denom = jax.ops.segment_sum(weights.sum(axis=-1), rows, num_segments=num_rows,
                                indices_are_sorted=True)  # [R, kvh, g]
    weighted = jnp.einsum("ekgs,eskd->ekgd", weights, values)  # [C, kvh, g, hd]
    acc = jax.ops.segment_sum(weighted, rows, num_segments=num_rows, indices_are_sorted=True)  # [R, kvh, g, hd]
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)) + safe_max, NEG_INF)
    return out.reshape(num_rows, q_heads, head_dim), lse.reshape(num_rows, q_heads)


def _local_partials(q_all, pool, layer, entry_rows, entry_pages, entry_tokens, scale: float,
                    pages_per_chunk: int):
    """Partial attention of every query over the tokens this member holds of its row's request.

    q_all: [R, hq, hd] (R = d * B_local); entry_rows, entry_pages, entry_tokens: [E] (sorted by row).
    Returns out [R, hq, hd] float32 and lse [R, hq] float32. The entries are visited in
    chunks of `pages_per_chunk` with an online merge, so the gathered KV stays bounded.
    """
    num_pages = pool.shape[3]
    entries = entry_rows.shape[0]
    chunk = min(entries, pages_per_chunk)
    chunks = -(-entries // chunk)
    pad = chunks * chunk - entries
    # Extra entries repeat the last row (keeping the order sorted) and hold no token.
    rows = jnp.pad(entry_rows, (0, pad), mode="edge").reshape(chunks, chunk)  # [chunks, C]
    pages = jnp.pad(jnp.clip(entry_pages, 0, num_pages - 1), (0, pad)).reshape(chunks, chunk)
    tokens = jnp.pad(entry_tokens, (0, pad)).reshape(chunks, chunk)
    if chunks == 1:
        return _chunk_partials(q_all, pool, layer, rows[0], pages[0], tokens[0], scale)

    def visit_chunk(carry, chunk_entries):
        out, lse = _chunk_partials(q_all, pool, layer, *chunk_entries, scale)
        return merge_partials(*carry, out, lse), None

    # *_like keeps q's per-member variation, as a shard_map loop carry must.
    start = (jnp.zeros_like(q_all, dtype=jnp.float32), jnp.full_like(q_all[..., 0], NEG_INF, dtype=jnp.float32))
    (out, lse), _ = jax.lax.scan(visit_chunk, start, (rows, pages, tokens))
    return out, lse


def _member_partials(q_all, pool, layer, entry_rows, entry_pages, entry_tokens, scale: float,
                     pages_per_chunk: int, attention_impl: str):
    """`_local_partials` (the reference) or the paged decode kernel, as `attention_impl` and the platform say."""
    page_size, head_dim = pool.shape[4], pool.shape[6]

    def reference(q_all, pool, layer, entry_rows, entry_pages, entry_tokens):
        return _local_partials(q_all, pool, layer, entry_rows, entry_pages, entry_tokens, scale, pages_per_chunk)

    def kernel(q_all, pool, layer, entry_rows, entry_pages, entry_tokens, *, interpret):
        return paged_decode_attention.paged_decode_partials(q_all, pool, layer, entry_rows, entry_pages,
                                                            entry_tokens, scale, interpret=interpret)

    usable = paged_decode_attention.supports(head_dim, page_size)
    return by_platform(attention_impl, reference, kernel if usable else None,
                       q_all, pool, layer, entry_rows, entry_pages, entry_tokens)


def _member_decode_attention(layer, q, k_new, v_new, pool, entry_rows, entry_pages, entry_tokens, append_slots,
                             *, members: int, scale: float, pages_per_chunk: int, attention_impl: str):
    """The body run by every (member, tensor shard) of the group.

    layer: [] int32 (replicated); q: [B_local, hq_local, hd]; k_new, v_new: [B_local, kvh_local, hd];
    pool: [1, layers, 2, pages, page_size, kvh_local, hd];
    entry_rows, entry_pages, entry_tokens: [1, E]; append_slots: [B_local].
    """
    batch_local = q.shape[0]
    pool = _append_new_kv(pool, layer, k_new, v_new, append_slots)
    entries = (entry_rows[0], entry_pages[0], entry_tokens[0])
    if members == 1:  # a lone member holds all KV of its requests: nothing to exchange
        out, _ = _member_partials(q, pool, layer, *entries, scale, pages_per_chunk, attention_impl)
        return out.astype(q.dtype), pool
    q_all = jax.lax.all_gather(q, SEQ, axis=0, tiled=True)  # [R, hq_local, hd]
    out, lse = _member_partials(q_all, pool, layer, *entries, scale, pages_per_chunk, attention_impl)
    # Row block j of the partials belongs to member j; afterwards block i holds
    # what member i computed for *my* rows.
    out = jax.lax.all_to_all(out, SEQ, split_axis=0, concat_axis=0, tiled=True)  # [R, hq, hd]
    lse = jax.lax.all_to_all(lse, SEQ, split_axis=0, concat_axis=0, tiled=True)  # [R, hq]
    out = out.reshape(members, batch_local, *out.shape[1:])  # [d, B_local, hq, hd]
    lse = lse.reshape(members, batch_local, *lse.shape[1:])  # [d, B_local, hq]
    merged_out, merged_lse = out[0], lse[0]
    for member in range(1, members):
        merged_out, merged_lse = merge_partials(merged_out, merged_lse, out[member], lse[member])
    return merged_out.astype(q.dtype), pool


def decode_attention(layer: int | jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     segment_ids: jax.Array, kv_cache: DecodeKVCache, *, mesh: Mesh,
                     pages_per_chunk: int = PAGES_PER_CHUNK,
                     attention_impl: str = AUTO) -> tuple[jax.Array, DecodeKVCache]:
    """The model's attention hook for one distributed decode step (see module docstring).

    layer: the pool layer, an int or an int32 scalar traced by the model's layer scan;
    q: [d * B_local, q_heads, head_dim]; k, v: [d * B_local, kv_heads, head_dim] (RoPE applied).
    Positions and segment ids are not needed: a decode query sees every token
    its request holds, and padding rows hold nothing (no entries, slot -1).
    attention_impl: `models.kernels.dispatch` implementation (static).
    Returns out [d * B_local, q_heads, head_dim] in q's dtype and the cache with
    the updated pool.
    """
    del positions, segment_ids
    body = functools.partial(_member_decode_attention, members=mesh.shape[SEQ],
                             scale=q.shape[-1] ** -0.5, pages_per_chunk=pages_per_chunk,
                             attention_impl=attention_impl)
    out, pool = jax.shard_map(
        body,
        mesh=mesh,
        # layer; q, k, v; pool; entries, append slots
        in_specs=(REPLICATED_SPEC,) + (HEADS_SPEC,) * 3 + (POOL_SPEC,) + (BY_MEMBER_SPEC,) * 4,
        out_specs=(HEADS_SPEC, POOL_SPEC), check_vma=checks_vma(attention_impl),
    )(jnp.asarray(layer, jnp.int32), q, k, v, kv_cache.pool, kv_cache.entry_rows, kv_cache.entry_pages,
      kv_cache.entry_tokens, kv_cache.append_slots)
    return out, dataclasses.replace(kv_cache, pool=pool)
