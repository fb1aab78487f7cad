"""JaxExecutor: runs a scheduler plan on devices (the real twin of `simulator.SimExecutor`).

It holds the topology, one KV pool per instance, and the weights placed once on every instance. It
implements the executor contract (`loong_jax.executor.protocol`): the engine core calls `submit(plan, inputs)`
right after the engine state accounted the plan (its `StepInputs` carry the page tables of the pages the
plan takes, and each request's tokens and sampling row), then `wait_next()` for the units that finish first.

Data flow of one work unit:
  1. Host (`unit_inputs.UnitInputs`, numpy only): the unit and its step inputs become its
     program's key and inputs, padded to power-of-two buckets: striped tokens and KV placement (prefill,
     with the earlier chunks' pages for a chunked prefill), rows per master with each member's ragged page
     entries (decode), token slots to move (migration), and the sampling parameters in the same row order.
  2. Device: ONE jitted program per unit (two when a chunked prefill rides in a decode step), forward and
     sampling fused (prefill, decode) or the slot move (migration), as `programs` defines each kind, taken
     from the `ProgramCache` by (kind, group, bucket), which compiles with `programs.lowering`. The group's
     pool (`instance_pools.InstancePools`: the members' pools viewed as one, or the group's last pool kept
     whole) is donated, so KV is updated in place.
     Dispatch is asynchronous: programs on disjoint groups run side by side, and a unit whose program is
     still compiling waits in the background while the others run.
  3. `wait_next()` returns the units that finished first, each with ONE small device->host transfer: the
     int32 matrix of sampled tokens and logprobs (`sampler.sample_logits`'s packed output).
Over several processes (`loong_jax.distributed`) every process has a `JaxExecutor` over the whole cluster's
topology, holding pools only for its own instances. The leader's `submit` first publishes the plan and its
inputs (`broadcast`, a `protocol.PlanBroadcast`); every process dispatches, in the plan's order, the units
whose group holds one of its instances (`submit_step`), a group across processes being run by all of them
together; the leader gets a unit it takes no part in as the host copy of its outputs from the broadcast.
A follower collects the outputs of its units with `collect()`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections import Counter
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from loong_jax.models.kernels.dispatch import attention_impl_from_env, for_platform
from loong_jax.models.llama import LlamaForCausalLM
from loong_jax.executor.program_cache import ProgramCache, ProgramKey
from loong_jax.executor.programs import ProgramContext, lowering
from loong_jax.sampling.batch import PLAIN_GREEDY, unpack_sampler_output
from loong_jax.scheduler.plan import DecodeBatch, MigrationBatch, Plan, PrefillBatch, RequestId, WorkUnit
from loong_jax.sharding.kv_pool import PoolShape, create_pool
from loong_jax.sharding.topology import Topology, group_params, place_params
from loong_jax.executor.instance_pools import InstancePools
from loong_jax.executor.unit_inputs import Buckets, ProgramCall, UnitInputs
from loong_jax.executor.pending_tokens import PendingTokens, TokenSource
from loong_jax.executor.protocol import PlanBroadcast, StepInputs, UnitResult

__all__ = ["Buckets", "JaxExecutor", "PLAIN_GREEDY"]
DEFAULT_COMPILE_COST_S = 30.0  # what the scheduler assumes a compile costs before the first one is timed


@dataclasses.dataclass(eq=False)
class _Launch:
    """A unit and its programs (two when a chunked prefill rides in a decode step, else one)."""

    unit: WorkUnit
    programs: list[ProgramCall]
    index: int = 0  # position in its plan's `work_units()` (what a multi-process step names it by)
    fed: dict[int, dict[int, TokenSource]] = dataclasses.field(default_factory=dict)  # program -> row -> source
    outputs: list[jax.Array] | None = None  # once dispatched


@dataclasses.dataclass
class _Running:
    launch: _Launch
    outputs: list[jax.Array]  # per program: the packed sampler output (or the migrated pool); [] for a unit
    # only other processes run: its `fetch` brings the host copies of its outputs from the one reporting it
    fetch: concurrent.futures.Future | None = None


class JaxExecutor:
    def __init__(self, model: LlamaForCausalLM, topology: Topology, pages_per_instance: int, page_size: int,
                 *, eos_token_ids: Sequence[int] = (), buckets: Buckets = Buckets(),
                 program_cache: ProgramCache | None = None, clock=time.monotonic, in_dispatch_order: bool = False,
                 attention_impl: str | None = None, broadcast: PlanBroadcast | None = None):
        """in_dispatch_order: `wait_next` returns units in the order they were dispatched instead of as they
        finish (with a logical clock this makes a whole run reproducible, scheduling decisions included).
        attention_impl: "auto" | "interpret" | "reference" | "kernel" (`models.kernels.dispatch`); None reads
        `LOONG_JAX_ATTENTION` here, once; "auto" is settled here for the platform of the devices.
        broadcast: the leader of several processes sends every plan through it (None: one process, or a
        follower, which `loong_jax.distributed.follower` drives through `submit_step` and `collect`)."""
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
        self.broadcast = broadcast
        # Each process holds the pools of its own instances only (None: another process's instance).
        self.pools = InstancePools(topology, [create_pool(self.pool_shape, topology, i)
                                              if i in topology.local_instances else None
                                              for i in range(topology.num_instances)])
        self.programs = program_cache or ProgramCache(lowering(ProgramContext(
            graphdef, topology, self.params, self.pool_shape, self.attention_impl)))
        self._group_params: dict[tuple[int, ...], Any] = {}
        self._running: list[_Running] = []
        self._compiling: list[tuple[_Launch, list[concurrent.futures.Future]]] = []
        self._fetchers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="loong-jax-fetch")
        self.unit_inputs = UnitInputs(self.buckets, page_size, self.config.vocab_size, self.eos_token_ids)
        self.counters = Counter()
        self._ready_programs: tuple[int, frozenset] = (-1, frozenset())  # (compile count, scheduler keys)
        self.pending = PendingTokens(topology)

    @property
    def feeds_pending_tokens(self) -> bool:
        """One process: pending tokens are fed from this process's own outputs (`pending_tokens`)."""
        return self.broadcast is None and self.topology.local_instances == frozenset(self.topology.all_instances)

    @property
    def num_instances(self) -> int:
        return self.topology.num_instances

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._compiling)

    # -- the executor interface -----------------------------------------------------------------------------------
    def submit(self, plan: Plan, inputs: StepInputs) -> None:
        """Dispatch every unit of a plan the engine state has accounted, with its step inputs (published to
        the other processes first when there are some)."""
        step = None
        if self.broadcast is not None and (plan.prefills or plan.decodes or plan.migrations):
            step, inputs = self.broadcast.publish(plan, inputs)
        self.submit_step(plan, inputs, step)

    def submit_step(self, plan: Plan, inputs: StepInputs, step: int | None = None) -> None:
        """Dispatch, in the plan's order, the units on this process's instances. A unit on none of them is
        skipped (a follower), or awaited from the process that reports it (the leader: `broadcast`). Units
        that need a pending token read on the host go last (`pending_tokens`)."""
        units, fed = list(enumerate(plan.work_units())), {}
        if self.feeds_pending_tokens:
            fed, reads = self.pending.settle(plan, inputs)
            if reads:
                needs_read = [not reads.keys().isdisjoint(unit.all_request_ids) for _, unit in units]
                self._submit_units([pair for pair, later in zip(units, needs_read) if not later], inputs, fed, step)
                units = [pair for pair, later in zip(units, needs_read) if later]
                inputs = self.pending.read_on_host(inputs, reads, self._outputs_of)
        self._submit_units(units, inputs, fed, step)

    def _submit_units(self, units: list[tuple[int, WorkUnit]], inputs: StepInputs,
                      fed: dict[RequestId, TokenSource], step: int | None) -> None:
        local = self.topology.local_instances
        for index, unit in units:
            if local.isdisjoint(unit.group):
                if self.broadcast is not None:
                    launch = _Launch(unit, self._host_inputs(unit, inputs), index)
                    self._running.append(_Running(launch, [], self.broadcast.remote_outputs(step, index, unit.group)))
                continue
            launch = self._prepare(unit, inputs, fed)
            launch.index = index
            queued = {i for waiting, _ in self._compiling for i in waiting.unit.group}
            if queued.isdisjoint(unit.group) and all(self.programs.is_ready(part.key) for part in launch.programs):
                self._dispatch(launch)
            else:  # compile in the background (or wait behind a unit on its instances that compiles);
                futures = [self.programs.request(part.key) for part in launch.programs]  # others run
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
                return [self._finish(run) for run in self._with_earlier_of_their_requests(finished)]
            if not self._compiling and len({run.launch.unit.group for run in self._running}) == 1:
                return [self._finish(self._running[0])]  # one group, whose units finish in order: no thread hop
            for run in self._running:
                if run.fetch is None:  # block in a helper thread, so that whichever finishes first wakes us
                    run.fetch = self._fetchers.submit(self._fetch, run)
            waiting = [run.fetch for run in self._running] + [  # (a compiled launch still queued behind another
                f for _, futures in self._compiling for f in futures if not f.done()]  # waits on that one's)
            concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
        return []

    def _with_earlier_of_their_requests(self, finished: list[_Running]) -> list[_Running]:
        """`finished` and every earlier unit sharing a request with one of them, in dispatch order, so that a
        request's tokens come back in order. (An earlier unit of a request whose token a later one was fed is
        done: it ran before it on the same devices, or its token was read on the host first.)"""
        chosen = {id(run) for run in finished}
        requests = set().union(*(run.launch.unit.all_request_ids for run in finished))
        last = max(index for index, run in enumerate(self._running) if id(run) in chosen)
        return [run for run in self._running[:last + 1]
                if id(run) in chosen or not requests.isdisjoint(run.launch.unit.all_request_ids)]

    def collect(self) -> list[tuple[_Launch, list]]:
        """Every unit in flight, waited for: (its launch, the host copies of its outputs). What a follower
        reports to the leader; the units leave the executor."""
        done = []
        while self._running or self._compiling:
            if self._compiling:
                concurrent.futures.wait([f for _, futures in self._compiling for f in futures])
                self._dispatch_compiled()
            while self._running:
                run = self._running.pop(0)
                done.append((run.launch, run.fetch.result() if run.fetch is not None else self._fetch(run)))
        return done

    def cluster_failure(self) -> Exception | None:
        """Over several processes: why the cluster can no longer run steps (a lost process), else None."""
        return None if self.broadcast is None else self.broadcast.failure()

    def close(self) -> None:
        failed = self.cluster_failure() is not None
        if self.broadcast is not None:
            self.broadcast.close()
        self._fetchers.shutdown(wait=not failed)  # a fetch may wait forever on a collective with a lost peer
        self.programs.close()

    # -- programs ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Units run per program kind and the program cache's statistics (with the programs ready to run);
        over several processes, the leader's broadcast counters too."""
        return {**{f"units_{kind}": count for kind, count in self.counters.items()},
                **{f"pending_tokens_{how}": count for how, count in self.pending.counters.items()},
                **{f"programs_{name}": value for name, value in self.programs.stats.as_dict().items()},
                "programs_ready": len(self.programs.ready_keys()),
                **(self.broadcast.stats() if self.broadcast is not None else {})}

    def compile_seconds_per_program(self) -> float:
        stats = self.programs.stats
        return stats.compile_seconds / stats.compiles if stats.compiles else DEFAULT_COMPILE_COST_S

    def ready_programs(self) -> frozenset | None:
        """Scheduler keys (kind, group, token/batch bucket) that a compiled program serves (recomputed only
        when a compile has finished since the last call). Over several processes the leader cannot see the
        other processes' programs: None (every program counts as ready)."""
        if self.topology.local_instances != frozenset(self.topology.all_instances):
            return None
        compiles = self.programs.stats.compiles
        if self._ready_programs[0] != compiles:
            self._ready_programs = (compiles, self._scheduler_keys())
        return self._ready_programs[1]

    def _scheduler_keys(self) -> frozenset:
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
        """The smallest-bucket, plain-sampling programs of these groups (what start-up compiles); over several
        processes, only the groups this process takes part in."""
        local = self.topology.local_instances
        prefill_groups = [g for g in prefill_groups if not local.isdisjoint(g)]
        decode_groups = [g for g in decode_groups if not local.isdisjoint(g)]
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

    # -- host side: plan units -> program inputs --------------------------------------------------------------
    def _prepare(self, unit: WorkUnit, step: StepInputs, fed: dict[RequestId, TokenSource]) -> _Launch:
        """`fed`: requests whose newest token is pending, to be fed on the device (`pending_tokens`)."""
        calls = self._host_inputs(unit, step)
        for call in calls:
            if call.next_key is not None and not self.programs.is_ready(call.next_key):
                self.programs.request(call.next_key)  # requests grow: have their next bucket compiled in time
        launch = _Launch(unit, calls)
        if self.feeds_pending_tokens:
            for program, call in enumerate(calls):
                rows = {row: fed[request_id] for request_id, row in call.sampled if request_id in fed}
                if rows and call.key.kind == "decode":  # (a prefill reads no pending token: never fed)
                    launch.fed[program] = rows
            self.pending.record(launch, step)
        return launch

    def _host_inputs(self, unit: WorkUnit, step: StepInputs) -> list[ProgramCall]:
        inputs = self.unit_inputs
        if isinstance(unit, PrefillBatch):
            calls = [inputs.prefill(unit, step.requests)]
        elif isinstance(unit, DecodeBatch):
            calls = [] if unit.fused_prefill is None else [inputs.prefill(unit.fused_prefill, step.requests)]
            if unit.request_ids:
                calls.append(inputs.decode(unit, step.requests))
        elif isinstance(unit, MigrationBatch):
            calls = [inputs.migration(unit, step.migrations[unit])]
        else:
            raise TypeError(f"unknown work unit {type(unit).__name__}")
        return calls

    # -- device side ----------------------------------------------------------------------------------------
    def _dispatch(self, launch: _Launch) -> None:
        outputs = []
        for index, part in enumerate(launch.programs):
            program, group, inputs = self.programs.get(part.key), part.key.group, part.inputs
            if index in launch.fed:  # decode rows whose token an earlier unit is still computing
                decode, sampling = inputs
                tokens = self.pending.feed(group, decode.tokens, launch.fed[index], self._outputs_of)
                inputs = (dataclasses.replace(decode, tokens=tokens), sampling)
            pool = self.pools.take(group)
            if part.key.kind == "migrate":
                pool = program(pool, *inputs)
                outputs.append(pool)
            else:
                output, pool = program(self._params_for(group), pool, *inputs)
                if not output.is_fully_addressable:  # a group across processes: the local copy of the
                    output = output.addressable_data(0)  # replicated tokens is the whole of them
                output.copy_to_host_async()  # the program's one device->host transfer starts when it can
                outputs.append(output)
            self.pools.put(group, pool)
            self.counters[part.key.kind] += 1
        launch.outputs = outputs
        self._running.append(_Running(launch, outputs))

    def _outputs_of(self, launch: _Launch) -> list[jax.Array]:
        """A launch's output arrays, dispatching it first if its programs were still compiling."""
        while launch.outputs is None:  # it goes once it and every launch queued before it have compiled
            position = next(i for i, (queued, _) in enumerate(self._compiling) if queued is launch)
            concurrent.futures.wait([f for _, futures in self._compiling[:position + 1] for f in futures])
            self._dispatch_compiled()
        return launch.outputs

    def _dispatch_compiled(self) -> None:
        """Dispatch the queued launches whose programs are ready, in order on each instance (a launch
        released early may be queued behind one on its instances that still compiles)."""
        still_compiling, blocked = [], set()
        for launch, futures in self._compiling:
            if blocked.isdisjoint(launch.unit.group) and all(future.done() for future in futures):
                for future in futures:
                    future.result()  # a failed compilation raises here
                self._dispatch(launch)
            else:
                still_compiling.append((launch, futures))
                blocked.update(launch.unit.group)
        self._compiling = still_compiling

    @staticmethod
    def _fetch(run: _Running) -> list:
        """Host copies of the sampled tokens (a migration only waits for its pool)."""
        return [jax.block_until_ready(output) if part.key.kind == "migrate" else np.asarray(output)
                for part, output in zip(run.launch.programs, run.outputs)]

    def _finish(self, run: _Running) -> UnitResult:
        self._running.remove(run)
        self.pending.forget(run.launch)
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
        return UnitResult(run.launch.unit, tokens, finish_time=self.clock(), logprobs=logprobs)
