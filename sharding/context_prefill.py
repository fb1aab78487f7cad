"""Chunked prefill with context: a chunk of each prompt (tokens start ..
start + length - 1) runs as a striped ring prefill on a group, and its queries
also attend to the KV of the prompt's earlier tokens, which earlier chunks
left in the pools of some group members (paged, stored densely per member and
request, as the decode program reads them).

Data flow:
  1. Host: `chunk_layout(chunks, d)` stripes the chunks' tokens over the
     members exactly like a whole-prompt prefill, but with global positions
     start + j; `place_densely(..., held_before=...)` puts each new token's KV right after what
     its keeper already holds of that request; `layout_context` gives, per
     member, the pages and the number of PREFIX tokens it holds of each
     request (`ContextTables`: [d, requests, max_pages], [d, requests]).
  2. Device, at each layer (the model's attention hook):
     a. the ring over the chunk's own tokens (`ring_prefill.ring_attention`,
        unchanged), which also writes every placed token's k, v into its
        keeper's pool -> (out, lse) per local row;
     b. q and the segment ids are all-gathered over SEQ; every member attends
        every query over the prefix tokens it holds of the query's request.
        No causal mask is needed there: the whole prefix precedes the whole
        chunk. The (request, page) entries that hold tokens are packed first,
        in request order, into a key stream read straight from the pool;
        block-sparse attention (`blocked_attention`, key tiles of
        `pages_per_visit` pages) visits, for each tile of a member's queries,
        only the key tiles of its requests, so the work follows
        sum(chunk x prefix) per request, not all queries x all prefixes.
        That is the reference code (CPU, `lax.map` over the members' row
        blocks); on CUDA (or with the "interpret" implementation,
        `models.kernels.dispatch`) one flash kernel launch
        (`models.kernels.prefill_attention.flash_attention`) covers every
        member's row block, gathering key tiles from the pool through the same
        key stream, each query tile visiting only its requests' key tiles;
     c. `all_to_all` returns each row's d partials to the member that owns
        the row, which merges them, then the ring's partial, exactly by
        log-sum-exp (`merge_partials`).
  3. A request with start = 0 holds no prefix: its context partial is
     (0, -inf) and the merge returns the ring's output unchanged, so a batch
     mixing fresh prompts and continued ones is one program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from loong_jax.models.attention import merge_partials
from loong_jax.models.blocked_attention import KV_TILE, blocked_partial_attention
from loong_jax.models.kernels import prefill_attention
from loong_jax.models.kernels.dispatch import AUTO, by_platform, checks_vma
from loong_jax.sharding.prefill_program import PrefillInputs
from loong_jax.sharding.ring_prefill import RingPrefillCache, ring_attention
from loong_jax.sharding.specs import BY_MEMBER_SPEC, HEADS_SPEC, LSE_SPEC, POOL_SPEC, REPLICATED_SPEC
from loong_jax.sharding.stripe_layout import (
    PackedLayout, stream_positions, striped_layout)
from loong_jax.sharding.topology import SEQ

# ---------------------------------------------------------------- host side
def chunk_layout(chunks: Sequence[tuple[int, int]], members: int,
                 rows_per_member: int | None = None) -> PackedLayout:
    """Striped layout of the chunks (start, length) of a batch: token j of a
    chunk on member j mod d, at global position start + j."""
    starts = np.array([start for start, _ in chunks], dtype=np.int64)
    lengths = [length for _, length in chunks]
    if (starts < 0).any():
        raise ValueError(f"chunk starts must be >= 0, got {starts.tolist()}")
    layout = striped_layout(lengths, members, rows_per_member)
    positions = stream_positions(lengths) + np.repeat(starts, lengths)  # [total]
    return dataclasses.replace(layout, positions=layout.to_rows(positions.astype(np.int32), fill=0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextInputs:
    """Where each request's prefix sits, on the group mesh (BY_MEMBER_SPEC)."""

    page_tables: jax.Array  # [d, requests, max_pages] int32: member m's pages of request r, in order
    kv_lens: jax.Array  # [d, requests] int32: prefix tokens of r held on m (0 = none)


@dataclasses.dataclass(frozen=True)
class ContextTables:
    """Host arrays of `ContextInputs`. requests and max_pages are part of the
    program's shape bucket; row r describes the batch's segment r."""

    page_tables: np.ndarray  # [d, requests, max_pages] int32
    kv_lens: np.ndarray  # [d, requests] int32

    def to_device(self, mesh: Mesh) -> ContextInputs:
        by_member = NamedSharding(mesh, BY_MEMBER_SPEC)
        return ContextInputs(page_tables=jax.device_put(self.page_tables, by_member),
                             kv_lens=jax.device_put(self.kv_lens, by_member))


def layout_context(starts: Sequence[int], prefix_pages: Sequence[Mapping[int, Sequence[int]]],
                   prefix_lens: Sequence[Mapping[int, int]], members: int, max_pages: int,
                   requests: int | None = None, page_size: int | None = None) -> ContextTables:
    """Context tables of a batch whose request r starts its chunk at starts[r].

    prefix_pages[r]: group member -> its pages of request r, in order;
    prefix_lens[r]: group member -> prefix tokens of r it holds (they must sum
    to starts[r]: every earlier token is somewhere in the group).
    requests pads the request axis to a bucket (default: one row per request);
    page_size, when given, checks that the pages can hold the counted tokens.
    """
    requests = len(starts) if requests is None else requests
    if not len(starts) == len(prefix_pages) == len(prefix_lens) <= requests:
        raise ValueError(f"{len(starts)} starts, {len(prefix_pages)} page maps and {len(prefix_lens)} "
                         f"count maps for a bucket of {requests} requests")
    page_tables = np.zeros((members, requests, max_pages), np.int32)
    kv_lens = np.zeros((members, requests), np.int32)
    for request, (start, pages_of, lens_of) in enumerate(zip(starts, prefix_pages, prefix_lens)):
        if sum(lens_of.values()) != start:
            raise ValueError(f"request {request} starts at {start} but its prefix counts are {dict(lens_of)}")
        if not set(pages_of) | set(lens_of) <= set(range(members)):
            raise ValueError(f"request {request}: prefix on members outside a group of {members}")
        for member, pages in pages_of.items():
            if len(pages) > max_pages:
                raise ValueError(f"request {request} holds {len(pages)} pages on member {member}; "
                                 f"bucket has {max_pages}")
            page_tables[member, request, :len(pages)] = pages
        for member, held in lens_of.items():
            if page_size is not None and held > len(pages_of.get(member, ())) * page_size:
                raise ValueError(f"request {request}: {held} tokens on member {member} do not fit its pages")
            kv_lens[member, request] = held
    return ContextTables(page_tables, kv_lens)


# ---------------------------------------------------------------- device side
def _prefix_key_stream(page_tables, kv_lens, num_pages: int, page_size: int):
    """The prefix tokens a member holds, as a key stream read straight from its pool.

    page_tables: [requests, max_pages]; kv_lens: [requests].
    Returns key_rows (slot in a layer's pool), key_positions, key_segments: [E*S] int32
    (E = requests * max_pages entries of S = page_size keys; segment r = request r, -1 = nothing).
    """
    requests, max_pages = page_tables.shape
    # One entry per (request, table position), holding tokens_in_entry tokens of that request.
    tokens_in_entry = jnp.clip(kv_lens[:, None] - jnp.arange(max_pages)[None, :] * page_size, 0, page_size)
    tokens_in_entry = tokens_in_entry.reshape(-1)  # [E]
    page_of_entry = jnp.clip(page_tables, 0, num_pages - 1).reshape(-1)  # [E]
    request_of_entry = jnp.repeat(jnp.arange(requests, dtype=jnp.int32), max_pages)  # [E]
    # The key stream: entries holding tokens first, in request order, so that it is
    # sorted by request and each query tile visits only its requests' key tiles.
    order = jnp.argsort(tokens_in_entry == 0, stable=True)  # [E]
    entry = jnp.repeat(order, page_size)  # [E*S] entry of each key
    offset = jnp.tile(jnp.arange(page_size, dtype=jnp.int32), order.shape[0])  # [E*S]
    key_rows = page_of_entry[entry] * page_size + offset  # [E*S] slot in the layer's pool
    key_segments = jnp.where(offset < tokens_in_entry[entry], request_of_entry[entry], -1)  # [E*S]
    # The whole prefix precedes the whole chunk: positions 0 make the causal test always pass.
    key_positions = jnp.zeros_like(key_segments)
    return key_rows, key_positions, key_segments


def _held_prefix_partials(q_all, segments_all, pool, layer, page_tables, kv_lens, scale: float,
                          members: int, pages_per_visit: int | None):
    """Partial attention of every query over this member's prefix tokens of its request (reference).

    q_all: [R, hq, hd], the rows of `members` members one block after another
    (each block in stream order); segments_all: [R] (-1 = padding); layer: [] int32;
    pool: [1, L, 2, pages, page_size, kvh, hd]; page_tables: [requests, max_pages]; kv_lens: [requests].
    Returns out [R, hq, hd] float32 and lse [R, hq] float32 (-inf: nothing held).
    """
    num_pages, page_size, kv_heads, head_dim = pool.shape[3:]
    key_rows, key_positions, key_segments = _prefix_key_stream(page_tables, kv_lens, num_pages, page_size)
    # The pool as rows [L * 2 * pages * page_size, kvh, hd] (a reshape: no copy); the key stream's rows are
    # offset to the layer's keys and values there, so each tile is one gather and no layer of the pool is
    # sliced out (a copy per layer when `layer` is traced).
    layer_slots = num_pages * page_size
    stores = pool.reshape(-1, kv_heads, head_dim)
    key_store_rows = key_rows + (2 * layer) * layer_slots
    value_store_rows = key_store_rows + layer_slots
    kv_tile = page_size * (pages_per_visit or max(1, KV_TILE // page_size))

    def member_block(block):  # one member's rows: in stream order, as the tiling wants
        q, segments = block  # [T, hq, hd], [T]
        return blocked_partial_attention(q, stores, stores, jnp.zeros_like(segments), segments, key_positions,
                                         key_segments, scale, kv_rows=key_store_rows, kv_tile=kv_tile,
                                         v_rows=value_store_rows)

    out, lse = jax.lax.map(member_block, (q_all.reshape(members, -1, *q_all.shape[1:]),
                                          segments_all.reshape(members, -1)))
    return out.reshape(q_all.shape), lse.reshape(q_all.shape[:2])


def _held_prefix_partials_kernel(q_all, segments_all, pool, layer, page_tables, kv_lens, scale: float,
                                 members: int, *, interpret: bool):
    """`_held_prefix_partials` as one flash kernel launch over all members' row blocks, key tiles
    gathered from the pool in place (the pool viewed as stores [L * 2, pages * page_size, kvh, hd])."""
    layers, num_pages, page_size, kv_heads, head_dim = pool.shape[1], *pool.shape[3:]
    key_rows, key_positions, key_segments = _prefix_key_stream(page_tables, kv_lens, num_pages, page_size)
    stores = pool.reshape(layers * 2, num_pages * page_size, kv_heads, head_dim)
    rows_per_member = q_all.shape[0] // members
    return prefill_attention.flash_attention(
        q_all, stores, stores, jnp.zeros_like(segments_all), segments_all, key_positions, key_segments, scale,
        k_index=2 * layer, v_index=2 * layer + 1, kv_rows=key_rows, query_blocks=members, interpret=interpret,
        q_tile=prefill_attention.stream_tiles(rows_per_member, prefill_attention.Q_TILE),
        kv_tile=prefill_attention.stream_tiles(key_rows.shape[0], prefill_attention.KV_TILE))


def _prefix_partials(q_all, segments_all, pool, layer, page_tables, kv_lens, scale: float, members: int,
                     pages_per_visit: int | None, attention_impl: str):
    """The reference or the kernel, as `attention_impl` and the platform say."""

    def reference(q_all, segments_all, pool, layer, page_tables, kv_lens):
        return _held_prefix_partials(q_all, segments_all, pool, layer, page_tables, kv_lens, scale, members,
                                     pages_per_visit)

    def kernel(q_all, segments_all, pool, layer, page_tables, kv_lens, *, interpret):
        return _held_prefix_partials_kernel(q_all, segments_all, pool, layer, page_tables, kv_lens, scale,
                                            members, interpret=interpret)

    usable = prefill_attention.supports(pool.shape[-1])
    return by_platform(attention_impl, reference, kernel if usable else None,
                       q_all, segments_all, pool, layer, page_tables, kv_lens)


def _member_context_attention(layer, q, segment_ids, pool, page_tables, kv_lens, *, members: int,
                              scale: float, pages_per_visit: int | None, attention_impl: str):
    """Per (member, tensor shard): layer [] int32 (replicated); q [T, hq_local, hd]; segment_ids [T];
    pool [1, L, 2, pages, page_size, kvh_local, hd]; page_tables [1, requests, max_pages];
    kv_lens [1, requests]. Returns the merged context partial of the member's own rows."""
    if members == 1:
        return _prefix_partials(q, segment_ids, pool, layer, page_tables[0], kv_lens[0], scale, 1,
                                pages_per_visit, attention_impl)
    rows_local = q.shape[0]
    q_all = jax.lax.all_gather(q, SEQ, axis=0, tiled=True)  # [d*T, hq_local, hd]
    segments_all = jax.lax.all_gather(segment_ids, SEQ, axis=0, tiled=True)  # [d*T]
    out, lse = _prefix_partials(q_all, segments_all, pool, layer, page_tables[0], kv_lens[0], scale,
                                members, pages_per_visit, attention_impl)
    # Row block j of the partials belongs to member j; afterwards block i holds
    # what member i computed for my rows.
    out = jax.lax.all_to_all(out, SEQ, split_axis=0, concat_axis=0, tiled=True)
    lse = jax.lax.all_to_all(lse, SEQ, split_axis=0, concat_axis=0, tiled=True)
    out = out.reshape(members, rows_local, *out.shape[1:])  # [d, T, hq_local, hd]
    lse = lse.reshape(members, rows_local, *lse.shape[1:])  # [d, T, hq_local]
    merged = (out[0], lse[0])
    for member in range(1, members):
        merged = merge_partials(*merged, out[member], lse[member])
    return merged


def context_attention(mesh: Mesh, layer: int | jax.Array, q, segment_ids, pool, context: ContextInputs,
                      pages_per_visit: int | None = None, attention_impl: str = AUTO):
    """Attention of the chunk's queries over their requests' prefixes, wherever in the group they sit.

    layer: the pool layer, an int or an int32 scalar traced by the model's layer scan;
    q: [rows, q_heads, head_dim] (HEADS_SPEC); segment_ids: [rows] (BY_MEMBER_SPEC);
    pool: group pool with POOL_SPEC (read only); context: `ContextInputs`;
    pages_per_visit: prefix pages per key tile of the reference code (None: about one
    `blocked_attention.KV_TILE`); attention_impl: `models.kernels.dispatch` implementation (static).
    Returns out [rows, q_heads, head_dim] float32 and lse [rows, q_heads] float32.
    """
    body = functools.partial(_member_context_attention, members=mesh.shape[SEQ],
                             scale=q.shape[-1] ** -0.5, pages_per_visit=pages_per_visit,
                             attention_impl=attention_impl)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(REPLICATED_SPEC, HEADS_SPEC, BY_MEMBER_SPEC, POOL_SPEC, BY_MEMBER_SPEC, BY_MEMBER_SPEC),
        out_specs=(HEADS_SPEC, LSE_SPEC), check_vma=checks_vma(attention_impl),
    )(jnp.asarray(layer, jnp.int32), q, segment_ids, pool, context.page_tables, context.kv_lens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextPrefillCache:
    """What the model threads through its layers: the ring's cache plus the prefix tables."""

    ring: RingPrefillCache
    context: ContextInputs


def context_prefill_forward(graphdef: nnx.GraphDef, params: Any, pool: jax.Array, batch: PrefillInputs,
                            context: ContextInputs, *, mesh: Mesh,
                            pages_per_visit: int | None = None,
                            attention_impl: str = AUTO) -> tuple[jax.Array, jax.Array]:
    """Traceable whole-model prefill of chunks that continue earlier ones.

    graphdef, params: `nnx.split(model)`, params as `topology.group_params(...)`;
    pool: group pool [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC;
    batch: `prefill_program.make_prefill_inputs(chunk_layout(...), chunk_tokens, placement, mesh)`;
    context: `layout_context(...).to_device(mesh)`, segment r = request r of the batch;
    pages_per_visit: prefix pages per key tile (None: about one `blocked_attention.KV_TILE`);
    attention_impl: `models.kernels.dispatch` implementation of every attention call (static).
    Returns logits [num_logits, vocab] float32 for `batch.logits_indices` and the
    pool with every placed chunk token's k, v written to its slot.
    """
    model = nnx.merge(graphdef, params)

    def ring_with_context(layer, q, k, v, positions, segment_ids, cache: ContextPrefillCache):
        ring = cache.ring
        out, lse, pool = ring_attention(mesh, layer, q, k, v, positions, segment_ids,
                                        ring.placement_member, ring.placement_slot, ring.pool, attention_impl)
        # Reads only prefix slots, which the ring's writes (new slots) never touch.
        prefix_out, prefix_lse = context_attention(mesh, layer, q, segment_ids, pool, cache.context,
                                                   pages_per_visit, attention_impl)
        out, _ = merge_partials(out, lse, prefix_out, prefix_lse)
        return out.astype(q.dtype), dataclasses.replace(cache, ring=dataclasses.replace(ring, pool=pool))

    cache = ContextPrefillCache(
        ring=RingPrefillCache(pool=pool, placement_member=batch.placement_member,
                              placement_slot=batch.placement_slot),
        context=context)
    logits, cache = model(batch.tokens, batch.positions, batch.segment_ids, attention=ring_with_context,
                          kv_cache=cache, logits_indices=batch.logits_indices)
    return logits, cache.ring.pool

