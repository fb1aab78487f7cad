"""Devices -> instances -> group meshes, and model parameters laid out on them.

Data flow:
  1. `Topology(devices, tp)` cuts the device list into instances of `tp`
     consecutive devices. An instance holds a full copy of the weights
     (tensor parallel inside it) and its own KV pool.
  2. `topology.group_mesh(group)` builds the mesh of an ordered tuple of
     instances: shape (d, tp), axes (SEQ, TENSOR). Row m of the mesh is the
     m-th member of the group. Meshes are cached per group on the Topology.
  3. `place_params(state, topology)` puts the weights once on every device:
     replicated across instances (SEQ), sharded over TENSOR inside an instance
     by the logical-axis table `PARAM_AXIS_RULES` (stacked layer weights whole
     on their leading layers axis).
  4. `group_params(placed, topology, group)` views those same per-device
     buffers as arrays over one group's mesh; nothing is copied, so any group
     of instances can run a program on the weights that are already there.
Several processes (JAX's multi-controller runtime, `loong_jax.distributed`):
the devices are the whole cluster's (`jax.devices()`), so instances are numbered
over every process; each instance lies inside one process, and a process holds
buffers only for its own devices (`local_instances`, `instance_process`). Views
over a group that spans processes are built from the local buffers alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from loong_jax.models.llama import LAYERS_AXIS, logical_axes

SEQ = "seq"  # mesh axis over the members (instances) of a group
TENSOR = "tensor"  # mesh axis over the devices inside one instance

# Logical axis of a parameter -> mesh axis. Heads and the MLP width are split
# over the devices of an instance; everything else is whole on each device.
PARAM_AXIS_RULES: dict[str, str | None] = {
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "vocab": None,
    "embed": None,
    LAYERS_AXIS: None,  # stacked layer weights: every layer on every device (the scan slices one)
}

Group = tuple[int, ...]


class Topology:
    """Devices grouped into instances of `tp` consecutive devices."""

    def __init__(self, devices: Sequence[jax.Device], tp: int):
        devices = tuple(devices)
        if tp < 1 or len(devices) % tp:
            raise ValueError(f"{len(devices)} devices cannot be cut into instances of tp={tp}")
        self.devices = devices
        self.tp = tp
        self.num_instances = len(devices) // tp
        self._group_meshes: dict[Group, Mesh] = {}
        self.process_index = jax.process_index()
        for instance in range(self.num_instances):
            if len({device.process_index for device in self.instance_devices(instance)}) != 1:
                raise ValueError(f"instance {instance} would span processes: tp={tp} must divide every "
                                 "process's device count")
        # Instances whose devices this process drives (all of them in a single process).
        self.local_instances: frozenset[int] = frozenset(
            i for i in range(self.num_instances) if self.instance_process(i) == self.process_index)

    def instance_process(self, instance: int) -> int:
        """The process whose devices hold `instance` (0 in a single process)."""
        return self.instance_devices(instance)[0].process_index

    def group_processes(self, group: Sequence[int]) -> tuple[int, ...]:
        """The processes a program on `group` runs in, ascending."""
        return tuple(sorted({self.instance_process(i) for i in group}))

    def instance_devices(self, instance: int) -> tuple[jax.Device, ...]:
        if not 0 <= instance < self.num_instances:
            raise ValueError(f"instance {instance} out of range [0, {self.num_instances})")
        return self.devices[instance * self.tp:(instance + 1) * self.tp]

    def instance_mesh(self, instance: int) -> Mesh:
        """Mesh (1, tp) of one instance; its pool lives here."""
        return self.group_mesh((instance,))

    def group_mesh(self, group: Sequence[int]) -> Mesh:
        """Mesh (d, tp) over the instances of `group`, in the group's order."""
        group = tuple(int(i) for i in group)
        if len(set(group)) != len(group) or not group:
            raise ValueError(f"a group is a non-empty tuple of distinct instances, got {group}")
        mesh = self._group_meshes.get(group)
        if mesh is None:
            device_grid = np.array([self.instance_devices(i) for i in group], dtype=object)  # [d, tp]
            mesh = Mesh(device_grid, (SEQ, TENSOR))
            self._group_meshes[group] = mesh
        return mesh

    @property
    def all_instances(self) -> Group:
        return tuple(range(self.num_instances))

    def full_mesh(self) -> Mesh:
        """Mesh over every instance in instance order (where weights are placed)."""
        return self.group_mesh(self.all_instances)


def _path_names(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pytree key path of an nnx.State leaf -> plain names, e.g.
    ('layers', 0, 'self_attn', 'q_proj', 'kernel')."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            names.append(key.name)
    return tuple(names)


def param_spec(path: tuple[Any, ...]) -> P:
    """PartitionSpec of the state leaf at `path` (non-parameters, such as the
    RoPE frequencies, are replicated)."""
    axes = logical_axes(_path_names(path))
    if axes is None:
        return P()
    return P(*(PARAM_AXIS_RULES[axis] for axis in axes))


def place_params(model_state: Any, topology: Topology) -> Any:
    """Puts one copy of the weights on every instance (sharded over TENSOR
    inside it). Returns the same pytree with arrays over the full mesh."""
    mesh = topology.full_mesh()

    def place(path, leaf):
        sharding = NamedSharding(mesh, param_spec(path))
        if not sharding.is_fully_addressable:  # over several processes each one puts its own devices' shards,
            leaf = np.asarray(leaf)  # from its host copy (the same weights in every process)
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, model_state)


def _group_view(array: jax.Array, spec: P, mesh: Mesh) -> jax.Array:
    """The buffers of `array` that sit on `mesh`'s devices, seen as one array
    over `mesh` (no copy: the single-device buffers are reused). Over several
    processes only this process's devices have buffers here."""
    shard_by_device = {shard.device: shard.data for shard in array.addressable_shards}
    buffers = [shard_by_device[device] for device in mesh.devices.flat if device in shard_by_device]
    return jax.make_array_from_single_device_arrays(array.shape, NamedSharding(mesh, spec), buffers)


def group_params(placed: Any, topology: Topology, group: Sequence[int]) -> Any:
    """Weights placed by `place_params`, viewed over `group`'s mesh without copying."""
    mesh = topology.group_mesh(group)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _group_view(leaf, param_spec(path), mesh), placed)


def buffer_pointers(array: jax.Array) -> dict[jax.Device, int]:
    """Device -> address of the array's buffer there (to check views share memory)."""
    return {shard.device: shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards}
