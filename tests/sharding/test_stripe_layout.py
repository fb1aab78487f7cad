"""Host-side layout and placement: rows per member, inverse map, dense slots."""

import numpy as np
import pytest

from loong_jax.sharding.stripe_layout import (
    build_layout, contiguous_members, keep_round_robin, place_densely, striped_layout)


def test_striped_rows_and_inverse_map():
    lengths = [2, 5, 1]
    layout = striped_layout(lengths, members=3, rows_per_member=4)
    assert layout.num_rows == 12
    # member 0: p0 j0, p1 j0, p1 j3, p2 j0; member 1: p0 j1, p1 j1, p1 j4; member 2: p1 j2
    np.testing.assert_array_equal(layout.segment_ids, [0, 1, 1, 2, 0, 1, 1, -1, 1, -1, -1, -1])
    np.testing.assert_array_equal(layout.positions, [0, 0, 3, 0, 1, 1, 4, 0, 2, 0, 0, 0])
    stream = np.arange(8) * 10
    rows = layout.to_rows(stream, fill=-5)
    np.testing.assert_array_equal(layout.to_stream(rows), stream)
    assert (rows[layout.stream_index < 0] == -5).all()
    np.testing.assert_array_equal(layout.stream_index[layout.row_of_token], np.arange(8))
    np.testing.assert_array_equal(layout.last_token_rows(), [4, 6, 3])
    with pytest.raises(ValueError):
        striped_layout(lengths, members=3, rows_per_member=3)
    with pytest.raises(ValueError):
        striped_layout([3, 0], members=2)


def test_contiguous_layout_cuts_the_stream():
    lengths = [3, 5]
    members = contiguous_members(lengths, 4)
    np.testing.assert_array_equal(members, [0, 0, 1, 1, 2, 2, 3, 3])
    layout = build_layout(lengths, members, 4)
    np.testing.assert_array_equal(layout.positions, [0, 1, 2, 0, 1, 2, 3, 4])


def test_dense_placement_follows_page_tables():
    lengths = [5, 3]
    keep = keep_round_robin(lengths, [[1], [0, 1]])
    np.testing.assert_array_equal(keep, [1, 1, 1, 1, 1, 0, 1, 0])
    page_size = 2
    tables = [[[], [7]], [[4, 2, 9], [0]]]  # [member][request]
    placement = place_densely(lengths, keep, tables, page_size)
    # request 0 on member 1: slots of pages 4, 4, 2, 2, 9; request 1: member 0 page 7, member 1 page 0
    np.testing.assert_array_equal(placement.slot, [8, 9, 4, 5, 18, 14, 0, 15])
    member_rows, slot_rows = placement.rows(striped_layout(lengths, 2))
    assert (member_rows >= -1).all() and len(slot_rows) == len(member_rows)
    with pytest.raises(ValueError):
        place_densely(lengths, keep, [[[], [7]], [[4, 2], [0]]], page_size)
