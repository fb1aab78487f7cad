"""Each local instance's KV pool, with a group's pool kept whole while the same group runs step after step.

A program over a group takes the group's pool (`kv_pool.assemble_group_pool`: the members' buffers viewed
as one array, no copy), donates it and returns the updated one. Data flow, inside `JaxExecutor._dispatch`:
  1. `take(group)`: the group's pool. The one its last program returned when no member's pool was asked
     for since (nothing to assemble); else assembled from the members' pools, after splitting back
     (`kv_pool.split_group_pool`, no copy) any other group's pool that holds one of them.
  2. `put(group, pool)`: the program's returned pool, kept whole: its members' pools are split off only
     when something asks for one (`pools[instance]`: another group's program, a benchmark).
So a decode group that runs alone step after step neither assembles nor splits its pool; one instance's pool
is its own group pool anyway. Over several processes an instance of another process has no pool (None).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from loong_jax.sharding.kv_pool import assemble_group_pool, split_group_pool
from loong_jax.sharding.topology import Topology


class InstancePools:
    def __init__(self, topology: Topology, pools: Sequence[jax.Array | None]):
        self.topology = topology
        self._pools = list(pools)  # instance -> its pool (stale while a group pool holds it)
        self._whole: dict[tuple[int, ...], jax.Array] = {}  # group -> its pool, kept whole
        self._holder: dict[int, tuple[int, ...]] = {}  # instance -> the group whose pool holds it (or runs it)

    def __getitem__(self, instance: int) -> jax.Array | None:
        self._release(instance)
        return self._pools[instance]

    def __setitem__(self, instance: int, pool: jax.Array) -> None:
        self._release(instance)
        self._pools[instance] = pool

    def take(self, group: tuple[int, ...]) -> jax.Array:
        """The group's pool, to donate to a program (`put` hands back what the program returns)."""
        pool = self._whole.pop(group, None)
        if pool is not None:
            return pool
        for instance in group:  # a member held by another group's pool (or by a program that raised)
            self._release(instance)
        pool = assemble_group_pool([self._pools[i] for i in group], self.topology.group_mesh(group))
        self._holder.update({instance: group for instance in group})
        return pool

    def put(self, group: tuple[int, ...], pool: jax.Array) -> None:
        """A program over the group returned its updated pool: kept whole until a member's is asked for."""
        self._whole[group] = pool
        self._holder.update({instance: group for instance in group})

    def _release(self, instance: int) -> None:
        """Split the group pool holding `instance` back into its members' pools."""
        group = self._holder.get(instance)
        if group is None:
            return
        for member in group:
            del self._holder[member]
        pool = self._whole.pop(group, None)
        if pool is None:  # taken and never put back (its program raised): the members' pools are what is left
            return
        for member, member_pool in zip(group, split_group_pool(pool, self.topology, group)):
            if member_pool is not None:
                self._pools[member] = member_pool
