"""Topology, parameter placement and KV pool assembly: shapes, shardings, and
that group views reuse the per-device buffers (no copies)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from loong_jax.models.config import ModelConfig
from loong_jax.models.llama import init_model
from loong_jax.sharding.kv_pool import (
    PoolShape, assemble_group_pool, create_pool, read_slots, split_group_pool)
from loong_jax.sharding.specs import POOL_SPEC
from loong_jax.sharding.topology import (
    SEQ, TENSOR, Topology, buffer_pointers, group_params, param_spec, place_params)

CONFIG = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True)


def test_instances_and_group_meshes():
    topology = Topology(jax.devices(), tp=2)
    assert topology.num_instances == 4
    assert topology.instance_devices(1) == tuple(jax.devices()[2:4])
    mesh = topology.group_mesh((3, 1))
    assert mesh.axis_names == (SEQ, TENSOR)
    assert mesh.devices.shape == (2, 2)
    assert list(mesh.devices[0]) == list(jax.devices()[6:8])
    assert list(mesh.devices[1]) == list(jax.devices()[2:4])
    assert topology.group_mesh([3, 1]) is mesh  # cached per group
    assert topology.instance_mesh(2).devices.shape == (1, 2)
    with pytest.raises(ValueError):
        topology.group_mesh((1, 1))
    with pytest.raises(ValueError):
        topology.instance_devices(4)
    with pytest.raises(ValueError):
        Topology(jax.devices(), tp=3)


def test_param_specs_follow_logical_axes():
    q_kernel = ("layers", 0, "self_attn", "q_proj", "kernel")
    assert param_spec(tuple(jax.tree_util.DictKey(n) for n in q_kernel)) == P(None, TENSOR)
    down = ("layers", 1, "mlp", "down_proj", "kernel")
    assert param_spec(tuple(jax.tree_util.DictKey(n) for n in down)) == P(TENSOR, None)
    assert param_spec((jax.tree_util.DictKey("inv_freq"),)) == P()
    # stacked layer weights (`ModelConfig.scan_layers`): whole on their leading layers axis
    stacked_down = ("layers", "mlp", "down_proj", "kernel")
    assert param_spec(tuple(jax.tree_util.DictKey(n) for n in stacked_down)) == P(None, TENSOR, None)
    stacked_norm = ("layers", "input_layernorm", "scale")
    assert param_spec(tuple(jax.tree_util.DictKey(n) for n in stacked_norm)) == P(None, None)


@pytest.mark.parametrize("tp", [1, 2])
def test_group_params_reuse_placed_buffers(tp):
    topology = Topology(jax.devices(), tp=tp)
    _, state = nnx.split(init_model(CONFIG, seed=1))
    placed = place_params(state, topology)
    group = (3, 0, 2) if tp == 1 else (2, 1)
    view = group_params(placed, topology, group)
    mesh = topology.group_mesh(group)
    for (path, original), placed_leaf, view_leaf in zip(
            jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(placed),
            jax.tree_util.tree_leaves(view)):
        assert view_leaf.sharding.mesh == mesh
        assert view_leaf.sharding.spec == param_spec(path)
        np.testing.assert_array_equal(np.asarray(view_leaf), np.asarray(original))
        view_pointers = buffer_pointers(view_leaf)
        placed_pointers = buffer_pointers(placed_leaf)
        assert set(view_pointers) == set(mesh.devices.flat)
        assert all(view_pointers[dev] == placed_pointers[dev] for dev in view_pointers)
    # tensor-sharded weights really are split inside an instance
    q_kernel = view["layers"]["self_attn"]["q_proj"]["kernel"][...]  # [layers, hidden, q_heads * head_dim]
    assert q_kernel.addressable_shards[0].data.shape == (CONFIG.num_layers, 64, 64 // tp)


def test_pool_assemble_split_is_zero_copy_and_donation_is_in_place():
    topology = Topology(jax.devices(), tp=2)
    shape = PoolShape.for_model(CONFIG, pages=3, page_size=4)
    group = (2, 0, 3)
    pools = [create_pool(shape, topology, i, fill=float(i)) for i in group]
    assert pools[0].shape == (1, 2, 2, 3, 4, 2, 16)
    assert pools[0].sharding.spec == POOL_SPEC
    before = [buffer_pointers(p) for p in pools]
    mesh = topology.group_mesh(group)
    group_pool = assemble_group_pool(pools, mesh)
    assert group_pool.shape == (3, 2, 2, 3, 4, 2, 16)
    assert group_pool.addressable_shards[0].data.shape == (1, 2, 2, 3, 4, 1, 16)
    group_pointers = buffer_pointers(group_pool)
    assert all(group_pointers[dev] == ptr for ptrs in before for dev, ptr in ptrs.items())

    @jax.jit
    def bump(pool):
        return pool.at[:, 1, 0, 2, 3].add(10.0)

    bump_donated = jax.jit(bump, donate_argnames="pool")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would fail here
        updated = bump_donated(group_pool)
    assert group_pool.is_deleted()
    assert buffer_pointers(updated) == group_pointers  # updated in place
    back = split_group_pool(updated, topology, group)
    for member, (instance, pool) in enumerate(zip(group, back)):
        assert pool.sharding.mesh == topology.instance_mesh(instance)
        assert buffer_pointers(pool) == before[member]
        values = read_slots(pool, [2 * 4 + 3, 0])  # [layers, 2, 2 slots, kv_heads, head_dim]
        np.testing.assert_array_equal(values[1, 0, 0], instance + 10.0)
        np.testing.assert_array_equal(values[0, 0, 0], instance)
        np.testing.assert_array_equal(values[:, :, 1], instance)


def test_pool_rejects_indivisible_heads():
    topology = Topology(jax.devices(), tp=2)
    with pytest.raises(ValueError):
        create_pool(PoolShape(1, 2, 4, 1, 8), topology, 0)
    with pytest.raises(ValueError):
        assemble_group_pool([jnp.zeros((1, 1, 2, 2, 4, 2, 8))], topology.group_mesh((0, 1)))
