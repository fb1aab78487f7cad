"""Whole-model distributed decode step: "decode these requests on this group
with these masters and page tables".

Data flow:
  1. Host: `layout_decode_batch` packs the requests of a decode batch into
     d blocks of B_local rows, block m holding the requests member m is master
     of (padding rows: slot -1, nothing held), and builds the per-member page
     tables and held-token counts. `DecodeBatch.to_device(mesh)` places every
     array sharded over SEQ (`DecodeInputs`). d, B_local and max_pages are the static bucket.
  2. Device (`decode_forward`, traceable): the model runs on the group with
     GSPMD for its dense layers (rows split over members, heads/MLP split over
     TENSOR) and `decode_attention` as its attention hook, which appends each
     new token's k, v on its master and merges partial attention over every
     member's pages. Returns logits [d * B_local, vocab] float32 and the pool.
  3. `jit_decode(graphdef, mesh)` is the compiled program of one group; it
     donates the group pool, so the appends happen in place and the caller
     gets the same buffers back.
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

from loong_jax.sharding.decode_attention import (
    MEMBER_SPEC, PAGES_PER_CHUNK, ROW_SPEC, DecodeKVCache, decode_attention)
from loong_jax.sharding.kv_pool import POOL_SPEC


@dataclasses.dataclass(frozen=True)
class DecodeRow:
    """One request of a decode batch, as the host sees it (members are indices in the group)."""

    token: int  # the token fed this step (last sampled one)
    position: int  # its position in the request's sequence
    master: int  # member that computes this request and stores the new token
    append_slot: int  # flat slot in the master's pool for the new token's k, v
    pages: Mapping[int, Sequence[int]]  # member -> its pages of this request, in order
    kv_lens: Mapping[int, int]  # member -> tokens held there, counting this step's append


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeInputs:
    """Per-step inputs of a decode program, on the group mesh (R = d * B_local rows)."""

    tokens: jax.Array  # [R] int32, ROW_SPEC
    positions: jax.Array  # [R] int32, ROW_SPEC
    append_slots: jax.Array  # [R] int32, ROW_SPEC; -1 = padding row
    page_tables: jax.Array  # [d, R, max_pages] int32, MEMBER_SPEC
    kv_lens: jax.Array  # [d, R] int32, MEMBER_SPEC


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """Host arrays of one decode step for a group of d members (R = d * B_local rows)."""

    tokens: np.ndarray  # [R] int32
    positions: np.ndarray  # [R] int32
    append_slots: np.ndarray  # [R] int32, -1 for padding rows
    page_tables: np.ndarray  # [d, R, max_pages] int32
    kv_lens: np.ndarray  # [d, R] int32
    rows: tuple[int, ...]  # batch row of each request, in the order given

    def to_device(self, mesh: Mesh) -> DecodeInputs:
        """The inputs of the decode program, sharded over the group's SEQ axis."""
        rows = NamedSharding(mesh, ROW_SPEC)
        members = NamedSharding(mesh, MEMBER_SPEC)
        return DecodeInputs(
            tokens=jax.device_put(self.tokens, rows),
            positions=jax.device_put(self.positions, rows),
            append_slots=jax.device_put(self.append_slots, rows),
            page_tables=jax.device_put(self.page_tables, members),
            kv_lens=jax.device_put(self.kv_lens, members))


def layout_decode_batch(requests: Sequence[DecodeRow], members: int, batch_local: int,
                        max_pages: int) -> DecodeBatch:
    """Places each request in its master's block of rows and builds the tables."""
    total_rows = members * batch_local
    tokens = np.zeros(total_rows, np.int32)
    positions = np.zeros(total_rows, np.int32)
    append_slots = np.full(total_rows, -1, np.int32)
    page_tables = np.zeros((members, total_rows, max_pages), np.int32)
    kv_lens = np.zeros((members, total_rows), np.int32)
    used = [0] * members
    rows = []
    for request in requests:
        if not 0 <= request.master < members:
            raise ValueError(f"master {request.master} is not a member of a group of {members}")
        if used[request.master] == batch_local:
            raise ValueError(f"member {request.master} is master of more than {batch_local} requests")
        if request.append_slot < 0 or request.kv_lens.get(request.master, 0) < 1:
            raise ValueError("a request's master needs an append slot and counts the new token in kv_lens")
        if not set(request.pages) | set(request.kv_lens) <= set(range(members)):
            raise ValueError(f"page tables name members outside a group of {members}")
        row = request.master * batch_local + used[request.master]
        used[request.master] += 1
        rows.append(row)
        tokens[row], positions[row], append_slots[row] = request.token, request.position, request.append_slot
        for member, pages in request.pages.items():
            if len(pages) > max_pages:
                raise ValueError(f"request holds {len(pages)} pages on member {member}; bucket has {max_pages}")
            page_tables[member, row, :len(pages)] = pages
        for member, held in request.kv_lens.items():
            kv_lens[member, row] = held
    return DecodeBatch(tokens, positions, append_slots, page_tables, kv_lens, tuple(rows))


def decode_forward(graphdef: nnx.GraphDef, params: Any, pool: jax.Array, inputs: DecodeInputs, *,
                   mesh: Mesh, pages_per_chunk: int = PAGES_PER_CHUNK) -> tuple[jax.Array, jax.Array]:
    """One decode step of the whole model over the group `mesh` (traceable).

    graphdef, params: `nnx.split(model)`, params laid out over `mesh`
      (`topology.group_params`: replicated over SEQ, TENSOR-sharded);
    pool: [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC
      (`kv_pool.assemble_group_pool`); inputs: `DecodeBatch.to_device(mesh)`;
    pages_per_chunk: pages of a request attended at once (bounds the gathered KV).
    Returns logits [R, vocab] float32 (padding rows are meaningless) and the pool
    with this step's k, v appended on each request's master.
    """
    model = nnx.merge(graphdef, params)
    segment_ids = jnp.where(inputs.append_slots >= 0, 0, -1).astype(jnp.int32)  # [R]
    cache = DecodeKVCache(pool=pool, page_tables=inputs.page_tables, kv_lens=inputs.kv_lens,
                          append_slots=inputs.append_slots)
    attention = functools.partial(decode_attention, mesh=mesh, pages_per_chunk=pages_per_chunk)
    logits, cache = model(inputs.tokens, inputs.positions, segment_ids, attention=attention, kv_cache=cache)
    return logits, cache.pool


def jit_decode(graphdef: nnx.GraphDef, mesh: Mesh, pages_per_chunk: int = PAGES_PER_CHUNK):
    """`decode_forward` compiled for one group: call as
    `logits, pool = program(params, pool, inputs)`. The pool is donated (the
    appends happen in place). Shapes are static per (group, B_local, max_pages)
    bucket, so one wrapper per group compiles once per bucket; keep and reuse it."""

    def distributed_decode(params, pool, inputs):
        return decode_forward(graphdef, params, pool, inputs, mesh=mesh, pages_per_chunk=pages_per_chunk)

    return jax.jit(distributed_decode, donate_argnames=("pool",),
                   out_shardings=(NamedSharding(mesh, ROW_SPEC), NamedSharding(mesh, POOL_SPEC)))
