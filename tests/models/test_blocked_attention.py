"""Block-sparse segment attention against float64 dense attention, and the tile
pairs it visits against the pairs that really meet."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loong_jax.models.blocked_attention import (
    KV_TILE, Q_TILE, blocked_partial_attention, key_tile_ranges, segment_attention)
from loong_jax.sharding.stripe_layout import (
    rows_needed, stream_positions, stream_segments, striped_layout, striped_members)
from tests.models.attention_reference import reference_attention

Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
ROWS = 96  # every case is padded to this many rows, so each tile shape compiles once
GARBAGE = 1e3  # q, k, v of padding rows: must never leak into a real row


@functools.lru_cache(maxsize=None)
def blocked(q_tile, kv_tile):
    return jax.jit(functools.partial(blocked_partial_attention, scale=HEAD_DIM ** -0.5, q_tile=q_tile,
                                     kv_tile=kv_tile))


@functools.lru_cache(maxsize=None)
def tile_ranges(q_tile, kv_tile):
    return jax.jit(functools.partial(key_tile_ranges, q_tile=q_tile, kv_tile=kv_tile))


def packed_stream(lengths, rows=ROWS):
    """(positions, segments) [rows] of prompts packed in stream order, padding (-1) after them."""
    total = sum(lengths)
    positions, segments = np.zeros(rows, np.int32), np.full(rows, -1, np.int32)
    positions[:total], segments[:total] = stream_positions(lengths), stream_segments(lengths)
    return positions, segments


def random_qkv(rng, q_rows, kv_rows, q_segments, kv_segments):
    q = rng.standard_normal((q_rows, Q_HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((kv_rows, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((kv_rows, KV_HEADS, HEAD_DIM)).astype(np.float32)
    q[q_segments < 0], k[kv_segments < 0], v[kv_segments < 0] = GARBAGE, GARBAGE, GARBAGE
    return q, k, v


def check_against_reference(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_tile, kv_tile):
    out, lse = blocked(q_tile, kv_tile)(q, k, v, q_pos, q_seg, kv_pos, kv_seg)
    out, lse = np.asarray(out), np.asarray(lse)
    ref_out, ref_lse = reference_attention(q, k, v, q_pos, q_seg, kv_pos, kv_seg)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    unseen = np.isneginf(ref_lse)  # rows that see no key: exactly 0 out
    assert (out[unseen.all(axis=1)] == 0).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(lse[~unseen], ref_lse[~unseen], rtol=1e-5, atol=1e-5)
    return out, lse


def meeting_tiles(q_pos, q_seg, kv_pos, kv_seg, q_tile, kv_tile):
    """[q_tiles, kv_tiles] bool: tile pairs with at least one (query, key) that attend."""
    mask = (q_seg[:, None] == kv_seg[None, :]) & (kv_seg[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
    return mask.reshape(len(q_seg) // q_tile, q_tile, len(kv_seg) // kv_tile, kv_tile).any(axis=(1, 3))


def visited_tiles(q_pos, q_seg, kv_pos, kv_seg, q_tile, kv_tile):
    first, count = (np.asarray(x) for x in tile_ranges(q_tile, kv_tile)(q_pos, q_seg, kv_pos, kv_seg))
    tiles = np.arange(len(kv_seg) // kv_tile)
    return (tiles[None, :] >= first[:, None]) & (tiles[None, :] < (first + count)[:, None])


# Many boundaries: length-1 prompts, prompts of exactly a tile, boundaries on and off tile edges.
PACKED_CASES = [
    ([1, 7, 8, 1, 16, 3, 9, 1, 2, 24, 5], 8, 8),
    ([1, 7, 8, 1, 16, 3, 9, 1, 2, 24, 5], 4, 16),
    ([33, 1, 1, 1, 40], 16, 4),
    ([90], 32, 32),  # one causal prompt, ROWS not a multiple of the tile
    ([1] * 50, 8, 8),
]


@pytest.mark.parametrize("lengths,q_tile,kv_tile", PACKED_CASES)
def test_packed_stream_matches_float64_and_visits_only_meeting_tiles(lengths, q_tile, kv_tile):
    positions, segments = packed_stream(lengths)
    q, k, v = random_qkv(np.random.default_rng(len(lengths) + q_tile), ROWS, ROWS, segments, segments)
    check_against_reference(q, k, v, positions, segments, positions, segments, q_tile, kv_tile)
    # A stream over itself: the visited tile pairs are exactly those that meet (padded to whole tiles).
    rows = -(-ROWS // max(q_tile, kv_tile)) * max(q_tile, kv_tile)
    padded = packed_stream(lengths, rows)
    np.testing.assert_array_equal(visited_tiles(*padded, *padded, q_tile, kv_tile),
                                  meeting_tiles(*padded, *padded, q_tile, kv_tile))


@pytest.mark.parametrize("members", [2, 4, 8])
def test_striped_member_blocks_merge_to_dense(members):
    """Each (queries of member a, keys of member b) block of a striped layout, as one ring step
    computes it; merging the d blocks of a member gives the whole attention."""
    lengths = [1, 5, 17, 2, 3, 9, 1, 30, 4]
    needed = rows_needed(striped_members(lengths, members), members)
    layout = striped_layout(lengths, members, rows_per_member=-(-needed // 4) * 4)  # whole tiles of 4
    rows = layout.num_rows
    q, k, v = random_qkv(np.random.default_rng(members), rows, rows, layout.segment_ids, layout.segment_ids)
    local = lambda x, m: x[m * layout.rows_per_member:(m + 1) * layout.rows_per_member]  # noqa: E731
    pos, seg = layout.positions, layout.segment_ids
    merged_out = np.zeros((rows, Q_HEADS, HEAD_DIM))
    merged_lse = np.full((rows, Q_HEADS), -np.inf)
    for me in range(members):
        for source in range(members):
            args = (local(q, me), local(k, source), local(v, source), local(pos, me), local(seg, me),
                    local(pos, source), local(seg, source))
            out, lse = check_against_reference(*args, 4, 4)
            visited = visited_tiles(*args[3:], 4, 4)
            assert (visited >= meeting_tiles(*args[3:], 4, 4)).all()  # every tile pair that meets
            # Sorted member streams: at most one extra key tile per query tile, far fewer than all.
            assert visited.sum() <= meeting_tiles(*args[3:], 4, 4).sum() + visited.shape[0] < visited.size
            mine = slice(me * layout.rows_per_member, (me + 1) * layout.rows_per_member)
            total = np.logaddexp(merged_lse[mine], lse)
            weight = lambda x: np.where(np.isfinite(x), np.exp(x - np.where(np.isfinite(total), total, 0)), 0)  # noqa: E731
            merged_out[mine] = merged_out[mine] * weight(merged_lse[mine])[..., None] + out * weight(lse)[..., None]
            merged_lse[mine] = total
    ref_out, ref_lse = reference_attention(q, k, v, pos, seg)
    np.testing.assert_allclose(merged_out, ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_array_equal(np.isneginf(merged_lse), np.isneginf(ref_lse))


def test_rows_that_see_no_key_and_padding_between_real_rows():
    """Query segments absent from the keys, padding rows in the middle of both streams, and an
    all-padding key tile: out 0 and lse -inf where nothing is seen, never NaN."""
    q_pos, q_seg = packed_stream([6, 10, 3, 20])
    kv_pos, kv_seg = packed_stream([6, 10, 3, 20])
    kv_seg = np.where(kv_seg == 1, -1, kv_seg)  # prompt 1's keys are elsewhere: its queries see nothing
    kv_seg[24:32] = -1  # a whole padding tile (of 8) inside prompt 3's keys
    q_seg[25:28] = -1  # padding between real query rows
    q, k, v = random_qkv(np.random.default_rng(3), ROWS, ROWS, q_seg, kv_seg)
    out, lse = check_against_reference(q, k, v, q_pos, q_seg, kv_pos, kv_seg, 8, 8)
    blind = (q_seg == 1) | (q_seg < 0)
    assert (out[blind] == 0).all() and np.isneginf(lse[blind]).all()


def test_unsorted_rows_fall_back_to_every_tile_and_stay_exact():
    positions, segments = packed_stream([5, 9, 14, 3, 30])
    order = np.random.default_rng(5).permutation(ROWS)
    positions, segments = positions[order], segments[order]
    q, k, v = random_qkv(np.random.default_rng(6), ROWS, ROWS, segments, segments)
    check_against_reference(q, k, v, positions, segments, positions, segments, 8, 8)
    assert visited_tiles(positions, segments, positions, segments, 8, 8).all()


def test_segment_attention_agrees_on_both_sides_of_the_dense_cutoff():
    """Dense for small shapes, blocked for large; the same answer either way."""
    rng = np.random.default_rng(7)
    for rows in (min(Q_TILE, KV_TILE), 5 * max(Q_TILE, KV_TILE) - 20):
        lengths = [rows // 3, rows // 3, rows - 2 * (rows // 3)]
        positions, segments = packed_stream(lengths, rows)
        q, k, v = random_qkv(rng, rows, rows, segments, segments)
        out, lse = jax.jit(segment_attention, static_argnums=7)(
            q, k, v, positions, segments, positions, segments, HEAD_DIM ** -0.5)
        ref_out, ref_lse = reference_attention(q, k, v, positions, segments)
        np.testing.assert_allclose(np.asarray(out), ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
        np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    positions, segments = packed_stream([20, 31, 7])
    q, k, v = random_qkv(np.random.default_rng(8), ROWS, ROWS, segments, segments)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    out, lse = blocked(8, 8)(*as_bf16, positions, segments, positions, segments)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    ref_out, _ = reference_attention(*(np.asarray(x, np.float32) for x in as_bf16), positions, segments)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())


def test_keys_gathered_from_storage_by_row_index():
    """kv_rows: the key stream lives in shuffled slots of a larger storage (as in a KV pool);
    the other slots hold NaN, which must not reach any output."""
    positions, segments = packed_stream([9, 1, 30, 12, 5])
    q, k, v = random_qkv(np.random.default_rng(9), ROWS, ROWS, segments, segments)
    slots = np.random.default_rng(10).permutation(2 * ROWS)[:ROWS].astype(np.int32)
    k_store = np.full((2 * ROWS, KV_HEADS, HEAD_DIM), np.nan, np.float32)
    v_store = np.full((2 * ROWS, KV_HEADS, HEAD_DIM), np.nan, np.float32)
    k_store[slots], v_store[slots] = k, v
    k_store[slots[segments < 0]] = v_store[slots[segments < 0]] = np.nan  # padding keys: never written either
    gathered = jax.jit(functools.partial(blocked_partial_attention, scale=HEAD_DIM ** -0.5, q_tile=8, kv_tile=16))
    out, lse = gathered(q, k_store, v_store, positions, segments, positions, segments, kv_rows=slots)
    ref_out, ref_lse = reference_attention(q, k, v, positions, segments)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5)
