"""The engine loop: requests in, streamed outputs out, one scheduling event per `step()`.

Data flow of `step()`, over the `EngineCore` (`loong_jax.engine.core`) that the simulator and the profiler
drive too:
  1. plan = core.schedule(): the policy sees numbers only (free pages, queues, ready programs) and plans
     work for the idle instances;
  2. core.dispatch(plan, sampling rows): pages are taken (placements, masters, migrations), preempted
     requests go back to waiting, and every unit goes to the executor with its inputs (each request's
     sampling row, which holds its tokens, and its page tables): nothing calls back into the engine. With
     asynchronous scheduling the decode steps are then released: booked as done, their tokens pending, so
     that if nothing older runs the step ends here and the next plan is made while they run;
  3. results = core.wait(): the unit(s) that finish first come back with their sampled tokens;
  4. the tokens are detokenized (stop strings, stop tokens, max_tokens decide which requests finish),
     core.apply(result) frees the pages of finished requests (for a released unit: core.resolve writes the
     pending tokens, and a request that stopped is finished now or when the step planned behind it
     returns, whose token it never shows), and the step returns the new output of every request it touched
     (deltas: new token ids, text and logprobs, with the finish reason at the end). `step_timer` adds up
     the host time of each stage.

Requests are validated at the edge (`validate_request`): a bad prompt, bad sampling parameters or a
request that could never fit the cluster's KV raises ValueError before anything is queued. A request with
`n > 1` samples runs as n sequences (one engine request each, own random stream) gathered into one output.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Sequence

from loong_jax.sampling.detokenizer import SequenceDetokenizer
from loong_jax.engine.core import EngineCore
from loong_jax.engine.snapshot import EngineSnapshot, capture as capture_snapshot
from loong_jax.engine.state import EngineState, Release
from loong_jax.engine.step_timer import StepTimer
from loong_jax.executor.protocol import Executor, UnitResult
from loong_jax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loong_jax.sampling.batch import SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.plan import Plan
from loong_jax.scheduler.view import FINISHED

logger = logging.getLogger(__name__)


class LogicalClock:
    """A clock that advances one millisecond per reading: with an executor returning units in dispatch
    order, every scheduling decision (and so the whole run) is reproducible. Timings become step counts."""

    def __init__(self, tick: float = 1e-3):
        self._tick = tick
        self._readings = itertools.count(1)

    def __call__(self) -> float:
        return next(self._readings) * self._tick


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready to be queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclasses.dataclass
class _Sequence:
    """One sample of a request: one engine (scheduler) request with its own detokenizer."""

    engine_id: int
    request: "_Request"
    index: int
    detokenizer: SequenceDetokenizer


@dataclasses.dataclass
class _Request:
    prepared: PreparedRequest
    metrics: RequestMetrics
    sequences: list[_Sequence] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(sequence.detokenizer.finished for sequence in self.sequences)


class Engine:
    def __init__(self, executor: Executor, tokenizer, policy, cost_model, *, max_context: int, vocab_size: int,
                 pages_per_instance: int, page_size: int, clock=time.monotonic, compile_aware: bool = True,
                 async_scheduling: bool = True, prefix_cache=None):
        """`compile_aware`: the policy is told which programs are compiled and what a compilation costs (off
        for reproducible runs: compile times vary). `async_scheduling`: plan step n+1 while step n runs
        (`EngineCore`), where the executor can feed step n's tokens on the device. `prefix_cache`: the
        `PrefixCacheOptions` of the KV pages shared by equal prompt prefixes (None: enabled, unbounded)."""
        self.state = EngineState(executor.num_instances, pages_per_instance, page_size, prefix_cache)
        self.core = EngineCore(self.state, policy, cost_model, executor, clock=clock, compile_aware=compile_aware,
                               async_scheduling=async_scheduling)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.max_context, self.vocab_size, self.pages_per_instance = max_context, vocab_size, pages_per_instance
        self._token_limits = self._policy_token_limits(policy)
        self._requests: dict[str, _Request] = {}
        self._sequences: dict[int, _Sequence] = {}
        self._engine_ids = itertools.count()
        self._deltas: dict[str, tuple[_Request, dict[int, CompletionOutput]]] = {}  # not yet emitted
        # Released early, tokens not yet read; by the unit's identity: two steps of the same batch are equal.
        self._released: dict[int, Release] = {}
        self.step_timer = StepTimer()

    # -- requests -------------------------------------------------------------------------------------------------
    def token_limits(self) -> tuple[int, int]:
        """(longest prompt, largest prompt + max_tokens - 1) in tokens that can ever be served here."""
        return self._token_limits

    def _policy_token_limits(self, policy) -> tuple[int, int]:
        capacity = self.state.capacity_tokens
        limits = policy.request_token_limits(self.state.num_instances, self.pages_per_instance, self.state.page_size)
        if limits is None:  # the policy may spread one request over the whole cluster
            return capacity, capacity
        longest_prompt, largest_peak = limits
        return min(longest_prompt, capacity), min(largest_peak, capacity)

    def validate_request(self, request_id: str, prompt_token_ids: Sequence[int],
                         params: SamplingParams | dict | None = None, prompt: str | None = None) -> PreparedRequest:
        """Checks one request without queueing it; raises ValueError naming the problem."""
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams or a dict, got {type(params).__name__}")
        params.check_vocab(self.vocab_size)
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"prompt token {position} is {token!r}, not a token id in [0, {self.vocab_size - 1}]")
        if len(ids) >= self.max_context:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the model's context of {self.max_context} "
                             "tokens (at least one token must be generated)")
        max_tokens = params.max_tokens
        if len(ids) + max_tokens > self.max_context:  # the server's rule too: refuse, never shorten silently
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's context "
                             f"length ({self.max_context}); lower max_tokens to at most "
                             f"{self.max_context - len(ids)} or shorten the prompt")
        longest_prompt, largest_peak = self.token_limits()
        if len(ids) > longest_prompt:
            raise ValueError(f"prompt of {len(ids)} tokens can never fit: this engine holds at most "
                             f"{longest_prompt} prompt tokens of KV for one request (raise kv_pages or use more "
                             "instances)")
        peak = len(ids) + max_tokens - 1
        if peak > largest_peak:
            raise ValueError(f"request needs KV for {peak} tokens (prompt {len(ids)} + max_tokens {max_tokens} - 1) "
                             f"but at most {largest_peak} fit for one request; lower max_tokens, shorten the "
                             "prompt, raise kv_pages or use more instances")
        return PreparedRequest(request_id, prompt, tuple(ids), params)

    def add_request(self, request: PreparedRequest, arrival: float | None = None) -> None:
        """Queue a validated request (`validate_request`)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        now = self.clock() if arrival is None else arrival
        record = _Request(request, RequestMetrics(arrival_time=now))
        for index in range(request.params.n):
            engine_id = next(self._engine_ids)
            detokenizer = SequenceDetokenizer(self.tokenizer, request.params, request.prompt_token_ids,
                                              self.eos_token_ids, index=index)
            sequence = _Sequence(engine_id, record, index, detokenizer)
            self.state.add_request(engine_id, len(request.prompt_token_ids), request.params.max_tokens, arrival=now,
                                   prompt_token_ids=request.prompt_token_ids)
            record.sequences.append(sequence)
            self._sequences[engine_id] = sequence
        self._requests[request.request_id] = record

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its pages are freed now, or when the unit it is part of returns (within one
        step). Its final output (finish_reason "abort") comes with the next step."""
        record = self._requests.get(request_id)
        if record is None:
            return False
        for sequence in record.sequences:
            self.state.abort(sequence.engine_id, self.clock())
            self._finish_if_done(sequence)
        return True

    def is_running(self, request_id: str) -> bool:
        """Queued or running (not finished, not aborted to the end)."""
        return request_id in self._requests

    def was_scheduled(self, request_id: str) -> bool:
        """Running and scheduled at least once (its prefill has begun): no longer waiting in the queue."""
        record = self._requests.get(request_id)
        return record is not None and record.metrics.first_scheduled_time is not None

    def pages_held(self, request_id: str) -> int:
        """KV pages the request holds right now, over all instances and samples (0 once it is finished)."""
        record = self._requests.get(request_id)
        if record is None:
            return 0
        allocator = self.state.allocator
        return sum(len(allocator.page_table(sequence.engine_id, instance))
                   for sequence in record.sequences if allocator.has_request(sequence.engine_id)
                   for instance in allocator.kv_layout(sequence.engine_id))

    def has_unfinished(self) -> bool:
        """Requests to serve, outputs to hand out, or released units whose results are still to be read
        (after a stop, the step planned behind it still runs)."""
        return bool(self._requests) or bool(self._deltas) or bool(self._released)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    @property
    def policy(self):
        return self.core.policy

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @property
    def clock(self):
        return self.core.clock

    @property
    def cost_model(self):
        return self.core.cost_model

    # -- the loop -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling event (see the module docstring); returns the outputs it produced (deltas)."""
        timer = self.step_timer.start()
        plan = timer.lap("schedule", self.core.schedule())
        self.core.check_progress(plan)
        releases = self.core.dispatch(plan, self._sampling_rows(plan))
        self._note_dispatched(plan)
        for release in releases:
            self._note_released(release)
        timer.lap("dispatch")
        if not releases or self.executor.in_flight > len(releases):
            results = timer.lap("wait", self.core.wait())
            for result in results:
                self._apply(result)
            timer.lap("apply")
        # else everything running was released just now: the next step is planned while it runs
        return timer.lap("outputs", self.take_outputs(), step_done=True)

    def take_outputs(self) -> list[RequestOutput]:
        """The delta output of every request that changed since the last call, in the order they changed."""
        outputs = []
        for request_id, (record, deltas) in self._deltas.items():
            outputs.append(RequestOutput(
                request_id=request_id, prompt=record.prepared.prompt,
                prompt_token_ids=list(record.prepared.prompt_token_ids),
                outputs=[deltas[index] for index in sorted(deltas)], finished=record.finished,
                metrics=record.metrics, delta=True))
        self._deltas = {}
        return outputs

    def _sampling_rows(self, plan: Plan) -> dict[int, SamplingRow]:
        """What each request of the plan samples with, and the tokens it feeds (prompt + generated)."""
        rows = {}
        for unit in plan.work_units():
            for engine_id in unit.all_request_ids:
                sequence, request = self._sequences[engine_id], self.state.requests[engine_id]
                prepared = sequence.request.prepared
                rows[engine_id] = SamplingRow(prepared.params, prepared.prompt_token_ids, request.generated,
                                              sample_index=sequence.index)
        return rows

    def _note_dispatched(self, plan: Plan) -> None:
        now = self.clock()
        fused = [d.fused_prefill for d in plan.decodes if d.fused_prefill is not None]
        for batch in list(plan.prefills) + fused:
            for engine_id in batch.request_ids:
                self._sequences[engine_id].request.metrics.record_scheduled(now)
        for engine_id in plan.rejections:  # what validation could not foresee, or (admission) what is too late
            logger.warning("policy %s rejected request %r: it cannot fit the groups it uses or, with admission "
                           "control, meet its deadline under the present load",
                           getattr(self.core.policy, "name", "?"), self._sequences[engine_id].request.prepared.request_id)
            self._finish_if_done(self._sequences[engine_id])

    def _note_released(self, release: Release) -> None:
        """A unit the state accounted before its tokens are known: its tokens are read when it returns.
        Requests it finished close now if they are aborted or already stopped; one that reached
        max_tokens closes once its last token is read."""
        self._released[id(release.unit)] = release
        for request in release.finished:
            sequence = self._sequences[request.request_id]
            if request.finish_reason != "finished" or sequence.detokenizer.finished:
                self._finish_if_done(sequence)

    def _apply(self, result: UnitResult) -> None:
        release = self._released.pop(id(result.unit), None)
        if release is not None:
            self._apply_released(result, release)
            return
        finished = set()
        requests, sequences = self.state.requests, self._sequences
        for engine_id in result.new_tokens:
            if requests[engine_id].ending is not None:
                continue  # its unit was running when it was aborted or stopped; the token is dropped
            if self._show_token(sequences[engine_id], result):
                finished.add(engine_id)
        self.core.apply(result.finishing(frozenset(finished)))
        for engine_id in result.unit.all_request_ids:
            request = requests.get(engine_id)
            if request is not None and request.status == FINISHED:  # the common case (running) skips the call
                self._finish_if_done(sequences[engine_id])

    def _apply_released(self, result: UnitResult, release: Release) -> None:
        """The tokens of a released unit: written in place of the pending ones, then detokenized. A request
        that stopped at an earlier token, or was aborted, shows none of them."""
        self.core.resolve(result, release)
        requests = self.state.requests
        for engine_id in release.pending:
            sequence = self._sequences.get(engine_id)
            request = requests.get(engine_id)
            if sequence is None or request is None or "abort" in (request.ending, request.finish_reason):
                continue
            if sequence.detokenizer.finished:
                continue  # sampled after its stop, while the stop was not yet known
            if self._show_token(sequence, result):
                self.state.finish_request(engine_id, "finished", result.finish_time)
                self._finish_if_done(sequence)

    def _show_token(self, sequence: _Sequence, result: UnitResult) -> bool:
        """Detokenize the sequence's token of `result` into its delta output; True when it ended the sequence
        (stop token, stop string, max_tokens)."""
        logprobs = result.logprobs.get(sequence.engine_id)
        delta = sequence.detokenizer.update((result.new_tokens[sequence.engine_id],),
                                            None if logprobs is None else (logprobs,))
        self._record(sequence, delta)
        sequence.request.metrics.record_token(result.finish_time)
        return sequence.detokenizer.finished

    def _finish_if_done(self, sequence: _Sequence) -> None:
        """Once the state has finished a sequence (stop, length, abort, rejection), close its records."""
        state = self.state.requests.get(sequence.engine_id)
        if state is None or state.status != FINISHED:
            return
        if not sequence.detokenizer.finished:  # aborted or rejected: the detokenizer did not end it
            self._record(sequence, sequence.detokenizer.abort("rejected" if state.finish_reason == "rejected"
                                                              else "abort"))
        self.state.forget(sequence.engine_id)
        del self._sequences[sequence.engine_id]
        record = sequence.request
        if record.finished and self._requests.get(record.prepared.request_id) is record:
            del self._requests[record.prepared.request_id]
            record.metrics.record_finished(self.clock())

    def _record(self, sequence: _Sequence, delta: CompletionOutput) -> None:
        record = sequence.request
        _, deltas = self._deltas.setdefault(record.prepared.request_id, (record, {}))
        earlier = deltas.get(sequence.index)
        deltas[sequence.index] = delta if earlier is None else earlier.merged(delta)

    # -- introspection --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Engine counters: elastic moves (state), batches per degree of parallelism, units run (executor),
        program cache statistics."""
        return {**self.state.counters, "prefill_batches_by_degree": dict(sorted(self.core.dops.prefill.items())),
                "decode_batches_by_degree": dict(sorted(self.core.dops.decode.items())), **self.executor.stats(),
                **self.step_timer.as_dict()}

    def snapshot(self) -> EngineSnapshot:
        """The state at this instant as immutable values (metrics, server info, admission limits); safe to
        call from another thread while this one steps (see `loong_jax.engine.snapshot`)."""
        dops = self.core.dops
        return capture_snapshot(self.state, self.clock, policy=self.policy, prefill_dops=dops.prefill,
                                decode_dops=dops.decode, executor_stats=self.executor.stats(),
                                token_limits=self.token_limits())

    def check_all_free(self) -> None:
        """Every page of every instance is free (nothing running): what tests assert after a workload."""
        self.state.allocator.assert_all_free()
