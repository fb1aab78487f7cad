"""The Pallas kernels wired into the distributed programs, forced into interpret mode on CPU: a chunked
prefill with context (ring steps + the paged context kernel over two members' pools, one grid) followed by
the distributed decode (paged decode kernel) gives the single-device reference logits and greedy tokens;
the paged context kernel alone matches float64; with the default implementation the programs lower to the
Triton kernels for CUDA and stay free of them for CPU."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from loong_jax.sharding import context_prefill
from loong_jax.executor.programs import context_prefill_program, decode_program
from loong_jax.sharding.decode_attention import DecodeKVCache, decode_attention
from loong_jax.sharding.kv_pool import assemble_group_pool
from loong_jax.sharding.specs import BY_MEMBER_SPEC, HEADS_SPEC, POOL_SPEC
from loong_jax.sharding.topology import Topology, group_params, place_params
from tests.models.attention_reference import reference_attention
from tests.sharding import test_context_prefill as chunked
from tests.sharding.kv_book import KVBook
from tests.sharding.test_context_prefill import model, prompts, reference  # noqa: F401 (fixtures)
from tests.sharding.test_ring_prefill import jit_ring_attention

TRITON_CALL = "__gpu$xla.gpu.triton"


def test_chunked_prefill_then_decode_through_interpreted_kernels(model, prompts, reference,  # noqa: F811
                                                                 monkeypatch):
    group = (5, 1)
    topology = Topology(jax.devices(), 1)
    mesh = topology.group_mesh(group)
    graphdef, state = nnx.split(model)
    params = group_params(place_params(state, topology), topology, group)
    program = context_prefill_program(graphdef, mesh, attention_impl="interpret")
    monkeypatch.setattr(chunked, "decode_program", functools.partial(decode_program, attention_impl="interpret"))
    book, slot_of = KVBook(len(group), chunked.PAGES, chunked.PAGE_SIZE), {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = assemble_group_pool(chunked.nan_pools(topology, group), mesh)
        last_logits, pool = chunked.chunked_prefill(program, params, pool, mesh, prompts, book, len(group), slot_of)
        expected = np.stack([r.logits[0] for r in reference])
        assert np.abs(np.stack(last_logits) - expected).max() <= 1e-4 * np.abs(expected).max()
        first_tokens = [int(np.argmax(l)) for l in last_logits]
        decoded = chunked.greedy_decode(graphdef, params, pool, mesh, book, first_tokens, len(group))
    assert [[first] + rest for first, rest in zip(first_tokens, decoded)] == [r.tokens for r in reference]


def test_paged_context_kernel_matches_float64():
    """Two members' row blocks in one grid over one member's pool: each query over its request's prefix
    pages (NaN wherever nothing is held); requests 1 and 3 hold nothing here."""
    rng = np.random.default_rng(3)
    pages, page_size, kv_heads, q_heads, head_dim, layers, layer = 24, 4, 2, 4, 64, 2, 1
    pool = np.full((1, layers, 2, pages, page_size, kv_heads, head_dim), np.nan, np.float32)
    kv_lens = np.array([9, 0, 4, 0, 13], np.int32)  # prefix tokens this member holds per request
    max_pages = 5
    page_tables = np.zeros((len(kv_lens), max_pages), np.int32)
    free = list(rng.permutation(pages))
    held_keys = {}
    for request, held in enumerate(kv_lens):
        table = [free.pop() for _ in range(-(-held // page_size))]
        page_tables[request, :len(table)] = table
        slots = [(table[t // page_size], t % page_size) for t in range(held)]
        for page, offset in slots:
            pool[0, :, :, page, offset] = rng.standard_normal((layers, 2, kv_heads, head_dim))
        held_keys[request] = slots
    members, rows_per_member = 2, 24
    segments = np.full((members, rows_per_member), -1, np.int32)
    segments[0, :20] = np.repeat([0, 1, 2, 4], 5)
    segments[1, 3:21] = np.repeat([0, 2, 3], 6)
    segments = segments.reshape(-1)
    q = rng.standard_normal((members * rows_per_member, q_heads, head_dim)).astype(np.float32)
    kernel = jax.jit(functools.partial(context_prefill._held_prefix_partials_kernel, layer=layer,
                                       scale=head_dim ** -0.5, members=members, interpret=True))
    out, lse = (np.asarray(x) for x in kernel(q, segments, pool, page_tables=page_tables, kv_lens=kv_lens))
    ref_out, ref_lse = np.zeros_like(out), np.full(lse.shape, -np.inf)
    for row, request in enumerate(segments):
        slots = held_keys.get(int(request), [])
        if not slots:
            continue
        page, offset = np.array(slots).T
        zeros = np.zeros(len(slots), np.int32)
        ref_out[row], ref_lse[row] = (x[0] for x in reference_attention(
            q[row:row + 1], pool[0, layer, 0, page, offset], pool[0, layer, 1, page, offset], zeros[:1],
            zeros[:1], zeros, zeros))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    held = ~np.isneginf(ref_lse)
    np.testing.assert_allclose(lse[held], ref_lse[held], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,has_triton", [("cuda", True), ("cpu", False)])
def test_ring_program_dispatches_by_platform(platform, has_triton):
    """The default ("auto") ring and decode attention on a 2-member group: Triton kernels when lowered for
    CUDA only."""
    topology = Topology(jax.devices(), 1)
    mesh = topology.group_mesh((0, 1))
    rows, heads, head_dim = 2 * 64, 4, 64

    def spec(shape, dtype, partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))

    qkv = [spec((rows, heads, head_dim), jnp.bfloat16, HEADS_SPEC)] * 3
    per_row = [spec((rows,), jnp.int32, BY_MEMBER_SPEC)] * 4
    pool = spec((2, 1, 2, 8, 16, heads, head_dim), jnp.bfloat16, POOL_SPEC)
    ring = jit_ring_attention(mesh, 0).trace(*qkv, *per_row, pool).lower(lowering_platforms=(platform,))
    assert (TRITON_CALL in ring.as_text()) == has_triton
    entries = [spec((2, 16), jnp.int32, BY_MEMBER_SPEC)] * 3
    cache = DecodeKVCache(pool, *entries, append_slots=per_row[0])

    def decode(q, k, v, cache):
        return decode_attention(0, q, k, v, None, None, cache, mesh=mesh)

    decode = jax.jit(decode).trace(*qkv, cache).lower(lowering_platforms=(platform,))
    assert (TRITON_CALL in decode.as_text()) == has_triton
