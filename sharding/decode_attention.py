"""Multi-master distributed decode attention: one decode step of one layer over a group.

A decode batch of d * B_local requests runs on a group of d members (mesh
axes SEQ x TENSOR). Rows [m * B_local, (m + 1) * B_local) are the requests
member m is *master* of: it computed their q, k, v and keeps their new tokens.
The KV of a request may live on any number of members (scale-down left it
there, scale-up added new masters), each member holding some of its tokens in
its own pages. Per layer, inside `jax.shard_map`:

  1. Append: each master writes the new k, v of its requests at their
     `append_slots` (flat slot `page * page_size + offset` in its own pool);
     padding rows carry slot -1 and are dropped.
  2. All-gather q over SEQ: every member sees every query of the batch.
  3. Partial attention: member m gathers, for every request r, the pages
     `page_tables[m, r]` it holds (chunk by chunk, merged online) and attends
     the query of r over the first `kv_lens[m, r]` tokens of them -> (out,
     log-sum-exp) in float32. A member holding nothing of r yields lse = -inf.
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
from jax.sharding import Mesh, PartitionSpec as P

from loong_jax.models.attention import NEG_INF, merge_partials, partial_attention
from loong_jax.sharding.kv_pool import POOL_SPEC
from loong_jax.sharding.topology import SEQ, TENSOR

# Per-request arrays of the batch: rows split over the members (their masters).
ROW_SPEC = P(SEQ)
# q/k/v of the batch: rows over members, heads over the devices of an instance.
HEADS_SPEC = P(SEQ, TENSOR, None)
# Per-member arrays with a leading member axis ([d, ...]).
MEMBER_SPEC = P(SEQ)
# Pages of a request attended at once on a member; longer page lists are
# visited chunk by chunk with an online log-sum-exp merge.
PAGES_PER_CHUNK = 64


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("pool", "page_tables", "kv_lens", "append_slots"), meta_fields=())
@dataclasses.dataclass
class DecodeKVCache:
    """What the decode attention hook carries from layer to layer.

    pool:         [d, layers, 2, pages, page_size, kv_heads, head_dim]  (POOL_SPEC)
    page_tables:  [d, d * B_local, max_pages] int32  member m's pages of request r, in order
    kv_lens:      [d, d * B_local] int32  tokens of r held on m, including this step's append
    append_slots: [d * B_local] int32  flat slot in the master's pool for the new token; -1 = padding
    """

    pool: jax.Array
    page_tables: jax.Array
    kv_lens: jax.Array
    append_slots: jax.Array


def _append_new_kv(pool, layer: int, k_new, v_new, append_slots):
    """Writes this step's k, v of the member's own rows into its pool.

    pool: [1, layers, 2, pages, page_size, kvh, hd]; k_new, v_new: [B_local, kvh, hd];
    append_slots: [B_local] (-1 = padding row, written nowhere).
    """
    num_pages, page_size = pool.shape[3], pool.shape[4]
    # Negative indices would wrap around, so padding goes to an index past the end,
    # which mode="drop" discards.
    page = jnp.where(append_slots >= 0, append_slots // page_size, num_pages)  # [B_local]
    offset = jnp.where(append_slots >= 0, append_slots % page_size, 0)  # [B_local]
    pool = pool.at[0, layer, 0, page, offset].set(k_new.astype(pool.dtype), mode="drop")
    return pool.at[0, layer, 1, page, offset].set(v_new.astype(pool.dtype), mode="drop")


def _chunk_partials(q_all, pool, layer: int, pages, first_token, kv_lens, scale: float):
    """Partial attention of every query over one chunk of its request's pages on this member.

    q_all: [R, hq, hd]; pages: [R, chunk_pages] (already in range); first_token: index,
    within the request's tokens on this member, of the chunk's first slot; kv_lens: [R].
    """
    rows, chunk_pages = pages.shape
    chunk_tokens = chunk_pages * pool.shape[4]
    k_held = pool[0, layer, 0][pages]  # [R, chunk_pages, page_size, kvh, hd]
    v_held = pool[0, layer, 1][pages]
    k_held = k_held.reshape(rows, chunk_tokens, *k_held.shape[3:])  # [R, S, kvh, hd]
    v_held = v_held.reshape(rows, chunk_tokens, *v_held.shape[3:])
    held = first_token + jnp.arange(chunk_tokens)[None, :] < kv_lens[:, None]  # [R, S]
    # Slots past kv_len may hold a former request's values; zero them so that even a
    # non-finite leftover cannot leak through a zero softmax weight.
    v_held = jnp.where(held[:, :, None, None], v_held, 0)

    def one_request(q, k, v, mask):  # q: [hq, hd]; k, v: [S, kvh, hd]; mask: [S]
        out, lse = partial_attention(q[None], k, v, mask[None], scale)
        return out[0], lse[0]

    return jax.vmap(one_request)(q_all, k_held, v_held, held)


def _local_partials(q_all, pool, layer: int, page_tables, kv_lens, scale: float, pages_per_chunk: int):
    """Partial attention of every query over the tokens this member holds of its request.

    q_all: [R, hq, hd] (R = d * B_local); page_tables: [R, max_pages]; kv_lens: [R].
    Returns out [R, hq, hd] float32 and lse [R, hq] float32.
    The pages are visited in chunks of `pages_per_chunk` with an online merge, so
    the gathered KV stays bounded however long the requests are.
    """
    num_pages, page_size = pool.shape[3], pool.shape[4]
    rows, max_pages = page_tables.shape
    chunk_pages = min(max_pages, pages_per_chunk)
    chunks = -(-max_pages // chunk_pages)
    # Unused and padded table entries point at page 0; the kv_lens mask hides them.
    tables = jnp.pad(jnp.clip(page_tables, 0, num_pages - 1), ((0, 0), (0, chunks * chunk_pages - max_pages)))
    tables = tables.reshape(rows, chunks, chunk_pages).transpose(1, 0, 2)  # [chunks, R, chunk_pages]
    if chunks == 1:
        return _chunk_partials(q_all, pool, layer, tables[0], 0, kv_lens, scale)

    def visit_chunk(carry, chunk):
        index, pages = chunk
        out, lse = _chunk_partials(q_all, pool, layer, pages, index * chunk_pages * page_size, kv_lens,
                                   scale)
        return merge_partials(*carry, out, lse), None

    # *_like keeps q's per-member variation, as a shard_map loop carry must.
    start = (jnp.zeros_like(q_all, dtype=jnp.float32), jnp.full_like(q_all[..., 0], NEG_INF, dtype=jnp.float32))
    (out, lse), _ = jax.lax.scan(visit_chunk, start, (jnp.arange(chunks), tables))
    return out, lse


def _member_decode_attention(q, k_new, v_new, pool, page_tables, kv_lens, append_slots, *,
                             layer: int, members: int, scale: float, pages_per_chunk: int):
    """The body run by every (member, tensor shard) of the group.

    q: [B_local, hq_local, hd]; k_new, v_new: [B_local, kvh_local, hd];
    pool: [1, layers, 2, pages, page_size, kvh_local, hd];
    page_tables: [1, R, max_pages]; kv_lens: [1, R]; append_slots: [B_local].
    """
    batch_local = q.shape[0]
    pool = _append_new_kv(pool, layer, k_new, v_new, append_slots)
    if members == 1:  # a lone member holds all KV of its requests: nothing to exchange
        out, _ = _local_partials(q, pool, layer, page_tables[0], kv_lens[0], scale, pages_per_chunk)
        return out.astype(q.dtype), pool
    q_all = jax.lax.all_gather(q, SEQ, axis=0, tiled=True)  # [R, hq_local, hd]
    out, lse = _local_partials(q_all, pool, layer, page_tables[0], kv_lens[0], scale, pages_per_chunk)
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


def decode_attention(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                     segment_ids: jax.Array, kv_cache: DecodeKVCache, *, mesh: Mesh,
                     pages_per_chunk: int = PAGES_PER_CHUNK) -> tuple[jax.Array, DecodeKVCache]:
    """The model's attention hook for one distributed decode step (see module docstring).

    q: [d * B_local, q_heads, head_dim]; k, v: [d * B_local, kv_heads, head_dim] (RoPE applied).
    Positions and segment ids are not needed: a decode query sees every token
    its request holds, and padding rows hold nothing (kv_lens 0, slot -1).
    Returns out [d * B_local, q_heads, head_dim] in q's dtype and the cache with
    the updated pool.
    """
    del positions, segment_ids
    body = functools.partial(_member_decode_attention, layer=layer, members=mesh.shape[SEQ],
                             scale=q.shape[-1] ** -0.5, pages_per_chunk=pages_per_chunk)
    out, pool = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, POOL_SPEC, MEMBER_SPEC, MEMBER_SPEC, ROW_SPEC),
        out_specs=(HEADS_SPEC, POOL_SPEC),
    )(q, k, v, kv_cache.pool, kv_cache.page_tables, kv_cache.kv_lens, kv_cache.append_slots)
    return out, dataclasses.replace(kv_cache, pool=pool)
