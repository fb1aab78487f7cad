"""Ring prefill attention against a float64 dense reference, and the KV it
keeps in the pools (proactive scale-down), for d in {1, 2, 3, 4, 8}, tp in {1, 2}."""

import warnings

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding

from loong_jax.models.blocked_attention import Q_TILE
from loong_jax.sharding.kv_pool import PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.models.kernels.dispatch import AUTO
from loong_jax.sharding.ring_prefill import ring_attention
from loong_jax.sharding.specs import BY_MEMBER_SPEC, HEADS_SPEC
from loong_jax.sharding.stripe_layout import (
    PackedLayout, keep_round_robin, place_densely, striped_layout, striped_members, rows_needed)
from loong_jax.sharding.topology import Topology
from tests.models.attention_reference import reference_attention

Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
PAGES, PAGE_SIZE, LAYERS, LAYER = 10, 4, 2, 1
SENTINEL = -7.25
POOL_SHAPE = PoolShape(LAYERS, PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM)
CASES = [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (1, 2), (2, 2), (3, 2), (4, 2)]  # (d, tp)
ONLY_RING_TRAFFIC = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-broadcast")


def allocate_pages(keep_member, layout_lengths, members, rng, pages=PAGES):
    """Page tables [member][request] from a shuffled free list per member."""
    segments = np.repeat(np.arange(len(layout_lengths)), layout_lengths)
    tables = []
    for member in range(members):
        free = list(rng.permutation(pages))
        row = []
        for request in range(len(layout_lengths)):
            count = int(np.sum((keep_member == member) & (segments == request)))
            row.append([int(free.pop()) for _ in range(-(-count // PAGE_SIZE))])
        tables.append(row)
    return tables


def relative_error(actual, expected):
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


def jit_ring_attention(mesh, layer: int = 0, attention_impl: str = AUTO):
    """`ring_attention` of one layer jitted for one group mesh, pool donated: an attention-level harness
    (the whole-model programs are `loong_jax.executor.programs`)."""

    def run(q, k, v, positions, segment_ids, placement_member, placement_slot, pool):
        return ring_attention(mesh, layer, q, k, v, positions, segment_ids, placement_member,
                              placement_slot, pool, attention_impl)

    return jax.jit(run, donate_argnames=("pool",))


@pytest.fixture(scope="module")
def programs():
    """Compiled ring programs per (d, tp, group): shapes are fixed per case, so
    every example of a case reuses one executable."""
    cache = {}

    def get(d, tp):
        if (d, tp) not in cache:
            topology = Topology(jax.devices(), tp)
            # A rotated group: members need not be instances 0..d-1 in order.
            group = tuple((i + 1) % topology.num_instances for i in range(d))
            mesh = topology.group_mesh(group)
            cache[(d, tp)] = (topology, group, mesh, jit_ring_attention(mesh, LAYER))
        return cache[(d, tp)]

    return get


def run_ring_case(programs, d, tp, lengths, keepers, seed, rows_per_member=None, pool_shape=POOL_SHAPE):
    topology, group, mesh, program = programs(d, tp)
    rng = np.random.default_rng(seed)
    layout: PackedLayout = striped_layout(lengths, d, rows_per_member)
    total = int(np.sum(lengths))
    # Stream-order inputs; padding rows get garbage values that must not leak.
    q_s = rng.standard_normal((total, Q_HEADS, HEAD_DIM)).astype(np.float32)
    k_s = rng.standard_normal((total, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v_s = rng.standard_normal((total, KV_HEADS, HEAD_DIM)).astype(np.float32)
    keep_member = keep_round_robin(lengths, keepers)
    placement = place_densely(lengths, keep_member, allocate_pages(keep_member, lengths, d, rng, pool_shape.pages),
                              PAGE_SIZE)
    member_rows, slot_rows = placement.rows(layout)

    def rows(x, spec):
        garbage = np.float32(1e3) if x.dtype == np.float32 else 0
        return jax.device_put(layout.to_rows(x, fill=garbage), NamedSharding(mesh, spec))

    pools = [create_pool(pool_shape, topology, i, fill=SENTINEL) for i in group]
    args = (rows(q_s, HEADS_SPEC), rows(k_s, HEADS_SPEC), rows(v_s, HEADS_SPEC),
            jax.device_put(layout.positions, NamedSharding(mesh, BY_MEMBER_SPEC)),
            jax.device_put(layout.segment_ids, NamedSharding(mesh, BY_MEMBER_SPEC)),
            jax.device_put(member_rows, NamedSharding(mesh, BY_MEMBER_SPEC)),
            jax.device_put(slot_rows, NamedSharding(mesh, BY_MEMBER_SPEC)),
            assemble_group_pool(pools, mesh))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "donated buffers were not usable" warning fails the test
        out, lse, group_pool = program(*args)
    assert args[-1].is_deleted()
    out, lse = np.asarray(out), np.asarray(lse)

    # 1. Attention output and log-sum-exp, in stream order, against float64.
    positions_s = layout.to_stream(layout.positions)
    segments_s = layout.to_stream(layout.segment_ids)
    ref_out, ref_lse = reference_attention(q_s, k_s, v_s, positions_s, segments_s)
    assert relative_error(layout.to_stream(out), ref_out) <= 1e-5
    assert relative_error(layout.to_stream(lse), ref_lse) <= 1e-5
    # 2. Padding rows see no key: output exactly 0, lse -inf, never NaN.
    padding = layout.segment_ids < 0
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert (out[padding] == 0).all() and np.isneginf(lse[padding]).all()
    # 3. Each member's pool holds exactly the tokens placed on it; all else untouched.
    for member, pool in enumerate(split_group_pool(group_pool, topology, group)):
        host = np.asarray(pool)[0].reshape(LAYERS, 2, pool_shape.pages * PAGE_SIZE, KV_HEADS, HEAD_DIM)
        expected = np.full_like(host, SENTINEL)
        mine = placement.member == member
        expected[LAYER, 0, placement.slot[mine]] = k_s[mine]
        expected[LAYER, 1, placement.slot[mine]] = v_s[mine]
        np.testing.assert_array_equal(host, expected)
    return program, args


@pytest.mark.parametrize("d,tp", CASES)
def test_ring_matches_dense_reference_and_keeps_placed_kv(programs, d, tp):
    # Lengths shorter than d, of 1, not divisible by d; keepers: all members,
    # one member (scale-down to it), a pair, and a reversed order.
    lengths = [1, d + 3, 2, 3 * d + 1, 5]
    keepers = [[0], list(range(d)), [d - 1], [d // 2, 0] if d > 1 else [0], list(range(d))[::-1]]
    program, args = run_ring_case(programs, d, tp, lengths, keepers, seed=d * 10 + tp)
    # The only collectives are the ring's KV moves (none at all for d = 1).
    hlo = program.lower(*args[:-1], jax.ShapeDtypeStruct(
        POOL_SHAPE.group_shape(d), np.float32, sharding=args[-1].sharding)).compile().as_text()
    assert not any(op in hlo for op in ONLY_RING_TRAFFIC)
    assert ("collective-permute" in hlo) == (d > 1)


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_long_packed_batch_takes_the_block_sparse_path(programs, d):
    """More rows per member than one attention tile: each ring step runs the block-sparse
    attention; many prompts with boundaries on and off tile edges, 150 rows per member."""
    assert 150 > 2 * Q_TILE  # several query tiles, the last one part padding
    lengths = []
    for length in [1, 127, 2, 128, 3, 64, 65, 1, 5, 33, 129, 7] * 4:  # the ones that still fit 150 rows
        if rows_needed(striped_members(lengths + [length], d), d) <= 150:
            lengths.append(length)
    keepers = [list(range(d))[r % d:] + list(range(d))[:r % d] for r in range(len(lengths))]
    pool_shape = PoolShape(LAYERS, 192, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    run_ring_case(programs, d, 1, lengths, keepers, seed=d, rows_per_member=150, pool_shape=pool_shape)


def test_same_bucket_does_not_recompile(programs):
    """Different prompts in the same (group, rows bucket) reuse one executable."""
    _, _, _, program = programs(2, 1)
    run_ring_case(programs, 2, 1, [3, 4], [[0], [1]], seed=1, rows_per_member=6)
    compiled_before = program._cache_size()
    run_ring_case(programs, 2, 1, [2, 1, 7], [[1], [0, 1], [0]], seed=2, rows_per_member=6)
    assert program._cache_size() == compiled_before


@st.composite
def ring_cases(draw):
    d, tp = draw(st.sampled_from([(3, 1), (2, 2)]))
    rows = 8
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=4))
    if rows_needed(striped_members(lengths, d), d) > rows:
        lengths = lengths[:1]
    keepers = [draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True))
               for _ in lengths]
    return d, tp, lengths, keepers, rows, draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None)
@given(case=ring_cases())
def test_ring_hypothesis_cases(programs, case):
    d, tp, lengths, keepers, rows, seed = case
    run_ring_case(programs, d, tp, lengths, keepers, seed, rows_per_member=rows)


def test_ring_without_pool_gives_the_same_attention(programs):
    """pool=None attends without keeping any KV; the output is unchanged."""
    program, args = run_ring_case(programs, 3, 1, [4, 1, 6], [[0], [1], [2, 0]], seed=4)
    out_kept, lse_kept, _ = program(*args[:-1], assemble_group_pool(
        [create_pool(POOL_SHAPE, programs(3, 1)[0], i) for i in programs(3, 1)[1]], programs(3, 1)[2]))
    out, lse, pool = program(*args[:-1], None)
    assert pool is None
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_kept))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_kept))
