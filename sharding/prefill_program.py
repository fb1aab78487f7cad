"""Whole-model prefill of a packed batch on a group: "prefill this batch on
this group with this placement".

Data flow:
  1. Host: `stripe_layout` lays the prompts out in rows (member m owns rows
     [m * T_local, (m + 1) * T_local)) and turns the placement into per-row
     (member, slot); `make_prefill_inputs` puts those arrays (`PrefillInputs`)
     on the group mesh, sharded BY_MEMBER_SPEC over rows.
  2. Device, `prefill_forward` (traceable; jitted with the pool donated and
     the sampler fused by `loong_jax.executor.programs.prefill_program`):
     a. the model's dense layers (embedding, projections, MLP, norms) run under
        GSPMD: rows over SEQ, weights over TENSOR per the logical-axis table,
        on the weights' zero-copy group view (`topology.group_params`);
     b. at each layer the model calls the attention hook, which runs the ring
        (`ring_prefill.ring_attention`: shard_map + ppermute, heads over
        TENSOR) and writes each placed token's k, v into its keeper's pool;
     c. the LM head runs only for the rows in `logits_indices` (each prompt's
        last token), giving float32 logits to sample the first new token.
  3. Host: `split_group_pool` hands each instance its updated pool back; the
     KV now sits exactly where the placement put it, ready for decode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from loong_jax.models.kernels.dispatch import AUTO
from loong_jax.sharding.ring_prefill import RingPrefillCache, ring_attention
from loong_jax.sharding.specs import BY_MEMBER_SPEC, REPLICATED_SPEC
from loong_jax.sharding.stripe_layout import PackedLayout, Placement


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillInputs:
    """Per-row inputs of a prefill program (numpy on the host, on the group mesh for the device)."""

    tokens: jax.Array  # [rows] int32, sharded BY_MEMBER_SPEC; 0 on padding rows
    positions: jax.Array  # [rows] int32, global position within the prompt
    segment_ids: jax.Array  # [rows] int32, prompt index within the batch, -1 = padding
    placement_member: jax.Array  # [rows] int32, member keeping the token's KV, -1 = nowhere
    placement_slot: jax.Array  # [rows] int32, flat slot in the keeper's pool
    logits_indices: jax.Array  # [num_logits] int32, REPLICATED_SPEC: rows to score


def make_prefill_inputs(layout: PackedLayout, stream_tokens: np.ndarray, placement: Placement, mesh: Mesh,
                        num_logits: int | None = None) -> PrefillInputs:
    """Host arrays in stream order -> `PrefillInputs` on `mesh`.

    stream_tokens: [total] token ids of the packed prompts. num_logits pads
    the scored rows to a bucket (extra entries repeat the first prompt's last
    row and are to be ignored); default: one per prompt.
    """
    last_rows = layout.last_token_rows()
    num_logits = len(last_rows) if num_logits is None else num_logits
    if num_logits < len(last_rows):
        raise ValueError(f"num_logits={num_logits} is less than the {len(last_rows)} prompts")
    logits_indices = np.concatenate([last_rows, np.full(num_logits - len(last_rows), last_rows[0])])
    member_rows, slot_rows = placement.rows(layout)
    rows = NamedSharding(mesh, BY_MEMBER_SPEC)
    return PrefillInputs(
        tokens=jax.device_put(layout.to_rows(np.asarray(stream_tokens, np.int32), fill=0), rows),
        positions=jax.device_put(layout.positions, rows),
        segment_ids=jax.device_put(layout.segment_ids, rows),
        placement_member=jax.device_put(member_rows.astype(np.int32), rows),
        placement_slot=jax.device_put(slot_rows.astype(np.int32), rows),
        logits_indices=jax.device_put(logits_indices.astype(np.int32), NamedSharding(mesh, REPLICATED_SPEC)))


def prefill_forward(graphdef: nnx.GraphDef, params: Any, pool: jax.Array, batch: PrefillInputs, *,
                    mesh: Mesh, attention_impl: str = AUTO) -> tuple[jax.Array, jax.Array]:
    """Traceable whole-model ring prefill.

    graphdef, params: `nnx.split(model)` of a LlamaForCausalLM, params as the
      group view from `topology.group_params` (replicated over SEQ, TENSOR-sharded).
    pool: group pool [d, layers, 2, pages, page_size, kv_heads, head_dim] with POOL_SPEC
      (`kv_pool.assemble_group_pool`).
    batch: the rows of the packed prompts (`make_prefill_inputs`).
    mesh: the group mesh (static).
    attention_impl: `models.kernels.dispatch` implementation of the ring steps (static).

    Returns logits [num_logits, vocab] float32 for `batch.logits_indices` and
    the pool with every placed token's k, v (RoPE applied) written to its slot.
    """
    model = nnx.merge(graphdef, params)

    def ring_hook(layer, q, k, v, positions, segment_ids, cache: RingPrefillCache):
        out, _, pool = ring_attention(mesh, layer, q, k, v, positions, segment_ids,
                                      cache.placement_member, cache.placement_slot, cache.pool, attention_impl)
        return out.astype(q.dtype), dataclasses.replace(cache, pool=pool)

    cache = RingPrefillCache(pool=pool, placement_member=batch.placement_member,
                             placement_slot=batch.placement_slot)
    logits, cache = model(batch.tokens, batch.positions, batch.segment_ids, attention=ring_hook,
                          kv_cache=cache, logits_indices=batch.logits_indices)
    return logits, cache.pool

