"""Per-instance paged KV pools, and their zero-copy assembly over a group.

Layout of one instance's pool (a leading member axis of size 1, so that a
group's pool is just the members' buffers side by side):

    [1, layers, 2, pages, page_size, kv_heads, head_dim]     (axis 2: 0 = k, 1 = v)

placed on `instance_mesh(i)` with `specs.POOL_SPEC` (kv heads split over TENSOR).
A flat slot of an instance's pool is `page * page_size + offset`.

Data flow of a program over a group:
  1. `create_pool` allocates each instance's pool directly on its devices.
  2. `assemble_group_pool(pools, mesh)` views the members' pools as one array
     [d, layers, 2, pages, page_size, kv_heads, head_dim] sharded P(SEQ, ...,
     TENSOR, ...) over the group mesh, reusing their buffers (no copy).
  3. The program (jitted, pool donated) updates it in place.
  4. `split_group_pool(group_pool, topology, group)` hands each instance its
     own buffers back (no copy), ready for the next program on another group.
Over several processes a process holds only its own instances' pools: it passes
None for the other members, the group pool is assembled from the local buffers
(its other shards live in the other processes) and split back into the local
members' pools (None for the others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from loong_jax.models.config import ModelConfig
from loong_jax.sharding.specs import POOL_SPEC
from loong_jax.sharding.topology import Topology


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """Static shape of one instance's pool."""

    layers: int
    pages: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def for_model(cls, config: ModelConfig, pages: int, page_size: int, dtype: str | None = None):
        return cls(config.num_layers, pages, page_size, config.num_kv_heads, config.head_dim,
                   dtype or config.dtype)

    @property
    def slots(self) -> int:
        return self.pages * self.page_size

    def instance_shape(self) -> tuple[int, ...]:
        return (1, self.layers, 2, self.pages, self.page_size, self.kv_heads, self.head_dim)

    def group_shape(self, members: int) -> tuple[int, ...]:
        return (members,) + self.instance_shape()[1:]


def create_pool(shape: PoolShape, topology: Topology, instance: int, fill: float = 0.0) -> jax.Array:
    """A pool for `instance`, allocated on its devices and filled with `fill`."""
    if shape.kv_heads % topology.tp:
        raise ValueError(f"kv_heads={shape.kv_heads} cannot be split over tp={topology.tp} devices")
    sharding = NamedSharding(topology.instance_mesh(instance), POOL_SPEC)
    # Built on the devices themselves: a long-context pool never crosses the host.
    return jnp.full(shape.instance_shape(), fill, dtype=shape.dtype, device=sharding)


def assemble_group_pool(pools: Sequence[jax.Array], mesh: Mesh) -> jax.Array:
    """Members' pools [1, ...] (in group order) -> one group pool [d, ...] over
    `mesh` with POOL_SPEC, built from the members' own buffers (no copy). A member
    held by another process passes None (its devices are not this process's)."""
    members = mesh.devices.shape[0]
    if len(pools) != members:
        raise ValueError(f"group of {members} members got {len(pools)} pools")
    sharding = NamedSharding(mesh, POOL_SPEC)
    if members == 1 and pools[0] is not None and pools[0].sharding == sharding:  # already the group pool
        return pools[0]
    local = jax.process_index()
    buffers, shape_source = [], None
    for member, pool in enumerate(pools):
        if pool is None:
            if any(device.process_index == local for device in mesh.devices[member]):
                raise ValueError(f"member {member} of the group is on this process but has no pool")
            continue
        shape_source = pool
        shard_by_device = {shard.device: shard.data for shard in pool.addressable_shards}
        for device in mesh.devices[member]:
            if device not in shard_by_device:
                raise ValueError(f"pool of member {member} is not on device {device} of the group mesh")
            buffers.append(shard_by_device[device])
    if shape_source is None:
        raise ValueError("no member of the group is on this process")
    group_shape = (members,) + tuple(shape_source.shape[1:])
    return jax.make_array_from_single_device_arrays(group_shape, sharding, buffers)


def split_group_pool(group_pool: jax.Array, topology: Topology, group: Sequence[int]) -> list[jax.Array]:
    """Group pool [d, ...] -> one pool [1, ...] per member, on its instance mesh
    (no copy: each member keeps the buffers it already holds); None for a member
    held by another process."""
    if len(group) == 1 and group_pool.sharding == NamedSharding(topology.instance_mesh(group[0]), POOL_SPEC):
        return [group_pool]
    shard_by_device = {shard.device: shard.data for shard in group_pool.addressable_shards}
    instance_shape = (1,) + tuple(group_pool.shape[1:])
    pools = []
    for instance in group:
        if instance not in topology.local_instances:
            pools.append(None)
            continue
        mesh = topology.instance_mesh(instance)
        buffers = [shard_by_device[device] for device in mesh.devices.flat]
        pools.append(jax.make_array_from_single_device_arrays(
            instance_shape, NamedSharding(mesh, POOL_SPEC), buffers))
    return pools


def flat_slot(page: int | np.ndarray, offset: int | np.ndarray, page_size: int):
    """Flat slot index of (page, offset) in an instance's pool."""
    return page * page_size + offset


def read_slots(pool: jax.Array, slots: Sequence[int] | np.ndarray) -> np.ndarray:
    """Host copy of the k, v at flat `slots` of one instance's pool:
    [layers, 2, len(slots), kv_heads, head_dim] (for checks and debugging)."""
    host = np.asarray(pool)[0]  # [layers, 2, pages, page_size, kv_heads, head_dim]
    layers, _, pages, page_size, kv_heads, head_dim = host.shape
    flat = host.reshape(layers, 2, pages * page_size, kv_heads, head_dim)
    return flat[:, :, np.asarray(slots, dtype=np.int64)]
