"""JaxExecutor: runs a scheduler plan on devices (the real twin of `simulator.SimExecutor`).

It holds the topology, one KV pool per instance, and the weights placed once on every instance. The engine
loop calls `submit(plan)` right after `state.on_dispatched(plan)` (so the allocator already holds the pages the
plan takes), then `wait_next()` for the units that finish first.

Data flow of one work unit:
  1. Host (`unit_inputs.UnitInputs`, numpy only): the unit and the allocator's page tables become its
     program's key and inputs, padded to power-of-two buckets: striped tokens and KV placement (prefill,
     with the earlier chunks' pages for a chunked prefill), rows per master with each member's ragged page
     entries (decode), token slots to move (migration), and the sampling parameters in the same row order.
  2. Device: ONE jitted program per unit (two when a chunked prefill rides in a decode step), forward and
     sampling fused (prefill, decode) or the slot move (migration), taken from the `ProgramCache` by
     (kind, group, bucket). The group's pool is assembled from the members' pools without a copy and
     donated, so KV is updated in place; the members get their buffers back (`split_group_pool`) at once.
     Dispatch is asynchronous: programs on disjoint groups run side by side, and a unit whose program is
     still compiling waits in the background while the others run.
  3. `wait_next()` returns the units that finished first, each with ONE small device->host transfer: the
     int32 matrix of sampled tokens and logprobs (`sampler.sample_logits`'s packed output).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections import Counter
from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from loong_jax.engine.state import EngineState
from loong_jax.models.kernels.dispatch import attention_impl_from_env, for_platform
from loong_jax.models.llama import LlamaForCausalLM
from loong_jax.engine.outputs import TokenLogprobs
from loong_jax.executor.program_cache import ProgramCache, ProgramKey
from loong_jax.sampling.sampler import apply_min_tokens, sample_logits
from loong_jax.sampling.batch import SamplingBatch, unpack_sampler_output
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, WorkUnit
from loong_jax.sharding.context_prefill import ContextInputs, context_prefill_forward
from loong_jax.sharding.decode_attention import MEMBER_SPEC, ROW_SPEC
from loong_jax.sharding.decode_program import DecodeInputs, decode_forward
from loong_jax.sharding.kv_pool import POOL_SPEC, PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.sharding.migration import migrate_pages
from loong_jax.sharding.prefill_program import PrefillBatch as PrefillInputs
from loong_jax.sharding.prefill_program import prefill_forward
from loong_jax.sharding.ring_prefill import ROWS_SPEC
from loong_jax.sharding.topology import Topology, group_params, place_params
from loong_jax.executor.unit_inputs import PLAIN_GREEDY, Buckets, GreedyBatch, ProgramCall, RequestSource, UnitInputs

RequestId = Hashable
__all__ = ["Buckets", "JaxExecutor", "UnitResult", "PLAIN_GREEDY"]


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What a finished unit produced: one token (and logprobs when asked) per request that sampled."""

    unit: WorkUnit
    new_tokens: dict[RequestId, int]
    logprobs: dict[RequestId, TokenLogprobs | None]
    finish_time: float


@dataclasses.dataclass
class _Launch:
    """A unit and its programs (two when a chunked prefill rides in a decode step, else one)."""

    unit: WorkUnit
    programs: list[ProgramCall]


@dataclasses.dataclass
class _Running:
    launch: _Launch
    outputs: list[jax.Array]  # per program: the packed sampler output (or the migrated pool)
    fetch: concurrent.futures.Future | None = None


def sample_tokens(logits: jax.Array, batch: SamplingBatch | GreedyBatch, signature: tuple) -> jax.Array:
    """The sampler of a program: int32 [rows, 1 (+ logprobs columns)] (see `sampler.sample_logits`)."""
    if signature[4]:  # plain greedy rows: exactly sample_logits' greedy path (argmax after min_tokens)
        return jnp.argmax(apply_min_tokens(logits.astype(jnp.float32), batch), axis=-1).astype(jnp.int32)[:, None]
    return sample_logits(logits, batch, signature[3])


def abstract_sampling(rows: int, signature: tuple, sharding) -> SamplingBatch | GreedyBatch:
    stops, prompt_width, output_width = signature[:3]
    s = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
    if signature[4]:
        return GreedyBatch(step=s((rows,), np.int32), min_tokens=s((rows,), np.int32),
                           stop_token_ids=s((rows, stops), np.int32))
    return SamplingBatch(
        temperature=s((rows,), np.float32), top_p=s((rows,), np.float32), top_k=s((rows,), np.int32),
        min_p=s((rows,), np.float32), repetition_penalty=s((rows,), np.float32),
        presence_penalty=s((rows,), np.float32), frequency_penalty=s((rows,), np.float32),
        seed_words=s((rows, 2), np.uint32), sample_index=s((rows,), np.int32), step=s((rows,), np.int32),
        min_tokens=s((rows,), np.int32), stop_token_ids=s((rows, stops), np.int32),
        prompt_token_ids=s((rows, prompt_width), np.int32), output_token_ids=s((rows, output_width), np.int32))


class JaxExecutor:
    def __init__(self, model: LlamaForCausalLM, topology: Topology, pages_per_instance: int, page_size: int,
                 *, eos_token_ids: Sequence[int] = (), buckets: Buckets = Buckets(),
                 program_cache: ProgramCache | None = None, clock=time.monotonic, in_dispatch_order: bool = False,
                 attention_impl: str | None = None):
        """in_dispatch_order: `wait_next` returns units in the order they were dispatched instead of as they
        finish (with a logical clock this makes a whole run reproducible, scheduling decisions included).
        attention_impl: "auto" | "interpret" | "reference" | "kernel" (`models.kernels.dispatch`); None reads
        `LOONG_JAX_ATTENTION` here, once; "auto" is settled here for the platform of the devices."""
        self.config = model.config
        self.topology = topology
        self.buckets = buckets
        self.eos_token_ids = tuple(eos_token_ids)
        self.page_size = page_size
        self.clock = clock
        self.in_dispatch_order = in_dispatch_order
        self.attention_impl = for_platform(attention_impl_from_env() if attention_impl is None else attention_impl,
                                           topology.devices[0].platform)
        graphdef, weights = nnx.split(model)
        self.graphdef = graphdef
        self.params = place_params(weights, topology)  # one copy per instance, TENSOR-sharded inside
        self.pool_shape = PoolShape.for_model(self.config, pages_per_instance, page_size)
        self.pools = [create_pool(self.pool_shape, topology, i) for i in range(topology.num_instances)]
        self.programs = program_cache or ProgramCache(self._lower)
        self._group_params: dict[tuple[int, ...], Any] = {}
        self._running: list[_Running] = []
        self._compiling: list[tuple[_Launch, list[concurrent.futures.Future]]] = []
        self._fetchers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loong-jax-fetch")
        self.state: EngineState | None = None
        self.source: RequestSource | None = None
        self.unit_inputs: UnitInputs | None = None
        self.counters = Counter()

    def bind(self, state: EngineState, source: RequestSource) -> None:
        """Attach the engine state (page tables) and the request source (tokens, sampling) of an engine."""
        if state.num_instances != self.topology.num_instances or state.page_size != self.page_size:
            raise ValueError("engine state and executor disagree on instances or page size")
        if self._running or self._compiling:
            raise RuntimeError("cannot rebind an executor with units in flight")
        self.state, self.source = state, source
        self.unit_inputs = UnitInputs(state, source, self.buckets, self.page_size, self.config.vocab_size,
                                      self.eos_token_ids)

    @property
    def num_instances(self) -> int:
        return self.topology.num_instances

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._compiling)

    # -- the executor interface -----------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> None:
        """Dispatch every unit of an already dispatched plan (`state.on_dispatched(plan)` came first)."""
        for unit in plan.work_units():
            launch = self._prepare(unit)
            if all(self.programs.is_ready(part.key) for part in launch.programs):
                self._dispatch(launch)
            else:  # compile in the background; other groups keep running meanwhile
                futures = [self.programs.request(part.key) for part in launch.programs]
                self._compiling.append((launch, futures))

    def wait_next(self) -> list[UnitResult]:
        """Results of the unit(s) that finish first; [] when nothing is in flight."""
        while self._running or self._compiling:
            self._dispatch_compiled()
            if self.in_dispatch_order:
                if self._compiling:
                    concurrent.futures.wait([f for _, futures in self._compiling for f in futures])
                    continue
                return [self._finish(self._running[0])]
            finished = [run for run in self._running if run.fetch is not None and run.fetch.done()]
            if finished:
                return [self._finish(run) for run in finished]
            if len(self._running) == 1 and not self._compiling:
                return [self._finish(self._running[0])]  # one unit: block here, no thread hop
            for run in self._running:
                if run.fetch is None:  # block in a helper thread, so that whichever finishes first wakes us
                    run.fetch = self._fetchers.submit(self._fetch, run)
            waiting = [run.fetch for run in self._running] + [f for _, futures in self._compiling for f in futures]
            concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
        return []

    def close(self) -> None:
        self._fetchers.shutdown(wait=True)
        self.programs.close()

    # -- programs ----------------------------------------------------------------------------------------------
    def ready_programs(self) -> frozenset:
        """Scheduler keys (kind, group, token/batch bucket) that a compiled program serves."""
        ready = set()
        for key in self.programs.ready_keys():
            kind = "prefill" if key.kind == "prefill_context" else key.kind
            if kind == "prefill":
                capacity = key.bucket[0] * len(key.group) // 2  # striping leaves some rows empty
            elif key.kind == "decode":
                capacity = key.bucket[0]
            else:
                capacity = key.bucket[0]
            bucket = 16
            while bucket <= max(capacity, 16):
                ready.add((kind, key.group, bucket))
                bucket *= 2
        return frozenset(ready)

    def common_keys(self, prefill_groups: Sequence[tuple[int, ...]], decode_groups: Sequence[tuple[int, ...]]):
        """The smallest-bucket, plain-sampling programs of these groups (what start-up compiles)."""
        b = self.buckets
        keys = [ProgramKey("prefill", tuple(g), (b.round(0, b.prefill_rows), b.round(0, b.prefill_requests),
                                                 PLAIN_GREEDY)) for g in prefill_groups]
        keys += [ProgramKey("decode", tuple(g), (b.round(0, b.decode_batch),
                                                 b.round(0, b.decode_batch * b.decode_pages), PLAIN_GREEDY))
                 for g in decode_groups]
        return keys

    def _params_for(self, group: tuple[int, ...]):
        params = self._group_params.get(group)
        if params is None:  # a zero-copy view of the placed weights over this group's mesh
            params = group_params(self.params, self.topology, group)
            self._group_params[group] = params
        return params

    def _lower(self, key: ProgramKey):
        """`jax.jit(program).lower(abstract inputs)` for one key (nothing runs)."""
        group, mesh = key.group, self.topology.group_mesh(key.group)
        members = len(group)
        pool = jax.ShapeDtypeStruct(self.pool_shape.group_shape(members), np.dtype(self.pool_shape.dtype),
                                    sharding=NamedSharding(mesh, POOL_SPEC))
        if key.kind == "migrate":
            (slots,) = key.bucket
            tables = jax.ShapeDtypeStruct((members, slots), np.int32, sharding=NamedSharding(mesh, MEMBER_SPEC))
            return jax.jit(functools.partial(self._migrate_program, mesh=mesh), donate_argnames=("pool",),
                           out_shardings=NamedSharding(mesh, POOL_SPEC)).lower(pool, tables, tables)
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              self._params_for(group))
        replicated, out = NamedSharding(mesh, P()), (NamedSharding(mesh, P()), NamedSharding(mesh, POOL_SPEC))
        if key.kind in ("prefill", "prefill_context"):
            rows_per_member, requests, signature = key.bucket[0], key.bucket[1], key.bucket[-1]
            rows = jax.ShapeDtypeStruct((members * rows_per_member,), np.int32,
                                        sharding=NamedSharding(mesh, ROWS_SPEC))
            inputs = PrefillInputs(tokens=rows, positions=rows, segment_ids=rows, placement_member=rows,
                                   placement_slot=rows,
                                   logits_indices=jax.ShapeDtypeStruct((requests,), np.int32, sharding=replicated))
            sampling = abstract_sampling(requests, signature, replicated)
            program = functools.partial(self._prefill_program, mesh=mesh, signature=signature)
            if key.kind == "prefill_context":
                max_pages, per_member = key.bucket[2], NamedSharding(mesh, MEMBER_SPEC)
                context = ContextInputs(
                    page_tables=jax.ShapeDtypeStruct((members, requests, max_pages), np.int32, sharding=per_member),
                    kv_lens=jax.ShapeDtypeStruct((members, requests), np.int32, sharding=per_member))
                program = functools.partial(self._context_prefill_program, mesh=mesh, signature=signature)
                return jax.jit(program, donate_argnames=("pool",), out_shardings=out).lower(
                    params, pool, inputs, context, sampling)
        elif key.kind == "decode":
            batch_local, member_pages, signature = key.bucket
            batch_rows = members * batch_local
            row = NamedSharding(mesh, ROW_SPEC)
            per_member = NamedSharding(mesh, MEMBER_SPEC)
            inputs = DecodeInputs(
                tokens=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                positions=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                append_slots=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                entry_rows=jax.ShapeDtypeStruct((members, member_pages), np.int32, sharding=per_member),
                entry_pages=jax.ShapeDtypeStruct((members, member_pages), np.int32, sharding=per_member),
                entry_tokens=jax.ShapeDtypeStruct((members, member_pages), np.int32, sharding=per_member))
            sampling = abstract_sampling(batch_rows, signature, row)
            program = functools.partial(self._decode_program, mesh=mesh, signature=signature)
        else:
            raise ValueError(f"unknown program kind {key.kind!r}")
        return jax.jit(program, donate_argnames=("pool",), out_shardings=out).lower(params, pool, inputs, sampling)

    def _prefill_program(self, params, pool, inputs, sampling, *, mesh, signature):
        logits, pool = prefill_forward(self.graphdef, params, pool, inputs, mesh=mesh,
                                       attention_impl=self.attention_impl)  # [requests, vocab]
        return sample_tokens(logits, sampling, signature), pool

    def _context_prefill_program(self, params, pool, inputs, context, sampling, *, mesh, signature):
        logits, pool = context_prefill_forward(self.graphdef, params, pool, inputs, context, mesh=mesh,
                                               attention_impl=self.attention_impl)
        return sample_tokens(logits, sampling, signature), pool

    def _decode_program(self, params, pool, inputs, sampling, *, mesh, signature):
        logits, pool = decode_forward(self.graphdef, params, pool, inputs, mesh=mesh,
                                      attention_impl=self.attention_impl)  # [rows, vocab]
        return sample_tokens(logits, sampling, signature), pool

    @staticmethod
    def _migrate_program(pool, send_slots, receive_slots, *, mesh):
        # Token slots, not pages: a share appended to a partly filled page on the destination lands at an
        # offset, so the move is expressed on the pool viewed with pages of one slot.
        members, layers, kv, pages, page_size, heads, head_dim = pool.shape
        slots_view = pool.reshape(members, layers, kv, pages * page_size, 1, heads, head_dim)
        moved = migrate_pages(slots_view, send_slots, receive_slots, mesh=mesh, moves=((0, 1),))
        return moved.reshape(pool.shape)

    # -- host side: plan units -> program inputs --------------------------------------------------------------
    def _prepare(self, unit: WorkUnit) -> _Launch:
        inputs = self.unit_inputs
        if isinstance(unit, PrefillBatch):
            calls = [inputs.prefill(unit)]
        elif isinstance(unit, DecodeBatch):
            calls = [] if unit.fused_prefill is None else [inputs.prefill(unit.fused_prefill)]
            if unit.request_ids:
                calls.append(inputs.decode(unit))
        elif isinstance(unit, MigrationBatch):
            calls = [inputs.migration(unit, self.state.migration_tickets(unit))]
        else:
            raise TypeError(f"unknown work unit {type(unit).__name__}")
        for call in calls:
            if call.next_key is not None and not self.programs.is_ready(call.next_key):
                self.programs.request(call.next_key)  # requests grow: have their next bucket compiled in time
        return _Launch(unit, calls)

    # -- device side ----------------------------------------------------------------------------------------
    def _dispatch(self, launch: _Launch) -> None:
        outputs = []
        for part in launch.programs:
            program, group = self.programs.get(part.key), part.key.group
            pool = assemble_group_pool([self.pools[i] for i in group], self.topology.group_mesh(group))
            if part.key.kind == "migrate":
                pool = program(pool, *part.inputs)
                outputs.append(pool)
            else:
                output, pool = program(self._params_for(group), pool, *part.inputs)
                output.copy_to_host_async()  # the program's one device->host transfer starts when it can
                outputs.append(output)
            for instance, member_pool in zip(group, split_group_pool(pool, self.topology, group)):
                self.pools[instance] = member_pool
            self.counters[part.key.kind] += 1
        self._running.append(_Running(launch, outputs))

    def _dispatch_compiled(self) -> None:
        still_compiling = []
        for launch, futures in self._compiling:
            if all(future.done() for future in futures):
                for future in futures:
                    future.result()  # a failed compilation raises here
                self._dispatch(launch)
            else:
                still_compiling.append((launch, futures))
        self._compiling = still_compiling

    @staticmethod
    def _fetch(run: _Running) -> list:
        """Host copies of the sampled tokens (a migration only waits for its pool)."""
        return [jax.block_until_ready(output) if part.key.kind == "migrate" else np.asarray(output)
                for part, output in zip(run.launch.programs, run.outputs)]

    def _finish(self, run: _Running) -> UnitResult:
        self._running.remove(run)
        fetched = run.fetch.result() if run.fetch is not None else self._fetch(run)
        tokens, logprobs = {}, {}
        for part, packed in zip(run.launch.programs, fetched):
            if part.key.kind == "migrate":
                continue
            sampled = unpack_sampler_output(packed, part.sampling_rows)
            token_ids = sampled.token_ids.tolist()  # Python ints, converted in one call
            for request_id, row in part.sampled:
                tokens[request_id] = token_ids[row]
                logprobs[request_id] = sampled.logprobs[row]
        return UnitResult(run.launch.unit, tokens, logprobs, self.clock())
