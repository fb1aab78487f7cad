"""The executor contract: what the engine core hands an executor for one step, and what comes back.

Data flow of one step, seen from an executor:
  1. `submit(plan, inputs)`: the plan's work units (`plan.work_units()`, on disjoint instance sets) start.
     The plan says what runs where; `StepInputs` carries everything else a unit needs, taken from the
     engine's books right after the plan was accounted: per request, the tokens it feeds and how to sample
     its next token (`RequestInputs`), and per migration unit the page tables of the shares it moves
     (`MigrationTicket`). An executor reads nothing else of the engine (no call back up), so the plan and
     its inputs are all a second host would need to run its part of the step.
  2. `wait_next()`: the unit(s) that finish first come back as `UnitResult`s, in the one result type every
     executor returns: one token per request that produced one, logprobs when asked, the requests the
     executor already knows are finished (the simulator knows output lengths; the JAX executor knows
     none: the engine decides stops), and the finish time on the executor's clock.
  3. With asynchronous scheduling the engine accounts a unit as done as soon as it is dispatched
     (`EngineState.release_early`) and plans the next step while it runs: a request's token from that unit
     is `PENDING_TOKEN` in the next step's inputs until the result is back. The executor feeds it from the
     earlier unit's output on the device (a decode on the same devices) or waits for it (anything else).
  4. `in_flight`, `ready_programs()`, `compile_seconds_per_program()` and `stats()` are what the scheduler's
     view and the engine's counters read.

`JaxExecutor` (`loong_jax.executor.jax_executor`) runs units as jitted programs on devices;
`SimExecutor` (`loong_jax.simulator.sim_executor`) advances a virtual clock by the cost model.
Over several processes the leader's `JaxExecutor` hands each plan and its inputs to a `PlanBroadcast`
(`loong_jax.distributed`), which the followers read; a unit on no device of the leader comes back as the
host copy of its outputs, published by the process that reports it (`PlanBroadcast.remote_outputs`).
"""

from __future__ import annotations

import dataclasses
import concurrent.futures
from typing import Mapping, Protocol, Sequence

from loong_jax.outputs import TokenLogprobs
from loong_jax.sampling.batch import SamplingRow
from loong_jax.scheduler.plan import MigrationBatch, Plan, RequestId, WorkUnit


# A token sampled by a unit that is still running (asynchronous scheduling): see step 3 above.
PENDING_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class MigrationTicket:
    """One share to move: token j goes from source slot j to destination slot `dst_first_slot + j`
    (slots map to pages through the page tables)."""

    ticket_id: int
    request_id: RequestId
    src_instance: int
    dst_instance: int
    n_tokens: int
    src_pages: tuple[int, ...]
    dst_first_slot: int
    dst_pages: tuple[int, ...]  # the request's whole page table on the destination after the move


@dataclasses.dataclass(frozen=True)
class RequestInputs:
    """One request of a step, as its unit needs it."""

    sampling: SamplingRow  # parameters, prompt and tokens generated so far, sample index
    page_tables: Mapping[int, Sequence[int]]  # instance -> the request's pages there (this step's included)
    kv_tokens: Mapping[int, int]  # instance -> tokens of the request's KV held there (this step's included)

    @property
    def token_ids(self) -> list[int]:
        """The prompt followed by every token generated so far (what a prefill chunk is cut from)."""
        return list(self.sampling.prompt_token_ids) + list(self.sampling.output_token_ids)

    @property
    def context_len(self) -> int:
        return len(self.sampling.prompt_token_ids) + len(self.sampling.output_token_ids)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What travels with a plan to the executor (see the module docstring)."""

    requests: Mapping[RequestId, RequestInputs] = dataclasses.field(default_factory=dict)
    migrations: Mapping[MigrationBatch, Sequence[MigrationTicket]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UnitResult:
    """What a finished unit reports: one token per request that produced one (every decode request, and
    prefill requests whose chunk reached the end of the prompt), their logprobs when asked, and the
    requests known to be finished after it (length, stop)."""

    unit: WorkUnit
    new_tokens: Mapping[RequestId, int] = dataclasses.field(default_factory=dict)
    finished: frozenset = frozenset()
    finish_time: float = 0.0
    logprobs: Mapping[RequestId, TokenLogprobs | None] = dataclasses.field(default_factory=dict)

    def finishing(self, finished: frozenset) -> "UnitResult":
        """The same result with `finished` added (the engine's stop decisions)."""
        return dataclasses.replace(self, finished=self.finished | finished) if finished else self


class Executor(Protocol):
    """What `EngineCore` drives (see the module docstring)."""

    num_instances: int

    def submit(self, plan: Plan, inputs: StepInputs) -> None:
        """Start every work unit of a plan the engine state has just accounted."""

    def wait_next(self) -> list[UnitResult]:
        """Results of the unit(s) that finish first; [] when nothing is in flight."""

    @property
    def in_flight(self) -> int:
        """Units submitted and not yet returned by `wait_next`."""

    @property
    def feeds_pending_tokens(self) -> bool:
        """Whether `submit` accepts `PENDING_TOKEN` in a request's tokens (asynchronous scheduling)."""

    def ready_programs(self) -> frozenset | None:
        """Scheduler keys (kind, group, token bucket) that run without compiling first; None = all of them."""

    def compile_seconds_per_program(self) -> float:
        """What compiling one more program costs (what the scheduler weighs a cold program with)."""

    def stats(self) -> dict:
        """Counters for reports and metrics: units run per kind, program cache statistics."""


class PlanBroadcast(Protocol):
    """The leader's side of a multi-process step (`loong_jax.distributed.channel.LeaderChannel`)."""

    def publish(self, plan: Plan, inputs: StepInputs) -> tuple[int, StepInputs]:
        """Send a plan and its inputs to every follower; returns the step number and the inputs as sent
        (unseeded sampling rows get this step's seed, so that every process samples alike)."""

    def remote_outputs(self, step: int, unit_index: int, group: tuple[int, ...]) -> concurrent.futures.Future:
        """The host copies of the outputs of the `unit_index`-th unit of `step` (list of numpy arrays, one
        per program, None for a migration), run by other processes only."""

    def failure(self) -> Exception | None:
        """Why the cluster can no longer run steps (a lost process), or None."""

    def stats(self) -> dict:
        """Counters of the broadcast (steps published, bytes, seconds spent publishing)."""

    def close(self) -> None:
        """Stop the followers' loops."""
