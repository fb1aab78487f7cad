"""A group's pool kept whole between its programs (`executor.instance_pools`): the same group again takes the
pool its last program returned (nothing assembled), and any other use of a member's pool (an overlapping
group, a read, a write) first splits it back, so every program and read sees every earlier write."""

from __future__ import annotations

import jax
import numpy as np

from loong_jax.executor.instance_pools import InstancePools
from loong_jax.sharding.kv_pool import PoolShape, create_pool
from loong_jax.sharding.topology import Topology

SHAPE = PoolShape(layers=1, pages=2, page_size=2, kv_heads=2, head_dim=4)


@jax.jit
def _stamp(pool, value):  # page 0, slot 0 of every member: the member's old value * 10 + value
    return pool.at[:, 0, 0, 0, 0].set(pool[:, 0, 0, 0, 0] * 10 + value)


stamp = jax.jit(_stamp, donate_argnums=0)


def stamp_of(pool):
    return np.asarray(pool)[:, 0, 0, 0, 0, 0, 0].tolist()


def test_pools_see_every_program_of_every_group():
    topology = Topology(jax.devices()[:8], tp=2)  # 4 instances of 2 devices
    pools = InstancePools(topology, [create_pool(SHAPE, topology, i) for i in range(topology.num_instances)])
    expected = [0.0] * topology.num_instances
    for value, group in enumerate([(0, 1), (0, 1), (1, 2), (1, 2), (3,), (3,), (2, 0), (0, 1), (3,)], start=1):
        pools.put(group, stamp(pools.take(group), value))
        for instance in group:
            expected[instance] = expected[instance] * 10 + value
    assert [stamp_of(pools[i])[0] for i in range(topology.num_instances)] == expected
    pools.put((3,), stamp(pools.take((3,)), 5))
    pools[3] = create_pool(SHAPE, topology, 3, fill=7.0)  # a write replaces the member kept whole
    assert stamp_of(pools.take((3,))) == [7.0]


def test_the_same_group_again_takes_its_last_pool_and_a_read_splits_it():
    topology = Topology(jax.devices()[:4], tp=1)
    pools = InstancePools(topology, [create_pool(SHAPE, topology, i) for i in range(topology.num_instances)])
    group = (2, 0)
    returned = stamp(pools.take(group), 1)
    pools.put(group, returned)
    assert pools.take(group) is returned  # nothing assembled
    pools.put(group, returned)
    assert stamp_of(pools[0]) == [1.0] and stamp_of(pools[2]) == [1.0]  # split back on a read
    again = pools.take(group)
    assert again is not returned and stamp_of(again) == [1.0, 1.0]  # assembled anew from the members
    pools.put(group, stamp(again, 2))
    overlapping = pools.take((0, 1))  # member 0 comes from the kept pool of (2, 0)
    assert stamp_of(overlapping) == [12.0, 0.0]
    pools.put((0, 1), overlapping)
    assert stamp_of(pools[2]) == [12.0]
