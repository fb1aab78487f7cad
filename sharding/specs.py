"""The partition specs of every array a group program shards: one name per spec.

A group's mesh has two axes (`topology.SEQ` over its members, `topology.TENSOR` over the devices inside one
instance). Every program input, output and attention operand is laid out by one of the specs below; the
model's weights follow the logical-axis rules beside them (`models.llama.PARAM_LOGICAL_AXES` ->
`topology.PARAM_AXIS_RULES`, replicated over SEQ).

Row-laid-out arrays put member m's rows in one contiguous block ([m * T_local, (m + 1) * T_local), see
`stripe_layout`), so "rows over members" and "a leading member axis" are the same split: `BY_MEMBER_SPEC`.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from loong_jax.sharding.topology import SEQ, TENSOR

# Leading axis split over the group's members:
#   [rows] int32 per-token or per-request rows (prefill tokens, positions, segment ids, placement; decode
#   tokens, positions, append slots; sampling rows of a decode batch), member m's rows in its block;
#   [d, ...] int32 per-member tables (decode page entries, context page tables and prefix lengths,
#   migration slot lists).
BY_MEMBER_SPEC = P(SEQ)
# [rows, heads, head_dim] q, k, v and attention outputs: rows over members, heads over an instance's devices.
HEADS_SPEC = P(SEQ, TENSOR, None)
# [rows, heads] float32 log-sum-exp of a partial attention.
LSE_SPEC = P(SEQ, TENSOR)
# [d, layers, 2, pages, page_size, kv_heads, head_dim] a group's KV pool (one member's pool per d index).
POOL_SPEC = P(SEQ, None, None, None, None, TENSOR, None)
# Whole on every device: [requests] prefill logits indices and sampling rows, [rows, columns] sampled tokens,
# [requests, vocab] prefill logits.
REPLICATED_SPEC = P()
