"""JaxExecutor: runs a scheduler plan on devices (the real twin of `simulator.SimExecutor`).

It holds the topology, one KV pool per instance, and the weights placed once on every instance. The engine
loop calls `submit(plan)` right after `state.on_dispatched(plan)` (so the allocator already holds the pages the
plan takes), then `wait_next()` for the units that finish first.

Data flow of one work unit:
  1. Host (numpy only): the unit and the allocator's page tables become the arrays of its
     program, padded to power-of-two buckets:
       - PrefillBatch: the prompts (or prompt chunks) striped over the group, and a placement per token:
         the member keeping it (from the plan's segments) and its flat slot (from the allocator's pages);
         a chunk that continues a prompt also gets the pages holding the prompt's earlier KV
         (`context_prefill`: chunked prefill);
       - DecodeBatch: one row per request in its master's block, the slot of the new token on the master,
         and every member's pages and token counts of the request (`layout_decode_batch`);
       - MigrationBatch: source and destination slots of every moved token (from the allocator's tickets).
     Each request's sampling parameters become a `SamplingBatch` in the same row order.
  2. Device: ONE jitted program per unit, forward and sampling fused (prefill / decode) or the page move
     (migration) — two when a chunked prefill rides in a decode step, taken from the `ProgramCache` by (kind, group, bucket). The group's pool is assembled from
     the members' pools without a copy and donated, so KV is updated in place; the members get their
     buffers back (`split_group_pool`) at once. Dispatch is asynchronous: programs on disjoint groups run
     side by side, and a unit whose program is still compiling waits in the background while the others
     run.
  3. `wait_next()` returns the units that finished first, each with ONE small device->host transfer: the
     int32 matrix of sampled tokens and logprobs (`sampler.sample_logits`'s packed output).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections import Counter
from typing import Any, Hashable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from loong_jax.engine_state import EngineState
from loong_jax.models.llama import LlamaForCausalLM
from loong_jax.outputs import TokenLogprobs
from loong_jax.program_cache import ProgramCache, ProgramKey
from loong_jax.sampler import apply_min_tokens, sample_logits
from loong_jax.sampling_batch import (SamplingBatch, SamplingRow, num_logprobs_columns, pack_sampling_batch,
                                      unpack_sampler_output)
from loong_jax.sampling_params import SamplingParams
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, WorkUnit
from loong_jax.sharding.context_prefill import ContextInputs, chunk_layout, context_prefill_forward, layout_context
from loong_jax.sharding.decode_attention import MEMBER_SPEC, ROW_SPEC
from loong_jax.sharding.decode_program import DecodeInputs, DecodeRow, decode_forward, layout_decode_batch
from loong_jax.sharding.kv_pool import POOL_SPEC, PoolShape, assemble_group_pool, create_pool, split_group_pool
from loong_jax.sharding.migration import migrate_pages
from loong_jax.sharding.prefill_program import PrefillBatch as PrefillInputs
from loong_jax.sharding.prefill_program import prefill_forward
from loong_jax.sharding.ring_prefill import ROWS_SPEC
from loong_jax.sharding.stripe_layout import Placement, rows_needed, striped_members
from loong_jax.sharding.topology import Topology, group_params, place_params

RequestId = Hashable
# Rows that pad a sampling batch: greedy, never read back.
PADDING_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, seed=0)
PADDING_ROW = SamplingRow(PADDING_PARAMS, (), ())


class RequestSource(Protocol):
    """What the executor needs to know about a request beyond the allocator (the engine implements it)."""

    def token_ids(self, request_id: RequestId) -> Sequence[int]:
        """Prompt followed by every token generated so far."""

    def sampling_row(self, request_id: RequestId) -> SamplingRow:
        """The request's sampling parameters and histories for its next token."""


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Smallest shape of each program dimension; larger needs round up to the next power of two."""

    prefill_rows: int = 16  # token rows per group member
    prefill_requests: int = 8  # prompts (sampled rows) per prefill batch
    decode_batch: int = 8  # requests per master (rows per member)
    decode_pages: int = 8  # pages of one request on one member
    migration_slots: int = 64  # token slots moved by one migration unit

    def round(self, need: int, minimum: int) -> int:
        return 1 << (max(need, minimum, 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What a finished unit produced: one token (and logprobs when asked) per request that sampled."""

    unit: WorkUnit
    new_tokens: dict[RequestId, int]
    logprobs: dict[RequestId, TokenLogprobs | None]
    finish_time: float


@dataclasses.dataclass
class _Program:
    """One program of a unit, ready to run: its key and host inputs (built at submit time)."""

    key: ProgramKey
    inputs: tuple  # positional inputs after (params, pool), numpy pytrees
    sampled: list[tuple[RequestId, int]]  # (request, row of the sampler output) of requests taking a token
    sampling_rows: list[SamplingRow]  # one per sampler output row, padding included


@dataclasses.dataclass
class _Launch:
    """A unit and its programs (two when a chunked prefill rides in a decode step, else one)."""

    unit: WorkUnit
    programs: list[_Program]


@dataclasses.dataclass
class _Running:
    launch: _Launch
    outputs: list[jax.Array]  # per program: the packed sampler output (or the migrated pool)
    fetch: concurrent.futures.Future | None = None


def sampling_signature(rows: Sequence[SamplingRow], batch: SamplingBatch) -> tuple:
    """The static part of a sampling batch: history widths, logprobs columns, and whether every row is
    plain greedy (then the program's sampler is an argmax and skips compiling the random path)."""
    greedy = all(row.params.temperature == 0.0 and not row.params.uses_penalties and row.params.logprobs is None
                 for row in rows)
    return (batch.stop_token_ids.shape[1], batch.prompt_token_ids.shape[1], batch.output_token_ids.shape[1],
            num_logprobs_columns(rows), greedy)


PLAIN_GREEDY = (1, 1, 1, None, True)  # greedy, no penalties, no logprobs: what start-up compiles


def sample_tokens(logits: jax.Array, batch: SamplingBatch, signature: tuple) -> jax.Array:
    """The sampler of a program: int32 [rows, 1 (+ logprobs columns)] (see `sampler.sample_logits`)."""
    if signature[4]:  # plain greedy rows: exactly sample_logits' greedy path (argmax after min_tokens)
        return jnp.argmax(apply_min_tokens(logits.astype(jnp.float32), batch), axis=-1).astype(jnp.int32)[:, None]
    return sample_logits(logits, batch, signature[3])


def abstract_sampling(rows: int, signature: tuple, sharding) -> SamplingBatch:
    stops, prompt_width, output_width = signature[:3]
    s = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
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
                 program_cache: ProgramCache | None = None, clock=time.monotonic, in_dispatch_order: bool = False):
        """in_dispatch_order: `wait_next` returns units in the order they were dispatched instead of as they
        finish (with a logical clock this makes a whole run reproducible, scheduling decisions included)."""
        self.config = model.config
        self.topology = topology
        self.buckets = buckets
        self.eos_token_ids = tuple(eos_token_ids)
        self.page_size = page_size
        self.clock = clock
        self.in_dispatch_order = in_dispatch_order
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
        self.counters = Counter()

    def bind(self, state: EngineState, source: RequestSource) -> None:
        """Attach the engine state (page tables) and the request source (tokens, sampling) of an engine."""
        if state.num_instances != self.topology.num_instances or state.page_size != self.page_size:
            raise ValueError("engine state and executor disagree on instances or page size")
        if self._running or self._compiling:
            raise RuntimeError("cannot rebind an executor with units in flight")
        self.state, self.source = state, source

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
        keys += [ProgramKey("decode", tuple(g), (b.round(0, b.decode_batch), b.round(0, b.decode_pages),
                                                 PLAIN_GREEDY)) for g in decode_groups]
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
            batch_local, max_pages, signature = key.bucket
            batch_rows = members * batch_local
            row = NamedSharding(mesh, ROW_SPEC)
            per_member = NamedSharding(mesh, MEMBER_SPEC)
            inputs = DecodeInputs(
                tokens=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                positions=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                append_slots=jax.ShapeDtypeStruct((batch_rows,), np.int32, sharding=row),
                page_tables=jax.ShapeDtypeStruct((members, batch_rows, max_pages), np.int32, sharding=per_member),
                kv_lens=jax.ShapeDtypeStruct((members, batch_rows), np.int32, sharding=per_member))
            sampling = abstract_sampling(batch_rows, signature, row)
            program = functools.partial(self._decode_program, mesh=mesh, signature=signature)
        else:
            raise ValueError(f"unknown program kind {key.kind!r}")
        return jax.jit(program, donate_argnames=("pool",), out_shardings=out).lower(params, pool, inputs, sampling)

    def _prefill_program(self, params, pool, inputs, sampling, *, mesh, signature):
        logits, pool = prefill_forward(self.graphdef, params, pool, inputs, mesh=mesh)  # [requests, vocab]
        return sample_tokens(logits, sampling, signature), pool

    def _context_prefill_program(self, params, pool, inputs, context, sampling, *, mesh, signature):
        logits, pool = context_prefill_forward(self.graphdef, params, pool, inputs, context, mesh=mesh)
        return sample_tokens(logits, sampling, signature), pool

    def _decode_program(self, params, pool, inputs, sampling, *, mesh, signature):
        logits, pool = decode_forward(self.graphdef, params, pool, inputs, mesh=mesh)  # [rows, vocab]
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
        if isinstance(unit, PrefillBatch):
            return _Launch(unit, [self._prepare_prefill(unit)])
        if isinstance(unit, DecodeBatch):
            parts = [] if unit.fused_prefill is None else [self._prepare_prefill(unit.fused_prefill)]
            if unit.request_ids:
                parts.append(self._prepare_decode(unit))
            return _Launch(unit, parts)
        if isinstance(unit, MigrationBatch):
            return _Launch(unit, [self._prepare_migration(unit)])
        raise TypeError(f"unknown work unit {type(unit).__name__}")

    def _slots(self, request_id: RequestId, instance: int, first: int, count: int) -> np.ndarray:
        """[count] flat slots of the request's tokens first..first+count-1 on `instance` (dense per share)."""
        pages = np.asarray(self.state.allocator.page_table(request_id, instance), dtype=np.int64)
        index = first + np.arange(count)
        return (pages[index // self.page_size] * self.page_size + index % self.page_size).astype(np.int32)

    def _prepare_prefill(self, batch: PrefillBatch) -> _Program:
        """A ring prefill of the batch's chunks; chunks that continue a prompt (start > 0) also attend to
        the KV their earlier chunks left in the group (`context_prefill`)."""
        allocator, group = self.state.allocator, batch.group
        member_of = {instance: m for m, instance in enumerate(group)}
        tokens, keep_member, keep_slot, prefix_pages, prefix_lens, rows = [], [], [], [], [], []
        sampled = []
        for index, (request_id, (start, length), segments) in enumerate(
                zip(batch.request_ids, batch.chunks, batch.placement)):
            request_tokens = self.source.token_ids(request_id)
            if start + length > len(request_tokens):
                raise ValueError(f"prefill of {request_id!r} covers tokens {start}..{start + length - 1}, "
                                 f"request has {len(request_tokens)}")
            tokens.append(np.asarray(request_tokens[start:start + length], np.int32))
            # The chunk's tokens kept on an instance follow whatever the request held there before.
            placed_here = Counter()
            for instance, n_tokens in segments:
                placed_here[instance] += n_tokens
            held = allocator.kv_layout(request_id)  # this chunk's tokens included
            held_before = {i: n - placed_here[i] for i, n in held.items() if n > placed_here[i]}
            if set(held_before) - set(member_of) or sum(held_before.values()) != start:
                raise ValueError(f"prefill of {request_id!r} at {start}: earlier KV {held_before} is not in {group}")
            prefix_pages.append({member_of[i]: allocator.page_table(request_id, i) for i in held_before})
            prefix_lens.append({member_of[i]: n for i, n in held_before.items()})
            next_index = {i: held_before.get(i, 0) for i in placed_here}
            for instance, n_tokens in segments:
                keep_member.append(np.full(n_tokens, member_of[instance], np.int32))
                keep_slot.append(self._slots(request_id, instance, next_index[instance], n_tokens))
                next_index[instance] += n_tokens
            if start + length == len(request_tokens):  # the chunk ends the prompt: it samples a token
                rows.append(self.source.sampling_row(request_id))
                sampled.append((request_id, index))
            else:
                rows.append(PADDING_ROW)
        b, members, lengths = self.buckets, len(group), [length for _, length in batch.chunks]
        rows_per_member = b.round(rows_needed(striped_members(lengths, members), members), b.prefill_rows)
        layout = chunk_layout(batch.chunks, members, rows_per_member)
        member_rows, slot_rows = Placement(np.concatenate(keep_member), np.concatenate(keep_slot)).rows(layout)
        requests = b.round(len(lengths), b.prefill_requests)
        last_rows = layout.last_token_rows()
        logits_indices = np.concatenate([last_rows, np.full(requests - len(last_rows), last_rows[0])])
        inputs = PrefillInputs(
            tokens=layout.to_rows(np.concatenate(tokens), fill=0), positions=layout.positions,
            segment_ids=layout.segment_ids, placement_member=member_rows.astype(np.int32),
            placement_slot=slot_rows.astype(np.int32), logits_indices=logits_indices.astype(np.int32))
        sampling, signature = self._sampling(rows, requests)
        if all(start == 0 for start, _ in batch.chunks):
            key = ProgramKey("prefill", group, (rows_per_member, requests, signature))
            return _Program(key, (inputs, sampling), sampled, rows)
        most_pages = max((len(p) for pages in prefix_pages for p in pages.values()), default=1)
        max_pages = b.round(most_pages, b.decode_pages)
        tables = layout_context([start for start, _ in batch.chunks], prefix_pages, prefix_lens, members,
                                max_pages, requests=requests, page_size=self.page_size)
        context = ContextInputs(page_tables=tables.page_tables, kv_lens=tables.kv_lens)
        key = ProgramKey("prefill_context", group, (rows_per_member, requests, max_pages, signature))
        return _Program(key, (inputs, context, sampling), sampled, rows)

    def _prepare_decode(self, batch: DecodeBatch) -> _Program:
        allocator, group = self.state.allocator, batch.group
        member_of = {instance: m for m, instance in enumerate(group)}
        rows = []
        for request_id, master in zip(batch.request_ids, batch.masters):
            request = self.state.requests[request_id]  # decoding: its newest token is the last generated
            held = allocator.kv_layout(request_id)  # instance -> tokens, this step's append included
            append_slot = int(self._slots(request_id, master, held[master] - 1, 1)[0])
            rows.append(DecodeRow(
                token=int(request.generated[-1]), position=request.context_len - 1, master=member_of[master],
                append_slot=append_slot,
                pages={member_of[i]: allocator.page_table(request_id, i) for i in held},
                kv_lens={member_of[i]: n for i, n in held.items()}))
        b, members = self.buckets, len(group)
        busiest_master = max(Counter(row.master for row in rows).values())
        most_pages = max(len(pages) for row in rows for pages in row.pages.values())
        batch_local = b.round(busiest_master, b.decode_batch)
        max_pages = b.round(most_pages, b.decode_pages)
        host = layout_decode_batch(rows, members, batch_local, max_pages)
        inputs = DecodeInputs(tokens=host.tokens, positions=host.positions, append_slots=host.append_slots,
                              page_tables=host.page_tables, kv_lens=host.kv_lens)
        sampling_rows = [PADDING_ROW] * (members * batch_local)
        for request_id, row in zip(batch.request_ids, host.rows):
            sampling_rows[row] = self.source.sampling_row(request_id)
        sampling, signature = self._sampling(sampling_rows, members * batch_local)
        key = ProgramKey("decode", group, (batch_local, max_pages, signature))
        if 4 * most_pages > 3 * max_pages:  # requests grow: have the next page bucket ready in time
            self.programs.request(ProgramKey("decode", group, (batch_local, 2 * max_pages, signature)))
        return _Program(key, (inputs, sampling), list(zip(batch.request_ids, host.rows)), sampling_rows)

    def _prepare_migration(self, batch: MigrationBatch) -> _Program:
        sources, destinations = [], []
        for ticket in self.state.migration_tickets(batch):
            sources.append(self._ticket_slots(ticket.src_pages, 0, ticket.n_tokens))
            destinations.append(self._ticket_slots(ticket.dst_pages, ticket.dst_first_slot, ticket.n_tokens))
        send, receive = np.concatenate(sources), np.concatenate(destinations)
        slots = self.buckets.round(len(send), self.buckets.migration_slots)
        send_slots = np.full((2, slots), -1, np.int32)
        receive_slots = np.full((2, slots), -1, np.int32)
        send_slots[0, :len(send)] = send  # member 0 = source
        receive_slots[1, :len(receive)] = receive  # member 1 = destination
        key = ProgramKey("migrate", (batch.src_instance, batch.dst_instance), (slots,))
        return _Program(key, (send_slots, receive_slots), [], [])

    def _ticket_slots(self, pages: Sequence[int], first: int, count: int) -> np.ndarray:
        pages_array = np.asarray(pages, dtype=np.int64)
        index = first + np.arange(count)
        return (pages_array[index // self.page_size] * self.page_size + index % self.page_size).astype(np.int32)

    def _sampling(self, rows: list[SamplingRow], batch_rows: int) -> tuple[SamplingBatch, tuple]:
        batch = pack_sampling_batch(rows, self.config.vocab_size, self.eos_token_ids, batch_bucket=batch_rows)
        return batch, sampling_signature(rows, batch)

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
            for request_id, row in part.sampled:
                tokens[request_id] = int(sampled.token_ids[row])
                logprobs[request_id] = sampled.logprobs[row]
        return UnitResult(run.launch.unit, tokens, logprobs, self.clock())
