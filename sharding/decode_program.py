"""Whole-model distributed decode step: "decode these requests on this group
with these masters and page tables".

Data flow:
  1. Host: `layout_decode_batch` packs the requests of a decode batch into
     d blocks of B_local rows, block m holding the requests member m is master
     of (padding rows: slot -1, nothing held), and lists per member the page
     entries it holds (row, page, tokens in that page), sorted by row and padded
     to `member_pages` entries (`DecodeLayout`). `DecodeLayout.to_device(mesh)`
     places every array sharded BY_MEMBER_SPEC (`DecodeInputs`). d, B_local
     and member_pages are the static bucket: the work follows the pages held, not the longest request.
  2. Device (`decode_forward`, traceable): the model runs on the group with
     GSPMD for its dense layers (rows split over members, heads/MLP split over
     TENSOR) and `decode_attention` as its attention hook, which appends each
     new token's k, v on its master and merges partial attention over every
     member's pages. Returns logits [d * B_local, vocab] float32 and the pool.
  3. `loong_jax.executor.programs.decode_program` jits it for one group with
     the sampler fused; it donates the group pool, so the appends happen in
     place and the caller gets the same buffers back.
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

from loong_jax.models.kernels.dispatch import AUTO
from loong_jax.sharding.decode_attention import PAGES_PER_CHUNK, DecodeKVCache, decode_attention
from loong_jax.sharding.specs import BY_MEMBER_SPEC


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

    tokens: jax.Array  # [R] int32, BY_MEMBER_SPEC
    positions: jax.Array  # [R] int32, BY_MEMBER_SPEC
    append_slots: jax.Array  # [R] int32, BY_MEMBER_SPEC; -1 = padding row
    entry_rows: jax.Array  # [d, E] int32, BY_MEMBER_SPEC; row of each page entry, sorted
    entry_pages: jax.Array  # [d, E] int32, BY_MEMBER_SPEC; page read by the entry
    entry_tokens: jax.Array  # [d, E] int32, BY_MEMBER_SPEC; tokens held in it (0 = padding)


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Host arrays of one decode step for a group of d members (R = d * B_local rows): where each request
    sits in the batch and which page entries every member attends."""

    tokens: np.ndarray  # [R] int32
    positions: np.ndarray  # [R] int32
    append_slots: np.ndarray  # [R] int32, -1 for padding rows
    entry_rows: np.ndarray  # [d, E] int32, sorted; padding entries name the last row
    entry_pages: np.ndarray  # [d, E] int32
    entry_tokens: np.ndarray  # [d, E] int32, 0 for padding entries
    rows: tuple[int, ...]  # batch row of each request, in the order given

    def to_device(self, mesh: Mesh) -> DecodeInputs:
        """The inputs of the decode program, sharded over the group's SEQ axis."""
        by_member = NamedSharding(mesh, BY_MEMBER_SPEC)
        return jax.device_put(self.inputs(), by_member)

    def inputs(self) -> DecodeInputs:
        """The program's inputs as host arrays (the executor's `ProgramCall` carries these)."""
        return DecodeInputs(tokens=self.tokens, positions=self.positions, append_slots=self.append_slots,
                            entry_rows=self.entry_rows, entry_pages=self.entry_pages,
                            entry_tokens=self.entry_tokens)


def pages_held(requests: Sequence[DecodeRow], members: int, page_size: int) -> int:
    """Page entries of the busiest member: the smallest `member_pages` that fits the batch."""
    held = [0] * members
    for request in requests:
        for member, tokens in request.kv_lens.items():
            held[member] += -(-tokens // page_size)
    return max(held)


def layout_decode_batch(requests: Sequence[DecodeRow], members: int, batch_local: int, member_pages: int,
                        page_size: int) -> DecodeLayout:
    """Places each request in its master's block of rows and lists every member's page entries."""
    total_rows = members * batch_local
    tokens = np.zeros(total_rows, np.int32)
    positions = np.zeros(total_rows, np.int32)
    append_slots = np.full(total_rows, -1, np.int32)
    # Per member, the page entries it holds: their rows, pages and tokens in the page.
    entry_lists = [([], [], []) for _ in range(members)]
    in_row_order = [True] * members  # entries appended by increasing row need no sort
    all_members = frozenset(range(members))
    used = [0] * members
    rows = []
    for request in requests:
        master = request.master
        if not 0 <= master < members:
            raise ValueError(f"master {master} is not a member of a group of {members}")
        if used[master] == batch_local:
            raise ValueError(f"member {master} is master of more than {batch_local} requests")
        if request.append_slot < 0 or request.kv_lens.get(master, 0) < 1:
            raise ValueError("a request's master needs an append slot and counts the new token in kv_lens")
        if not (all_members.issuperset(request.pages) and all_members.issuperset(request.kv_lens)):
            raise ValueError(f"page tables name members outside a group of {members}")
        row = master * batch_local + used[master]
        used[master] += 1
        rows.append(row)
        tokens[row], positions[row], append_slots[row] = request.token, request.position, request.append_slot
        for member, held in request.kv_lens.items():
            pages = request.pages.get(member, ())
            if held > len(pages) * page_size:
                raise ValueError(f"{held} tokens on member {member} do not fit {len(pages)} pages")
            if held == 0:
                continue
            used_pages = -(-held // page_size)
            held_rows, held_pages, held_tokens = entry_lists[member]
            if held_rows and held_rows[-1] > row:
                in_row_order[member] = False
            held_rows.extend([row] * used_pages)
            held_pages.extend(pages[:used_pages])
            held_tokens.extend([page_size] * (used_pages - 1))
            held_tokens.append(held - (used_pages - 1) * page_size)
    entry_rows = np.full((members, member_pages), total_rows - 1, np.int32)
    entry_pages = np.zeros((members, member_pages), np.int32)
    entry_tokens = np.zeros((members, member_pages), np.int32)
    for member, (held_rows, held_pages, held_tokens) in enumerate(entry_lists):
        count = len(held_rows)
        if count > member_pages:
            raise ValueError(f"member {member} holds {count} pages of the batch; bucket has {member_pages}")
        if in_row_order[member]:
            entry_rows[member, :count], entry_pages[member, :count] = held_rows, held_pages
            entry_tokens[member, :count] = held_tokens
            continue
        order = np.argsort(held_rows, kind="stable")  # by row, as the device's segment reductions assume
        entry_rows[member, :count] = np.asarray(held_rows, np.int32)[order]
        entry_pages[member, :count] = np.asarray(held_pages, np.int32)[order]
        entry_tokens[member, :count] = np.asarray(held_tokens, np.int32)[order]
    return DecodeLayout(tokens, positions, append_slots, entry_rows, entry_pages, entry_tokens, tuple(rows))


def decode_forward(graphdef: nnx.GraphDef, params: Any, pool: jax.Array, inputs: DecodeInputs, *,
                   mesh: Mesh, pages_per_chunk: int = PAGES_PER_CHUNK,
                   attention_impl: str = AUTO) -> tuple[jax.Array, jax.Array]:
    """One decode step of the whole model over the group `mesh` (traceable).

    graphdef, params: `nnx.split(model)`, params laid out over `mesh`
      (`topology.group_params`: replicated over SEQ, TENSOR-sharded);
    pool: [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC
      (`kv_pool.assemble_group_pool`); inputs: `DecodeLayout.to_device(mesh)`;
    pages_per_chunk: page entries attended at once per member (bounds the gathered KV);
    attention_impl: `models.kernels.dispatch` implementation (static).
    Returns logits [R, vocab] float32 (padding rows are meaningless) and the pool
    with this step's k, v appended on each request's master.
    """
    model = nnx.merge(graphdef, params)
    segment_ids = jnp.where(inputs.append_slots >= 0, 0, -1).astype(jnp.int32)  # [R]
    cache = DecodeKVCache(pool=pool, entry_rows=inputs.entry_rows, entry_pages=inputs.entry_pages,
                          entry_tokens=inputs.entry_tokens, append_slots=inputs.append_slots)
    attention = functools.partial(decode_attention, mesh=mesh, pages_per_chunk=pages_per_chunk,
                                  attention_impl=attention_impl)
    logits, cache = model(inputs.tokens, inputs.positions, segment_ids, attention=attention, kv_cache=cache)
    return logits, cache.pool

