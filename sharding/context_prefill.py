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
        chunk. The (request, page) entries that hold tokens are packed first
        and visited `pages_per_visit` at a time, masked by segment and merged
        online, so the work follows the prefix actually held;
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from loong_jax.models.attention import NEG_INF, merge_partials, partial_attention
from loong_jax.sharding.decode_attention import MEMBER_SPEC
from loong_jax.sharding.kv_pool import POOL_SPEC
from loong_jax.sharding.prefill_program import PrefillBatch
from loong_jax.sharding.ring_prefill import (
    HEADS_SPEC, LSE_SPEC, ROWS_SPEC, RingPrefillCache, ring_attention)
from loong_jax.sharding.stripe_layout import (
    PackedLayout, Placement, stream_positions, stream_segments, striped_layout)
from loong_jax.sharding.topology import SEQ

# Attention scores one member holds at once while visiting prefix pages
# ([q_heads, rows, keys] float32, 256 MiB): with pages_per_visit=None the
# pages per visit follow from it, so a long chunk visits fewer pages at a time.
SCORE_BUDGET = 1 << 26


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
    """Where each request's prefix sits, on the group mesh (MEMBER_SPEC)."""

    page_tables: jax.Array  # [d, requests, max_pages] int32: member m's pages of request r, in order
    kv_lens: jax.Array  # [d, requests] int32: prefix tokens of r held on m (0 = none)


@dataclasses.dataclass(frozen=True)
class ContextTables:
    """Host arrays of `ContextInputs`. requests and max_pages are part of the
    program's shape bucket; row r describes the batch's segment r."""

    page_tables: np.ndarray  # [d, requests, max_pages] int32
    kv_lens: np.ndarray  # [d, requests] int32

    def to_device(self, mesh: Mesh) -> ContextInputs:
        members = NamedSharding(mesh, MEMBER_SPEC)
        return ContextInputs(page_tables=jax.device_put(self.page_tables, members),
                             kv_lens=jax.device_put(self.kv_lens, members))


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
def _visit_size(rows: int, heads: int, page_size: int, pages_per_visit: int | None) -> int:
    if pages_per_visit is not None:
        return pages_per_visit
    return max(1, SCORE_BUDGET // (rows * heads * page_size))


def _held_prefix_partials(q_all, segments_all, pool, layer: int, page_tables, kv_lens, scale: float,
                          pages_per_visit: int | None):
    """Partial attention of every query over this member's prefix tokens of its request.

    q_all: [R, hq, hd]; segments_all: [R] (-1 = padding); pool: [1, L, 2, pages, page_size, kvh, hd];
    page_tables: [requests, max_pages]; kv_lens: [requests].
    Returns out [R, hq, hd] float32 and lse [R, hq] float32 (-inf: nothing held).
    """
    num_pages, page_size = pool.shape[3], pool.shape[4]
    requests, max_pages = page_tables.shape
    entries = requests * max_pages
    visit_pages = min(_visit_size(*q_all.shape[:2], page_size, pages_per_visit), entries)
    padded_entries = -(-entries // visit_pages) * visit_pages
    pad = padded_entries - entries
    # One entry per (request, table position); padding entries hold nothing.
    tokens_in_entry = jnp.clip(kv_lens[:, None] - jnp.arange(max_pages)[None, :] * page_size, 0, page_size)
    tokens_in_entry = jnp.pad(tokens_in_entry.reshape(-1), (0, pad))  # [E]
    page_of_entry = jnp.pad(jnp.clip(page_tables, 0, num_pages - 1).reshape(-1), (0, pad))  # [E]
    request_of_entry = jnp.asarray(np.pad(np.repeat(np.arange(requests, dtype=np.int32), max_pages), (0, pad)))
    # Entries holding tokens first, so only ceil(held / visit_pages) visits are needed.
    order = jnp.argsort(tokens_in_entry == 0, stable=True)  # [E]
    visits = -(-jnp.sum(tokens_in_entry > 0) // visit_pages)

    def visit(index, carry):
        # [C] the entries of this visit (C = visit_pages, S = page_size)
        entries_now = jax.lax.dynamic_slice_in_dim(order, index * visit_pages, visit_pages)
        pages = page_of_entry[entries_now]
        k = pool[0, layer, 0][pages].reshape(visit_pages * page_size, *pool.shape[5:])  # [C*S, kvh, hd]
        v = pool[0, layer, 1][pages].reshape(visit_pages * page_size, *pool.shape[5:])
        key_held = (jnp.arange(page_size)[None, :] < tokens_in_entry[entries_now][:, None]).reshape(-1)  # [C*S]
        key_request = jnp.repeat(request_of_entry[entries_now], page_size)  # [C*S]
        # Slots past a request's count may hold stale values; zero them so that
        # even a non-finite leftover cannot leak through a zero weight.
        v = jnp.where(key_held[:, None, None], v, 0)
        mask = (segments_all[:, None] == key_request[None, :]) & key_held[None, :]  # [R, C*S]
        out, lse = partial_attention(q_all, k, v, mask, scale)
        return merge_partials(*carry, out, lse)

    # *_like keeps q's per-member variance, as a shard_map loop carry must.
    start = (jnp.zeros_like(q_all, dtype=jnp.float32), jnp.full_like(q_all[..., 0], NEG_INF, dtype=jnp.float32))
    return jax.lax.fori_loop(0, visits, visit, start)


def _member_context_attention(q, segment_ids, pool, page_tables, kv_lens, *, layer: int, members: int,
                              scale: float, pages_per_visit: int | None):
    """Per (member, tensor shard): q [T, hq_local, hd]; segment_ids [T];
    pool [1, L, 2, pages, page_size, kvh_local, hd]; page_tables [1, requests, max_pages];
    kv_lens [1, requests]. Returns the merged context partial of the member's own rows."""
    if members == 1:
        return _held_prefix_partials(q, segment_ids, pool, layer, page_tables[0], kv_lens[0], scale,
                                     pages_per_visit)
    rows_local = q.shape[0]
    q_all = jax.lax.all_gather(q, SEQ, axis=0, tiled=True)  # [d*T, hq_local, hd]
    segments_all = jax.lax.all_gather(segment_ids, SEQ, axis=0, tiled=True)  # [d*T]
    out, lse = _held_prefix_partials(q_all, segments_all, pool, layer, page_tables[0], kv_lens[0], scale,
                                     pages_per_visit)
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


def context_attention(mesh: Mesh, layer: int, q, segment_ids, pool, context: ContextInputs,
                      pages_per_visit: int | None = None):
    """Attention of the chunk's queries over their requests' prefixes, wherever in the group they sit.

    q: [rows, q_heads, head_dim] (HEADS_SPEC); segment_ids: [rows] (ROWS_SPEC);
    pool: group pool with POOL_SPEC (read only); context: `ContextInputs`;
    pages_per_visit: prefix pages attended at once (None: from SCORE_BUDGET).
    Returns out [rows, q_heads, head_dim] float32 and lse [rows, q_heads] float32.
    """
    body = functools.partial(_member_context_attention, layer=layer, members=mesh.shape[SEQ],
                             scale=q.shape[-1] ** -0.5, pages_per_visit=pages_per_visit)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(HEADS_SPEC, ROWS_SPEC, POOL_SPEC, MEMBER_SPEC, MEMBER_SPEC),
        out_specs=(HEADS_SPEC, LSE_SPEC),
    )(q, segment_ids, pool, context.page_tables, context.kv_lens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextPrefillCache:
    """What the model threads through its layers: the ring's cache plus the prefix tables."""

    ring: RingPrefillCache
    context: ContextInputs


def context_prefill_forward(graphdef: nnx.GraphDef, params: Any, pool: jax.Array, batch: PrefillBatch,
                            context: ContextInputs, *, mesh: Mesh,
                            pages_per_visit: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Traceable whole-model prefill of chunks that continue earlier ones.

    graphdef, params: `nnx.split(model)`, params as `topology.group_params(...)`;
    pool: group pool [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC;
    batch: `prefill_program.make_prefill_batch(chunk_layout(...), chunk_tokens, placement, mesh)`;
    context: `layout_context(...).to_device(mesh)`, segment r = request r of the batch;
    pages_per_visit: prefix pages attended at once per member (None: from SCORE_BUDGET).
    Returns logits [num_logits, vocab] float32 for `batch.logits_indices` and the
    pool with every placed chunk token's k, v written to its slot.
    """
    model = nnx.merge(graphdef, params)

    def ring_with_context(layer, q, k, v, positions, segment_ids, cache: ContextPrefillCache):
        ring = cache.ring
        out, lse, pool = ring_attention(mesh, layer, q, k, v, positions, segment_ids,
                                        ring.placement_member, ring.placement_slot, ring.pool)
        # Reads only prefix slots, which the ring's writes (new slots) never touch.
        prefix_out, prefix_lse = context_attention(mesh, layer, q, segment_ids, pool, cache.context,
                                                   pages_per_visit)
        out, _ = merge_partials(out, lse, prefix_out, prefix_lse)
        return out.astype(q.dtype), dataclasses.replace(cache, ring=dataclasses.replace(ring, pool=pool))

    cache = ContextPrefillCache(
        ring=RingPrefillCache(pool=pool, placement_member=batch.placement_member,
                              placement_slot=batch.placement_slot),
        context=context)
    logits, cache = model(batch.tokens, batch.positions, batch.segment_ids, attention=ring_with_context,
                          kv_cache=cache, logits_indices=batch.logits_indices)
    return logits, cache.ring.pool


def jit_context_prefill(graphdef: nnx.GraphDef, mesh: Mesh, pages_per_visit: int | None = None):
    """`context_prefill_forward` compiled for one group: call as
    `logits, pool = program(params, pool, batch, context)`. The pool is donated.
    Shapes are static per (group, rows bucket, num_logits, requests, max_pages),
    so one wrapper per group compiles once per bucket; keep and reuse it."""

    def context_prefill(params, pool, batch, context):
        return context_prefill_forward(graphdef, params, pool, batch, context, mesh=mesh,
                                       pages_per_visit=pages_per_visit)

    return jax.jit(context_prefill, donate_argnames=("pool",),
                   out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, POOL_SPEC)))
