"""`loong-jax profile`: time the engine's real programs on the current devices and fit the cost model.

Data flow:
  1. `ProfileBench(executor)` drives the engine's own `EngineCore` over the engine's own `JaxExecutor` (weights
     on every instance, KV pools, program cache: `engine_config.build_executor` makes it as `LLM` does) with a bare
     `EngineState` and synthetic requests (random prompt ids, greedy sampling), so the programs timed are
     exactly the ones the engine runs, with the inputs the engine gives them.
  2. A measurement is a one-unit `Plan` on the aligned group (0..d-1) of d instances:
       prefill   a `PrefillBatch` of n prompts of total length Σl, each prompt kept in d equal runs (one per
                 member, the last run on a different member for each prompt);
       decode    a `DecodeBatch` of b requests of total context Σc, whose KV untimed prefills (one per
                 request) spread over the group that way, each mastered by the member holding its last run;
       migration a `MigrationBatch` moving one request's KV from instance 0 to 1, then back.
  3. Points are measured in blocks (`grid_blocks`: one per degree, one of migrations): each point of a block
     is set up and run untimed (its program compiles; a migration once per direction), then `repetitions`
     rounds run every point of the block once, so load from other processes falls on the whole block alike
     (its per-degree fit sees it as a common factor). A run is timed from `core.dispatch(plan, rows)` until
     `core.wait()` returns the sampled tokens on the host (the program has finished): host input
     preparation, dispatch and device time, which is what one engine step pays. The sample is the median.
  4. `fit_profile` fits `fit_cost_model` to the samples and `fit_report` gives the mean relative error per
     kind and overall, with the worst samples (`profile_cli` prints it and writes the files). One instance
     gives no migration samples: the model is fitted without a migration term.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from loong_jax.engine.core import EngineCore
from loong_jax.engine.state import EngineState
from loong_jax.executor.jax_executor import JaxExecutor
from loong_jax.sampling.batch import SamplingRow
from loong_jax.sampling.params import SamplingParams
from loong_jax.scheduler.cost.fit import fit_cost_model
from loong_jax.scheduler.cost.model import CostModel, DecodeSample, MigrationSample, PrefillSample, ProfileSample
from loong_jax.scheduler.groups import power_of_two_sizes
from loong_jax.scheduler.plan import DecodeBatch, Migration, Plan, PrefillBatch, Segment

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


@dataclasses.dataclass(frozen=True)
class ProfileGrid:
    """The points measured for every degree d (all combinations that fit the KV pools)."""

    prefill_totals: tuple[int, ...]  # Σl of one prefill batch
    prefill_prompts: tuple[int, ...]  # prompts packed into it
    decode_batches: tuple[int, ...]  # requests in one decode step
    decode_contexts: tuple[int, ...]  # Σ context (KV tokens read) of the step
    migration_tokens: tuple[int, ...]  # tokens of KV moved between two instances
    repetitions: int = 5  # timed runs per point (median kept)

    # Totals deliberately off the power-of-two buckets: the engine pads real batches, and so does the profile.
    @classmethod
    def full(cls) -> "ProfileGrid":
        return cls(prefill_totals=(40, 120, 300, 600, 1200), prefill_prompts=(1, 4),
                   decode_batches=(1, 8, 32), decode_contexts=(150, 600, 2000),
                   migration_tokens=(40, 300, 1000, 2000), repetitions=5)

    def scaled(self, factor: int) -> "ProfileGrid":
        """Token counts (prefill totals, decode contexts, migrations) times `factor`: a GPU holding a 7B
        model wants prompts of tens of thousands of tokens, where the CPU demo wants hundreds."""
        if factor < 1:
            raise ValueError(f"the grid's scale must be >= 1, got {factor}")
        return dataclasses.replace(self, prefill_totals=tuple(factor * n for n in self.prefill_totals),
                                   decode_contexts=tuple(factor * n for n in self.decode_contexts),
                                   migration_tokens=tuple(factor * n for n in self.migration_tokens))

    @classmethod
    def quick(cls) -> "ProfileGrid":
        return cls(prefill_totals=(20, 60, 120), prefill_prompts=(1, 2), decode_batches=(1, 4),
                   decode_contexts=(40, 160), migration_tokens=(16, 64), repetitions=2)


@dataclasses.dataclass(frozen=True)
class MeasurementPoint:
    kind: str  # "prefill", "decode" or "migration"
    dop: int
    lengths: tuple[int, ...]  # prompt lengths (prefill, decode set-up) or (tokens moved,)

    def __str__(self) -> str:
        return f"{self.kind} d={self.dop} n={len(self.lengths)} tokens={sum(self.lengths)}"


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` positive integers differing by at most one (longest first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def spread_placement(length: int, group: Sequence[int], last_member: int) -> tuple[Segment, ...]:
    """A prompt kept in len(group) contiguous runs, one per member, the last on group[last_member]."""
    d = len(group)
    order = [group[(last_member + 1 + k) % d] for k in range(d)]
    runs = split_evenly(length, d)[::-1]  # shorter runs first: the master's run is the longest
    return tuple((instance, n) for instance, n in zip(order, runs) if n > 0)


def degrees_for(num_instances: int, wanted: Sequence[int] | None = None) -> tuple[int, ...]:
    """Aligned degrees (powers of two up to the instance count), or the wanted subset of them."""
    available = power_of_two_sizes(num_instances)
    if wanted is None:
        return available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"degrees {unknown} are not aligned degrees of {num_instances} instances {available}")
    return tuple(sorted(set(wanted)))


def member_pages(lengths: Sequence[int], d: int, page_size: int, appends: int = 0) -> np.ndarray:
    """[d] pages each member holds for prompts spread over d members (`spread_placement`), each prompt then
    growing by `appends` tokens on its master."""
    pages = np.zeros(d, dtype=np.int64)
    for index, length in enumerate(lengths):
        for member, run in spread_placement(length, tuple(range(d)), index % d):
            pages[member] += -(-(run + (appends if member == index % d else 0)) // page_size)
    return pages


def grid_blocks(grid: ProfileGrid, degrees: Sequence[int], num_instances: int, pages_per_instance: int,
                page_size: int) -> list[list[MeasurementPoint]]:
    """The points measured together (`ProfileBench.measure_block`): one block per degree (its prefill points,
    then the decode points whose KV fits beside the others' and the largest prefill), then one block of
    migrations between instances 0 and 1 (when there are two). Points whose KV does not fit are left out."""
    blocks = []
    for d in degrees:
        block, largest_prefill = [], np.zeros(d, dtype=np.int64)
        for total, prompts in itertools.product(grid.prefill_totals, grid.prefill_prompts):
            lengths = tuple(split_evenly(total, prompts))
            pages = member_pages(lengths, d, page_size)
            if prompts <= total and pages.max() <= pages_per_instance:
                block.append(MeasurementPoint("prefill", d, lengths))
                largest_prefill = np.maximum(largest_prefill, pages)
        held = largest_prefill
        for total, batch in itertools.product(grid.decode_contexts, grid.decode_batches):
            lengths = tuple(split_evenly(total, batch))
            pages = member_pages(lengths, d, page_size, appends=grid.repetitions + 2)
            if 2 * batch <= total and (held + pages).max() <= pages_per_instance:
                block.append(MeasurementPoint("decode", d, lengths))
                held = held + pages
        if block:
            blocks.append(block)
    if num_instances >= 2:
        migrations, held = [], 0
        for tokens in grid.migration_tokens:
            pages = -(-tokens // page_size)
            if held + pages <= pages_per_instance:
                migrations.append(MeasurementPoint("migration", 2, (tokens,)))
                held += pages
        if migrations:
            blocks.append(migrations)
    return blocks


class SyntheticRequests:
    """Random prompt ids per request, sampled greedily: what the profiled units feed and sample."""

    def __init__(self, state: EngineState, vocab_size: int, seed: int):
        self._state = state
        self._vocab_size = vocab_size
        self._rng = np.random.default_rng(seed)
        self._prompts: dict[int, list[int]] = {}

    def add(self, request_id: int, length: int) -> None:
        self._prompts[request_id] = self._rng.integers(0, self._vocab_size, size=length).tolist()

    def drop(self, request_id: int) -> None:
        del self._prompts[request_id]

    def sampling_rows(self, plan: Plan) -> dict[int, SamplingRow]:
        return {request_id: SamplingRow(GREEDY, self._prompts[request_id], self._state.requests[request_id].generated)
                for unit in plan.work_units() for request_id in unit.all_request_ids}

@dataclasses.dataclass
class _Trial:
    """One point being measured: the requests it holds between runs and its timed runs so far."""

    point: MeasurementPoint
    ids: list[int] = dataclasses.field(default_factory=list)
    total_context: int = 0  # decode: KV tokens read by the first timed step
    direction: tuple[int, int] = (0, 1)  # migration: (source, destination) of the next run
    times: list[float] = dataclasses.field(default_factory=list)


class ProfileBench:
    """Times one-unit plans on the executor (see the module docstring)."""

    def __init__(self, executor: JaxExecutor, repetitions: int, seed: int = 0):
        if repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {repetitions}")
        self.executor = executor
        self.repetitions = repetitions
        self.state = EngineState(executor.num_instances, executor.pool_shape.pages, executor.page_size)
        self.requests = SyntheticRequests(self.state, executor.config.vocab_size, seed)
        self.core = EngineCore(self.state, None, None, executor, compile_aware=False,  # plans come from here
                               async_scheduling=False)  # each unit is timed to its end
        self._ids = itertools.count()

    @property
    def kv_bytes_per_token(self) -> int:
        pool = self.executor.pool_shape
        return pool.layers * 2 * pool.kv_heads * pool.head_dim * np.dtype(pool.dtype).itemsize

    def measure_block(self, points: Sequence[MeasurementPoint],
                      on_run: Callable[[MeasurementPoint], None] | None = None) -> list[ProfileSample]:
        """Points measured together: each is set up and run once untimed (its program compiles), then
        `repetitions` rounds time every point once, so that a burst of load on a shared machine falls on all
        of them alike rather than on one. `on_run` is told of every run (a progress bar's hook)."""
        trials: list[_Trial] = []
        try:
            for point in points:
                trials.append(self._prepare(point))
                if on_run is not None:
                    on_run(point)
            for _ in range(self.repetitions):
                for trial in trials:
                    trial.times.append(self._run_once(trial))
                    if on_run is not None:
                        on_run(trial.point)
        finally:
            for trial in trials:
                self._release(trial.ids)
        return [self._sample(trial) for trial in trials]

    # -- the three kinds of measurement ------------------------------------------------------------------------
    def _prepare(self, point: MeasurementPoint) -> _Trial:
        group, trial = tuple(range(point.dop)), _Trial(point)
        if point.kind == "prefill":
            self._run_once(trial)  # compiles
        elif point.kind == "decode":
            trial.ids = self._add(point.lengths, max_new_tokens=self.repetitions + 2)
            for index, (request_id, length) in enumerate(zip(trial.ids, point.lengths)):  # KV over the group
                self._run(self._prefill_plan(group, [request_id], [length], first_master=index))
            self._run_once(trial)  # compiles
            trial.total_context = sum(self.state.requests[i].context_len for i in trial.ids)
        elif point.kind == "migration":
            trial.ids = self._add(point.lengths, max_new_tokens=2)
            self._run(self._prefill_plan((0,), trial.ids, point.lengths))
            self._run_once(trial)  # compiles 0 -> 1
            self._run_once(trial)  # compiles 1 -> 0
        else:
            raise ValueError(f"unknown measurement kind {point.kind!r}")
        return trial

    def _run_once(self, trial: _Trial) -> float:
        point, group = trial.point, tuple(range(trial.point.dop))
        if point.kind == "prefill":
            ids = self._add(point.lengths, max_new_tokens=1)
            seconds = self._run(self._prefill_plan(group, ids, point.lengths))
            self._release(ids)
            return seconds
        if point.kind == "decode":
            masters = tuple(group[index % len(group)] for index in range(len(trial.ids)))
            return self._run(Plan(decodes=(DecodeBatch(group, tuple(trial.ids), masters),)))
        source, destination = trial.direction
        trial.direction = (destination, source)
        (request_id,), (tokens,) = trial.ids, point.lengths
        return self._run(Plan(migrations=(Migration(request_id, source, destination, tokens),)))

    def _sample(self, trial: _Trial) -> ProfileSample:
        point, seconds = trial.point, statistics.median(trial.times)
        if point.kind == "prefill":
            return PrefillSample(point.dop, point.lengths, seconds)
        if point.kind == "decode":
            return DecodeSample(point.dop, len(point.lengths), trial.total_context, seconds)
        return MigrationSample(point.lengths[0] * self.kv_bytes_per_token, seconds)

    # -- helpers ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _prefill_plan(group: tuple[int, ...], ids: Sequence[int], lengths: Sequence[int],
                      first_master: int = 0) -> Plan:
        placement = tuple(spread_placement(n, group, (first_master + index) % len(group))
                          for index, n in enumerate(lengths))
        return Plan(prefills=(PrefillBatch(group, tuple(ids), tuple((0, n) for n in lengths), placement),))

    def _add(self, lengths: Sequence[int], max_new_tokens: int) -> list[int]:
        ids = []
        for length in lengths:
            request_id = next(self._ids)
            self.state.add_request(request_id, length, max_new_tokens)
            self.requests.add(request_id, length)
            ids.append(request_id)
        return ids

    def _release(self, ids: Sequence[int]) -> None:
        for request_id in ids:
            self.state.abort(request_id)
            self.state.forget(request_id)
            self.requests.drop(request_id)

    def _run(self, plan: Plan) -> float:
        """Seconds from dispatching the plan's one unit until its result is on the host."""
        rows = self.requests.sampling_rows(plan)
        self.executor.programs.wait_background()  # a compile the executor started must not share the timing
        start = time.perf_counter()
        self.core.dispatch(plan, rows)
        (result,) = self.core.wait()
        seconds = time.perf_counter() - start
        self.core.apply(result)
        return seconds


def run_profile(bench: ProfileBench, blocks: Sequence[Sequence[MeasurementPoint]],
                on_run: Callable[[MeasurementPoint], None] | None = None) -> list[ProfileSample]:
    """Measure the blocks one after the other (`grid_blocks`); samples in block order."""
    return [sample for block in blocks for sample in bench.measure_block(block, on_run)]


def fit_profile(samples: Sequence[ProfileSample], bench: ProfileBench, tp: int, description: str,
                metadata: dict) -> CostModel:
    """The cost model of the samples, with the bench's KV geometry and the fit error in its metadata."""
    model = fit_cost_model(samples, tp=tp, kv_bytes_per_token=bench.kv_bytes_per_token,
                           pages_per_instance=bench.executor.pool_shape.pages, page_size=bench.executor.page_size,
                           description=description, provenance="measured")
    report = fit_report(model, samples)
    return dataclasses.replace(model, metadata={**metadata, "fit": report.as_dict()})


@dataclasses.dataclass(frozen=True)
class FitReport:
    mean_relative_error: dict[str, float]  # per kind ("prefill", "decode", "migration") and "overall"
    samples: dict[str, int]
    worst: list[tuple[float, ProfileSample, float]]  # (relative error, sample, predicted seconds), worst first

    def as_dict(self) -> dict:
        return {"mean_relative_error": self.mean_relative_error, "samples": self.samples,
                "worst": [{"relative_error": error, "sample": _describe(sample), "measured_s": sample.seconds,
                           "predicted_s": predicted} for error, sample, predicted in self.worst]}

    def lines(self) -> list[str]:
        lines = [f"{kind:>9}: mean relative error {error * 100:5.1f}% over {self.samples[kind]} samples"
                 for kind, error in self.mean_relative_error.items()]
        lines.append("worst samples:")
        lines += [f"  {error * 100:5.1f}%  {_describe(sample)}: measured {sample.seconds * 1e3:.2f} ms, "
                  f"predicted {predicted * 1e3:.2f} ms" for error, sample, predicted in self.worst]
        return lines


def fit_report(model: CostModel, samples: Sequence[ProfileSample], worst: int = 5) -> FitReport:
    by_kind: dict[str, list[ProfileSample]] = {}
    for sample in samples:
        by_kind.setdefault(_kind(sample), []).append(sample)
    errors = {kind: model.mean_relative_error(rows) for kind, rows in by_kind.items()}
    errors["overall"] = model.mean_relative_error(samples)
    counts = {kind: len(rows) for kind, rows in by_kind.items()} | {"overall": len(samples)}
    scored = sorted(((abs(model.predict(s) - s.seconds) / s.seconds, s, model.predict(s)) for s in samples),
                    key=lambda row: -row[0])
    return FitReport(errors, counts, scored[:worst])


def _kind(sample: ProfileSample) -> str:
    return {PrefillSample: "prefill", DecodeSample: "decode", MigrationSample: "migration"}[type(sample)]


def _describe(sample: ProfileSample) -> str:
    if isinstance(sample, PrefillSample):
        return f"prefill d={sample.dop} prompts={len(sample.lengths)} Σl={sum(sample.lengths)}"
    if isinstance(sample, DecodeSample):
        return f"decode d={sample.dop} batch={sample.batch} Σcontext={sample.total_context}"
    return f"migration bytes={sample.num_bytes}"
