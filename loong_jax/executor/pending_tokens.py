"""Tokens sampled by units that are still running, and how the next step's programs get them.

With asynchronous scheduling (`loong_jax.engine.core`) the engine plans step n+1 while step n runs: a token
step n samples is `PENDING_TOKEN` in step n+1's inputs. Data flow, inside `JaxExecutor`:
  1. `record(launch, step)`: when a unit is prepared, every token it will sample is noted as a
     `TokenSource` (its launch, the program of the launch, the row of that program's packed sampler output)
     under (request, output index); `forget(launch)` drops them once the unit's result is read, because
     the engine then writes the real tokens into its books before it plans again.
  2. `settle(plan, step)`: before a plan's units are prepared, each request's pending tokens are sorted
     out: fed on the device when the request decodes in this plan (a decode reads only its newest token:
     the decode program's input row takes it; older pending tokens are already in its KV), else to be read
     on the host (a prefill of a preempted request, which reads every token).
     `read_on_host(step, reads, outputs)` waits for those (`outputs(launch)` gives a launch's output
     arrays, dispatching it first if it was still compiling); the executor first dispatches the units
     that need no such read, so that a group never waits for another group's step.
  3. `feed(group, tokens, rows)`: a decode program's [rows] token input with its pending rows taken from
     the earlier programs' outputs by one small jitted gather on the group's devices (an output sampled on
     other devices, after a scale-up or a regrouping, is first copied there with `jax.device_put`, which
     the device runs once the output exists); the host never waits for them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from loong_jax.executor.protocol import PENDING_TOKEN, StepInputs
from loong_jax.scheduler.plan import Plan, RequestId
from loong_jax.sharding.specs import BY_MEMBER_SPEC, REPLICATED_SPEC
from loong_jax.sharding.topology import Topology


class TokenSource(NamedTuple):
    """Where a token will be: row `row` of the packed output of program `program` of a unit's launch."""

    launch: Any  # the executor's `_Launch` (its `outputs` exist once it is dispatched)
    program: int
    row: int


def _gather_pending(tokens, source_ids, source_rows, sources):
    """[rows] int32: `tokens`, where row r with source_ids[r] = k >= 0 takes the token sampled at row
    source_rows[r] of sources[k] (the sampler's packed int32 matrix: tokens in column 0)."""
    for k, packed in enumerate(sources):
        tokens = jnp.where(source_ids == k, packed[source_rows, 0], tokens)
    return tokens


class PendingTokens:
    def __init__(self, topology: Topology):
        self.topology = topology
        self._sources: dict[RequestId, dict[int, TokenSource]] = {}  # request -> output index -> source
        self._feeders: dict[tuple[int, ...], tuple] = {}  # group -> (jitted `_gather_pending`, mesh, devices)
        self.counters = Counter()  # pending tokens "fed_on_device" and "read_on_host"

    def record(self, launch, step: StepInputs) -> None:
        """Note the tokens a prepared unit will sample (step 1)."""
        for program, call in enumerate(launch.programs):
            for request_id, row in call.sampled:
                index = len(step.requests[request_id].sampling.output_token_ids)
                self._sources.setdefault(request_id, {})[index] = TokenSource(launch, program, row)

    def forget(self, launch) -> None:
        """The unit's result was read: its tokens are no longer pending."""
        for request_id in {request_id for call in launch.programs for request_id, _ in call.sampled}:
            sources = self._sources.get(request_id, {})
            for index in [i for i, source in sources.items() if source.launch is launch]:
                del sources[index]
            if not sources:
                self._sources.pop(request_id, None)

    def settle(self, plan: Plan, step: StepInputs
               ) -> tuple[dict[RequestId, TokenSource], dict[RequestId, dict[int, TokenSource]]]:
        """Pending tokens of the step's requests: (request -> source fed on the device, request -> output
        index -> source to read on the host) (step 2)."""
        decoding = {request_id for unit in plan.decodes for request_id in unit.request_ids}
        fed, reads = {}, {}
        for request_id, request in step.requests.items():
            sources = self._sources.get(request_id)
            if not sources:
                continue
            tokens = request.sampling.output_token_ids
            pending = [i for i in sources if i < len(tokens) and tokens[i] == PENDING_TOKEN]
            newest = len(tokens) - 1
            if newest in pending and request_id in decoding:
                fed[request_id] = sources[newest]
            elif pending:
                reads[request_id] = {index: sources[index] for index in pending}
        return fed, reads

    def read_on_host(self, step: StepInputs, reads: Mapping[RequestId, Mapping[int, TokenSource]],
                     outputs: Callable[[Any], Sequence[jax.Array]]) -> StepInputs:
        """The step's inputs with these pending tokens read (waiting for the units that sample them)."""
        settled = {}
        for request_id, sources in reads.items():
            request = step.requests[request_id]
            known = list(request.sampling.output_token_ids)
            for index, source in sources.items():
                known[index] = int(np.asarray(outputs(source.launch)[source.program])[source.row, 0])
            self.counters["read_on_host"] += len(sources)
            sampling = dataclasses.replace(request.sampling, output_token_ids=known)
            settled[request_id] = dataclasses.replace(request, sampling=sampling)
        return dataclasses.replace(step, requests={**step.requests, **settled})

    def feed(self, group: tuple[int, ...], tokens: np.ndarray, rows: Mapping[int, TokenSource],
             outputs: Callable[[Any], Sequence[jax.Array]]) -> jax.Array:
        """A decode program's token input with its pending rows (row -> source) gathered on the device."""
        arrays, index_of, fed_rows, fed_from = [], {}, [], []  # (index_of: (launch, program) -> k)
        for row, source in rows.items():
            k = index_of.get((source.launch, source.program))
            if k is None:
                k = index_of[source.launch, source.program] = len(arrays)
                arrays.append(outputs(source.launch)[source.program])
            fed_rows.append(row)
            fed_from.append((k, source.row))
        source_ids, source_rows = np.full(tokens.shape, -1, np.int32), np.zeros(tokens.shape, np.int32)
        source_ids[fed_rows], source_rows[fed_rows] = np.asarray(fed_from, np.int32).T
        feeder, mesh, on_group = self._feeder(group)
        arrays = [array if array.sharding.device_set == on_group  # else copied over, device to device
                  else jax.device_put(array, NamedSharding(mesh, REPLICATED_SPEC)) for array in arrays]
        self.counters["fed_on_device"] += len(rows)
        return feeder(tokens, source_ids, source_rows, tuple(arrays))

    def _feeder(self, group: tuple[int, ...]) -> tuple[Callable, Any, set]:
        """The group's jitted `_gather_pending`, its mesh and its devices."""
        feeder = self._feeders.get(group)
        if feeder is None:
            mesh = self.topology.group_mesh(group)
            gather = jax.jit(_gather_pending, out_shardings=NamedSharding(mesh, BY_MEMBER_SPEC))
            feeder = self._feeders[group] = (gather, mesh, set(mesh.devices.flat))
        return feeder
