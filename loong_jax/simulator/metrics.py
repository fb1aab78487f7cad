"""Latency metrics of one simulated run, and the SLO that defines "max throughput under SLO".

Data flow:
  1. The simulation loop fills one `RequestRecord` per request: arrival, first-token time (when the prefill
     that emits its first token finishes), finish time, lengths; or `rejected` if it could never fit.
  2. `isolated_latencies` gives each request's latency when served alone on the idle cluster with the best
     DoP for each phase (cost model; `cost.request_cost.isolated_latency`).
  3. `SloSpec` says which requests meet their SLO, in one of two forms: end-to-end latency ≤ `scale` (25) ×
     the isolated latency (default), or LoongServe's per-token form, thresholds on the request's average
     input latency (TTFT / input tokens) and average output latency (TPOT), set per workload.
     `SloSpec.deadline` is the latest finish that can still meet it (the simulator gives up on that basis).
  4. `summarize(records, ...)` reduces the records of one request rate to `RateMetrics`.

Definitions (LoongServe §7, following vLLM and DistServe); every mean is over requests:
  - normalised per-token latency = end-to-end latency / output tokens           (seconds per token)
  - normalised input latency     = time to first token / input tokens           (seconds per token)
  - output latency (TPOT)        = (finish − first token) / (output tokens − 1) (seconds per token; only
                                   requests with more than one output token)
  - SLO attainment               = fraction of requests meeting their `SloSpec`: by default end-to-end
                                   latency ≤ slo_scale × isolated latency (equivalently: normalised latency
                                   ≤ slo_scale × its isolated value); in the per-token form, TTFT / input
                                   tokens ≤ input threshold and TPOT ≤ output threshold (TPOT only with more
                                   than one output token). Rejected or unfinished requests miss their SLO.
  - goodput                      = requests meeting their SLO per second of the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from loong_jax.scheduler.cost.model import CostModel
from loong_jax.scheduler.cost.request_cost import isolated_latency
from loong_jax.simulator.workloads import RequestSpec

DEFAULT_SLO_SCALE = 25.0
DEFAULT_ATTAINMENT_TARGET = 0.90


@dataclass
class RequestRecord:
    request_id: int
    arrival_time: float
    input_len: int
    output_len: int
    first_token_time: float | None = None
    finish_time: float | None = None
    rejected: bool = False
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_time is not None

    @property
    def e2e_latency(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.output_len <= 1:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_len - 1)


@dataclass(frozen=True)
class RateMetrics:
    request_rate: float
    num_requests: int
    finished: int
    rejected: int
    mean_normalized_latency: float  # s / output token
    mean_normalized_input_latency: float  # s / input token
    mean_output_latency: float  # s / output token after the first (TPOT)
    p90_normalized_latency: float
    slo_attainment: float
    goodput: float  # requests meeting their SLO per second
    makespan: float  # seconds from the first arrival to the last finish
    preemptions: int

    @property
    def throughput(self) -> float:
        """Finished requests per second of the run."""
        return self.finished / self.makespan if self.makespan > 0 else math.nan

    def to_dict(self) -> dict:
        """JSON-safe: NaN becomes None, an infinite rate (every request at t=0) becomes "burst"."""
        row = {**asdict(self), "throughput": self.throughput}
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                row[key] = None
            elif isinstance(value, float) and math.isinf(value):
                row[key] = "burst"
        return row


@dataclass(frozen=True)
class SloSpec:
    """A request's service-level objective: `scale` × its isolated latency end to end, or, when both per-token
    thresholds are given, LoongServe's form (seconds per input token to the first token, seconds per output
    token after it)."""

    scale: float = DEFAULT_SLO_SCALE
    input_s_per_token: float | None = None
    output_s_per_token: float | None = None

    def __post_init__(self):
        if (self.input_s_per_token is None) != (self.output_s_per_token is None):
            raise ValueError("the per-token SLO needs both an input and an output threshold")
        thresholds = [v for v in (self.scale, self.input_s_per_token, self.output_s_per_token) if v is not None]
        if any(not v > 0 for v in thresholds):
            raise ValueError(f"SLO scale and thresholds must be positive, got {self}")

    @property
    def per_token(self) -> bool:
        return self.input_s_per_token is not None

    @property
    def label(self) -> str:
        if self.per_token:
            return (f"per-token: input <= {1e3 * self.input_s_per_token:g} ms/token, "
                    f"output <= {1e3 * self.output_s_per_token:g} ms/token")
        return f"{self.scale:g}x isolated latency"

    def deadline(self, arrival: float, input_len: int, output_len: int, isolated: float) -> float:
        """Latest finish time at which the request can still meet its SLO."""
        if self.per_token:
            return arrival + self.input_s_per_token * input_len + self.output_s_per_token * max(0, output_len - 1)
        return arrival + self.scale * isolated

    def meets(self, record: "RequestRecord", isolated: float) -> bool:
        if not record.finished or record.rejected:
            return False
        if not self.per_token:
            return record.e2e_latency <= self.scale * isolated
        tpot = record.tpot
        return (record.ttft <= self.input_s_per_token * record.input_len
                and (tpot is None or tpot <= self.output_s_per_token))

    def to_dict(self) -> dict:
        return asdict(self)


def isolated_latencies(requests: Sequence[RequestSpec], cost_model: CostModel, max_dop: int) -> np.ndarray:
    """[requests] seconds to serve each request alone with the best DoP (prefill and decode chosen separately)."""
    cache: dict[tuple[int, int], float] = {}
    latencies = np.empty(len(requests))
    for index, request in enumerate(requests):
        key = (request.input_len, request.output_len)
        if key not in cache:
            cache[key] = isolated_latency(cost_model, request.input_len, request.output_len, max_dop)
        latencies[index] = cache[key]
    return latencies


def slo_met(records: Sequence[RequestRecord], isolated: np.ndarray, slo_scale: float = DEFAULT_SLO_SCALE,
            slo: SloSpec | None = None) -> np.ndarray:
    """[requests] bool: met its SLO (`slo`, or by default finished within slo_scale × isolated latency)."""
    slo = slo or SloSpec(slo_scale)
    return np.array([slo.meets(record, isolated[index]) for index, record in enumerate(records)], dtype=bool)


def summarize(
    records: Sequence[RequestRecord],
    isolated: np.ndarray,
    request_rate: float,
    slo_scale: float = DEFAULT_SLO_SCALE,
    slo: SloSpec | None = None,
) -> RateMetrics:
    done = [r for r in records if r.finished and not r.rejected]
    normalized = np.array([r.e2e_latency / r.output_len for r in done])
    normalized_input = np.array([r.ttft / r.input_len for r in done])
    tpots = np.array([t for t in (r.tpot for r in done) if t is not None])
    met = slo_met(records, isolated, slo_scale, slo)
    start = min(r.arrival_time for r in records)
    end = max((r.finish_time for r in done), default=start)
    makespan = end - start
    return RateMetrics(
        request_rate=float(request_rate),
        num_requests=len(records),
        finished=len(done),
        rejected=sum(r.rejected for r in records),
        mean_normalized_latency=_mean(normalized),
        mean_normalized_input_latency=_mean(normalized_input),
        mean_output_latency=_mean(tpots),
        p90_normalized_latency=float(np.percentile(normalized, 90)) if len(normalized) else math.nan,
        slo_attainment=float(met.mean()) if len(met) else math.nan,
        goodput=float(met.sum() / makespan) if makespan > 0 else math.nan,
        makespan=float(makespan),
        preemptions=sum(r.preemptions for r in records),
    )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan
