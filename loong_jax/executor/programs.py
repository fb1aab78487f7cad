"""The programs the engine runs, one definition per kind, shared by the engine, the tests and the benchmarks.

Kinds (`ProgramKey.kind`): "prefill" (ring prefill of whole prompts), "prefill_context" (chunks that continue
earlier ones), "decode" (one multi-master step) and "migrate" (KV token slots from one instance to another).

Data flow:
  1. `prefill_program`, `context_prefill_program`, `decode_program` build the jitted program of one group
     mesh: the model's forward over the group (`sharding.*_forward`, the group pool donated so KV is written
     in place), then, given a `SamplingSignature`, the sampler fused into the same program
     (`sampling.sampler.sample_tokens`: int32 [rows, columns], replicated). With the signature None the
     program returns the float32 logits instead (what the sharding tests compare with reference models,
     and what the GPU benchmark times). `migration_program` moves KV between two members, pool donated.
  2. `abstract_inputs(context, key)`: the abstract, sharded arguments of a key's program (`ProgramKey.bucket`
     holds its static shapes, `program_cache.BUCKET_FIELDS`); nothing runs.
  3. `lowering(context)` is the `ProgramCache`'s compile function for an executor: `key ->
     program(key).lower(*abstract_inputs(key))`, bound to the executor's static `ProgramContext` (model
     structure, topology, placed weights, pool shape, attention implementation).
Calls: prefill `(params, pool, inputs[, sampling])`, context prefill `(params, pool, inputs, context[,
sampling])`, decode `(params, pool, inputs[, sampling])` -> `(tokens or logits, pool)`; migration
`(pool, send, receive) -> pool`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from loong_jax.executor.program_cache import ProgramKey
from loong_jax.models.kernels.dispatch import AUTO
from loong_jax.sampling.batch import SamplingSignature, abstract_sampling
from loong_jax.sampling.sampler import sample_tokens
from loong_jax.sharding.context_prefill import ContextInputs, context_prefill_forward
from loong_jax.sharding.decode_attention import PAGES_PER_CHUNK
from loong_jax.sharding.decode_program import DecodeInputs, decode_forward
from loong_jax.sharding.kv_pool import PoolShape
from loong_jax.sharding.migration import Moves, migrate_pages
from loong_jax.sharding.prefill_program import PrefillInputs, prefill_forward
from loong_jax.sharding.specs import BY_MEMBER_SPEC, POOL_SPEC, REPLICATED_SPEC
from loong_jax.sharding.topology import Topology, param_spec

# The engine's migration group is (source, destination): member 0 sends, member 1 receives.
SOURCE_TO_DESTINATION: Moves = ((0, 1),)


# -- one definition per kind ------------------------------------------------------------------------------------
def prefill_program(graphdef: nnx.GraphDef, mesh: Mesh, attention_impl: str = AUTO,
                    signature: SamplingSignature | None = None):
    """Ring prefill of packed prompts (`PrefillInputs`) on the group `mesh`."""

    def prefill(params, pool, inputs: PrefillInputs):
        return prefill_forward(graphdef, params, pool, inputs, mesh=mesh,
                               attention_impl=attention_impl)  # [requests, vocab], pool

    return _model_program(prefill, mesh, signature, logits_spec=REPLICATED_SPEC)


def context_prefill_program(graphdef: nnx.GraphDef, mesh: Mesh, attention_impl: str = AUTO,
                            signature: SamplingSignature | None = None, *, pages_per_visit: int | None = None):
    """Prefill of chunks that also attend to their prompts' earlier KV (`ContextInputs`). pages_per_visit:
    prefix pages per key tile of the reference attention (None: the engine's, about one KV tile)."""

    def context_prefill(params, pool, inputs: PrefillInputs, context: ContextInputs):
        return context_prefill_forward(graphdef, params, pool, inputs, context, mesh=mesh,
                                       pages_per_visit=pages_per_visit, attention_impl=attention_impl)

    return _model_program(context_prefill, mesh, signature, logits_spec=REPLICATED_SPEC)


def decode_program(graphdef: nnx.GraphDef, mesh: Mesh, attention_impl: str = AUTO,
                   signature: SamplingSignature | None = None, *, pages_per_chunk: int = PAGES_PER_CHUNK):
    """One decode step of the rows in `DecodeInputs`. pages_per_chunk: page entries a member attends at
    once (the engine's default bounds the gathered KV; tests make it small to cover several chunks)."""

    def decode(params, pool, inputs: DecodeInputs):
        return decode_forward(graphdef, params, pool, inputs, mesh=mesh, pages_per_chunk=pages_per_chunk,
                              attention_impl=attention_impl)  # [rows, vocab], pool

    return _model_program(decode, mesh, signature, logits_spec=BY_MEMBER_SPEC)


def migration_program(mesh: Mesh, moves: Moves = SOURCE_TO_DESTINATION, *, whole_pages: bool = False):
    """KV moved along `moves` (member pairs): `(pool, send, receive) -> pool`, send/receive [d, n] int32
    (BY_MEMBER_SPEC, -1 = padding). The engine moves token slots: a share appended to a partly filled page
    on the destination lands at an offset, so the move runs on the pool viewed with pages of one slot.
    whole_pages: the entries are pages instead (`sharding.migration.layout_migration`'s plans)."""

    def migrate(pool, send, receive):
        if whole_pages:
            return migrate_pages(pool, send, receive, mesh=mesh, moves=moves)
        members, layers, kv, pages, page_size, heads, head_dim = pool.shape
        slots_view = pool.reshape(members, layers, kv, pages * page_size, 1, heads, head_dim)
        return migrate_pages(slots_view, send, receive, mesh=mesh, moves=moves).reshape(pool.shape)

    return jax.jit(migrate, donate_argnames=("pool",), out_shardings=NamedSharding(mesh, POOL_SPEC))


def _model_program(forward: Callable, mesh: Mesh, signature: SamplingSignature | None, logits_spec):
    """`forward(params, pool, *inputs) -> (logits, pool)` jitted with the pool donated; given a signature,
    the sampler runs on the logits in the same program and takes the sampling inputs as the last argument
    (so one small int32 matrix, replicated, is all the host fetches)."""
    pool_out = NamedSharding(mesh, POOL_SPEC)
    if signature is None:
        return jax.jit(forward, donate_argnames=("pool",),
                       out_shardings=(NamedSharding(mesh, logits_spec), pool_out))
    signature = SamplingSignature(*signature)  # a plain tuple from a hand-made key reads by name too

    def forward_then_sample(params, pool, *inputs_then_sampling):
        *inputs, sampling = inputs_then_sampling
        logits, pool = forward(params, pool, *inputs)
        return sample_tokens(logits, sampling, signature), pool

    forward_then_sample.__name__ = forward.__name__  # compile logs and HLO modules name the kind
    return jax.jit(forward_then_sample, donate_argnames=("pool",),
                   out_shardings=(NamedSharding(mesh, REPLICATED_SPEC), pool_out))


# -- the programs of an executor, by key ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ProgramContext:
    """What every program of one executor shares, fixed at its construction."""

    graphdef: nnx.GraphDef  # the model's structure (`nnx.split(model)[0]`)
    topology: Topology
    placed_params: Any  # the weights as `topology.place_params` put them (only shapes and dtypes are read)
    pool_shape: PoolShape  # one instance's KV pool
    attention_impl: str  # settled for the platform (`models.kernels.dispatch.for_platform`)


def program_for(context: ProgramContext, key: ProgramKey):
    """The jitted program of `key` (nothing is traced until it is lowered or called)."""
    mesh = context.topology.group_mesh(key.group)
    builders = {"prefill": prefill_program, "prefill_context": context_prefill_program,
                "decode": decode_program}
    if key.kind == "migrate":
        return migration_program(mesh)
    if key.kind not in builders:
        raise ValueError(f"unknown program kind {key.kind!r}")
    return builders[key.kind](context.graphdef, mesh, context.attention_impl, key.bucket[-1])


def abstract_inputs(context: ProgramContext, key: ProgramKey) -> tuple:
    """The abstract, sharded arguments of `key`'s program, in call order."""
    mesh, members = context.topology.group_mesh(key.group), len(key.group)
    pool = jax.ShapeDtypeStruct(context.pool_shape.group_shape(members), np.dtype(context.pool_shape.dtype),
                                sharding=NamedSharding(mesh, POOL_SPEC))
    by_member, replicated = NamedSharding(mesh, BY_MEMBER_SPEC), NamedSharding(mesh, REPLICATED_SPEC)
    int32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
    if key.kind == "migrate":
        (slots,) = key.bucket
        slot_table = int32((members, slots), sharding=by_member)
        return pool, slot_table, slot_table
    params = abstract_group_params(context, key.group)
    if key.kind in ("prefill", "prefill_context"):
        rows_per_member, requests, signature = key.bucket[0], key.bucket[1], SamplingSignature(*key.bucket[-1])
        rows = int32((members * rows_per_member,), sharding=by_member)
        inputs = PrefillInputs(tokens=rows, positions=rows, segment_ids=rows, placement_member=rows,
                               placement_slot=rows, logits_indices=int32((requests,), sharding=replicated))
        sampling = abstract_sampling(requests, signature, replicated)
        if key.kind == "prefill":
            return params, pool, inputs, sampling
        max_pages = key.bucket[2]
        context_inputs = ContextInputs(page_tables=int32((members, requests, max_pages), sharding=by_member),
                                       kv_lens=int32((members, requests), sharding=by_member))
        return params, pool, inputs, context_inputs, sampling
    if key.kind == "decode":
        batch_local, member_pages, signature = key.bucket[0], key.bucket[1], SamplingSignature(*key.bucket[2])
        rows = int32((members * batch_local,), sharding=by_member)
        entries = int32((members, member_pages), sharding=by_member)
        inputs = DecodeInputs(tokens=rows, positions=rows, append_slots=rows, entry_rows=entries,
                              entry_pages=entries, entry_tokens=entries)
        return params, pool, inputs, abstract_sampling(members * batch_local, signature, by_member)
    raise ValueError(f"unknown program kind {key.kind!r}")


def abstract_group_params(context: ProgramContext, group: tuple[int, ...]) -> Any:
    """The weights as `topology.group_params` views them over `group`'s mesh, abstractly."""
    mesh = context.topology.group_mesh(group)

    def abstract(path, leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, param_spec(path)))

    return jax.tree_util.tree_map_with_path(abstract, context.placed_params)


def lower(context: ProgramContext, key: ProgramKey):
    """`jax.jit(program).lower(abstract inputs)` for one key (nothing runs)."""
    return program_for(context, key).lower(*abstract_inputs(context, key))


def lowering(context: ProgramContext) -> Callable[[ProgramKey], Any]:
    """The `ProgramCache`'s compile function for an executor's programs."""
    return functools.partial(lower, context)
