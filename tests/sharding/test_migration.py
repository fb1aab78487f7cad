"""Page migration by collective permute: exact copies, padding dropped, in place, one compile."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from loong_jax.executor.programs import migration_program
from loong_jax.sharding.kv_pool import assemble_group_pool, split_group_pool
from loong_jax.sharding.migration import PageTransfer, layout_migration
from loong_jax.sharding.specs import POOL_SPEC
from loong_jax.sharding.topology import Topology, buffer_pointers
from tests.sharding.compiles import count_compiles

LAYERS, PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM = 2, 10, 4, 2, 8


def test_migration_moves_exactly_the_listed_pages_in_place():
    rng = np.random.default_rng(7)
    topology = Topology(jax.devices()[:6], tp=2)
    group = (2, 0, 1)
    mesh = topology.group_mesh(group)
    host_pool = rng.standard_normal((3, LAYERS, 2, PAGES, PAGE_SIZE, KV_HEADS, HEAD_DIM)).astype(np.float32)
    pools = [jax.device_put(host_pool[m:m + 1], NamedSharding(topology.instance_mesh(i), POOL_SPEC))
             for m, i in enumerate(group)]
    pointers = [buffer_pointers(p) for p in pools]
    pool = assemble_group_pool(pools, mesh)

    transfers = [PageTransfer(source=0, destination=2, source_pages=[1, 4, 7], destination_pages=[2, 3, 9]),
                 PageTransfer(source=2, destination=1, source_pages=[5], destination_pages=[0])]
    plan = layout_migration(transfers, members=3, max_pages=4)
    assert plan.moves == ((0, 2), (2, 1))
    # Padding is decided by the receive list alone: a real page in a send slot
    # whose receive entry is -1 must still write nothing.
    send_pages = plan.send_pages.copy()
    send_pages[send_pages < 0] = 6
    plan = type(plan)(plan.moves, send_pages, plan.receive_pages)

    program = migration_program(mesh, plan.moves, whole_pages=True)
    with warnings.catch_warnings(), count_compiles() as compiles:
        warnings.simplefilter("error")  # "donated buffers were not usable" fails the test
        pool = program(pool, *plan.to_device(mesh))

    expected = host_pool.copy()
    expected[2, :, :, [2, 3, 9]] = host_pool[0, :, :, [1, 4, 7]]
    expected[1, :, :, 0] = host_pool[2, :, :, 5]
    np.testing.assert_array_equal(np.asarray(pool), expected)

    # The same bucket and moves with other pages reuse the compiled program.
    again = layout_migration([PageTransfer(0, 2, [8], [1]), PageTransfer(2, 1, [9, 3], [6, 7])], 3, 4)
    assert again.moves == plan.moves
    with count_compiles() as compiles_again:
        pool = program(pool, *again.to_device(mesh))
    expected[2, :, :, 1] = expected[0, :, :, 8]
    expected[1, :, :, [6, 7]] = expected[2, :, :, [9, 3]]
    np.testing.assert_array_equal(np.asarray(pool), expected)
    assert compiles["migrate"] == 1 and compiles_again["migrate"] == 0

    # Written in place: each instance still owns the buffers it started with.
    assert [buffer_pointers(p) for p in split_group_pool(pool, topology, group)] == pointers


def test_layout_migration_rejects_what_a_permutation_cannot_do():
    with pytest.raises(ValueError, match="at most one"):
        layout_migration([PageTransfer(0, 1, [1], [2]), PageTransfer(0, 2, [3], [4])], 3, 2)
    with pytest.raises(ValueError, match="bucket"):
        layout_migration([PageTransfer(0, 1, [1, 2, 3], [4, 5, 6])], 2, 2)
    with pytest.raises(ValueError, match="itself"):
        layout_migration([PageTransfer(1, 1, [1], [2])], 2, 2)
