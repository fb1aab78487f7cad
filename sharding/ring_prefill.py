"""Ring attention for a packed prefill over a group, writing each token's KV
into the pool of the member that keeps it (proactive scale-down).

Every per-token array is laid out in rows: member m holds rows
[m * T_local, (m + 1) * T_local) (see `stripe_layout`), sharded BY_MEMBER_SPEC over
the group mesh (`specs`); q, k, v are additionally split over heads with TENSOR.

Data flow inside `jax.shard_map`, on member `me` of d, for one layer:
  1. The member holds its own queries and, initially, its own KV block with the
     block's positions, segment ids and placement.
  2. Ring step s (s = 0 … d-1): the block held came from member (me - s) mod d.
     Partial attention of the local queries over it (mask from global
     positions and segment ids only: same prompt and kv_pos <= q_pos) is merged
     into a running (output, log-sum-exp) in float32; rows that see no key
     keep output 0 and lse -inf, never NaN. Both sides are in stream order,
     so `blocked_attention.segment_attention` computes only the tile pairs
     that share a prompt (not all T_local^2 scores of the packed batch). On
     CUDA (or with the "interpret" implementation, `models.kernels.dispatch`)
     the flash kernel `models.kernels.prefill_attention` does the same in one
     launch per step, visiting the same key-tile ranges.
  3. At the same step the member scatters the block's k, v of the tokens
     placed on it into its pool slots (`mode="drop"`: other tokens get an
     out-of-range page and are dropped). After d steps every block has passed
     every member once, so every placed token has been written exactly once.
  4. Between steps the block moves one member round the ring with
     `jax.lax.ppermute` (d - 1 moves). That is the only communication: no KV
     moves afterwards, whatever the placement.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from loong_jax.models.attention import NEG_INF, merge_partials
from loong_jax.models.blocked_attention import segment_attention
from loong_jax.models.kernels import prefill_attention
from loong_jax.models.kernels.dispatch import AUTO, by_platform, checks_vma
from loong_jax.sharding.specs import BY_MEMBER_SPEC, HEADS_SPEC, LSE_SPEC, POOL_SPEC, REPLICATED_SPEC
from loong_jax.sharding.topology import SEQ


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RingPrefillCache:
    """What the model threads through its layers during a ring prefill."""

    pool: jax.Array  # [d, layers, 2, pages, page_size, kv_heads, head_dim]
    placement_member: jax.Array  # [rows] int32, member keeping the token's KV, -1 = nowhere
    placement_slot: jax.Array  # [rows] int32, flat slot in that member's pool


def _keep_in_pool(pool, layer, k_block, v_block, member_block, slot_block, segment_block, me):
    """Scatter the block's k, v of the tokens kept by `me` into the local pool
    [1, layers, 2, pages, page_size, kv_heads, head_dim]; others are dropped."""
    pages, page_size = pool.shape[3], pool.shape[4]
    keep = (member_block == me) & (segment_block >= 0)
    page = jnp.where(keep, slot_block // page_size, pages)  # page `pages` is out of range: dropped
    offset = slot_block % page_size
    pool = pool.at[0, layer, 0, page, offset].set(k_block.astype(pool.dtype), mode="drop")
    return pool.at[0, layer, 1, page, offset].set(v_block.astype(pool.dtype), mode="drop")


def step_attention(q, k, v, q_positions, q_segments, kv_positions, kv_segments, scale: float,
                   attention_impl: str = AUTO):
    """One ring step's partial attention: `segment_attention` (the reference) or the flash
    kernel, as `attention_impl` and the platform say. Shapes as `segment_attention`."""

    def reference(*args):
        return segment_attention(*args, scale)

    def kernel(*args, interpret):
        return prefill_attention.prefill_partial_attention(*args, scale, interpret=interpret)

    usable = prefill_attention.supports(q.shape[-1])
    return by_platform(attention_impl, reference, kernel if usable else None,
                       q, k, v, q_positions, q_segments, kv_positions, kv_segments)


def _ring_local(layer, q, k, v, positions, segment_ids, placement_member, placement_slot, pool, *,
                members, scale, attention_impl):
    """The per-member program (inside shard_map). Shapes are local: layer [] int32 (replicated),
    q [T, Hq/tp, D], k/v [T, Hkv/tp, D], per-token [T], pool [1, L, 2, P, S, Hkv/tp, D]."""
    me = jax.lax.axis_index(SEQ)
    ring = [(src, (src + 1) % members) for src in range(members)]
    # Block metadata travels as one small int array: positions, segments, member, slot.
    meta = jnp.stack([positions, segment_ids, placement_member, placement_slot], axis=1)  # [T, 4]

    def attend(block, out, lse):
        k_block, v_block, meta_block = block
        block_out, block_lse = step_attention(q, k_block, v_block, positions, segment_ids,
                                              meta_block[:, 0], meta_block[:, 1], scale, attention_impl)
        return merge_partials(out, lse, block_out, block_lse)

    def keep(block, pool):
        if pool is None:
            return None
        k_block, v_block, meta_block = block
        return _keep_in_pool(pool, layer, k_block, v_block, meta_block[:, 2], meta_block[:, 3],
                             meta_block[:, 1], me)

    def step(_, carry):
        block, out, lse, pool = carry
        # The send does not depend on this step's compute, so the two overlap.
        next_block = tuple(jax.lax.ppermute(x, SEQ, ring) for x in block)
        out, lse = attend(block, out, lse)
        return next_block, out, lse, keep(block, pool)

    # *_like keeps q's per-member variance, as the loop carry must.
    out = jnp.zeros_like(q, dtype=jnp.float32)  # [T, Hq/tp, D]
    lse = jnp.full_like(q[..., 0], NEG_INF, dtype=jnp.float32)  # [T, Hq/tp]
    block = (k, v, meta)
    if members > 1:
        block, out, lse, pool = jax.lax.fori_loop(0, members - 1, step, (block, out, lse, pool))
    out, lse = attend(block, out, lse)
    return out, lse, keep(block, pool)


def ring_attention(mesh: Mesh, layer: int | jax.Array, q, k, v, positions, segment_ids, placement_member,
                   placement_slot, pool, attention_impl: str = AUTO):
    """Exact causal attention of a packed, row-laid-out prefill over a group.

    q: [rows, q_heads, head_dim]; k, v: [rows, kv_heads, head_dim] (RoPE applied),
    sharded HEADS_SPEC; positions, segment_ids, placement_member,
    placement_slot: [rows] int32, sharded BY_MEMBER_SPEC; pool: the group pool
    [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC, or
    None to attend without keeping KV. `layer` (an int, or an int32 scalar
    traced by the model's layer scan) picks the pool layer;
    `attention_impl` (static) the `models.kernels.dispatch` implementation.

    Returns out [rows, q_heads, head_dim] float32, lse [rows, q_heads] float32
    (-inf for rows that see no key), and the updated pool.
    """
    members = mesh.shape[SEQ]
    local = functools.partial(_ring_local, members=members, scale=q.shape[-1] ** -0.5,
                              attention_impl=attention_impl)
    pool_spec = None if pool is None else POOL_SPEC
    program = jax.shard_map(
        local, mesh=mesh,
        # layer; q, k, v; per-row arrays; pool
        in_specs=(REPLICATED_SPEC,) + (HEADS_SPEC,) * 3 + (BY_MEMBER_SPEC,) * 4 + (pool_spec,),
        out_specs=(HEADS_SPEC, LSE_SPEC, pool_spec), check_vma=checks_vma(attention_impl))
    return program(jnp.asarray(layer, jnp.int32), q, k, v, positions, segment_ids, placement_member,
                   placement_slot, pool)

