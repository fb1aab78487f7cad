"""Serving metrics of one benchmark run, from the client's own clock.

Data flow:
  1. The runner fills one `RequestResult` per request: when it was sent, when each streamed chunk of tokens
     arrived (`chunks`: (seconds, tokens in the chunk)), when the stream finished, or the error.
  2. `compute_metrics(results, duration, ...)` reduces them to one flat dict whose keys are those of vLLM's
     serving benchmark where the metric is the same (`request_throughput`, `output_throughput`,
     `total_token_throughput`, `mean_ttft_ms`, `median_ttft_ms`, `p99_ttft_ms`, `mean_tpot_ms`,
     `mean_itl_ms`, `mean_e2el_ms`, `request_goodput`, ...), plus LoongServe's normalised latencies and SLO
     attainment.

Definitions (per completed request; means and percentiles are over requests, ITL over token gaps):
  - TTFT  = first chunk − send;  E2EL = last chunk − send;
  - TPOT  = (E2EL − TTFT) / (output tokens − 1), requests with more than one output token;
  - ITL   = gap between consecutive chunks; a chunk carrying k tokens contributes k gaps of gap / k (so the
            mean ITL and the mean TPOT describe the same decode speed when the server batches tokens);
  - normalised latency, input latency and output latency: exactly the simulator's definitions
    (`loong_jax.simulator.metrics.summarize`: E2EL / output tokens, TTFT / input tokens, TPOT), so a bench
    run and a simulation of the same workload are compared like for like;
  - goodput (`--goodput ttft:MS tpot:MS e2el:MS`): completed requests meeting every given bound per second of
    the run; SLO attainment: their fraction of ALL requests (a failed request misses its SLO);
  - LoongServe SLO attainment (with a cost model): E2EL <= slo_scale × the request's isolated latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from loong_jax.scheduler.cost.model import CostModel
from loong_jax.simulator.metrics import DEFAULT_SLO_SCALE, RequestRecord, isolated_latencies, summarize
from loong_jax.simulator.workloads import RequestSpec

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    input_len: int
    send_time: float  # seconds on the run's clock
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival seconds, tokens in the chunk)
    finish_time: float | None = None
    error: str | None = None  # None: the stream completed
    finish_reason: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and self.finish_time is not None and self.output_tokens > 0

    @property
    def output_tokens(self) -> int:
        return sum(count for _, count in self.chunks)

    @property
    def first_token_time(self) -> float | None:
        timed = [t for t, count in self.chunks if count > 0]
        return timed[0] if timed else None

    @property
    def last_token_time(self) -> float | None:
        timed = [t for t, count in self.chunks if count > 0]
        return timed[-1] if timed else None

    def record(self, index: int) -> RequestRecord:
        """The simulator's record of this request (a failed one counts as rejected)."""
        if not self.success:
            return RequestRecord(index, self.send_time, self.input_len, max(1, self.output_tokens), rejected=True)
        return RequestRecord(index, self.send_time, self.input_len, self.output_tokens,
                             first_token_time=self.first_token_time, finish_time=self.last_token_time)

    def inter_token_latencies(self) -> list[float]:
        gaps: list[float] = []
        timed = [(t, count) for t, count in self.chunks if count > 0]
        for (previous, _), (now, count) in zip(timed, timed[1:]):
            gaps.extend([(now - previous) / count] * count)
        return gaps


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = str(item).partition(":")
        name = name.strip().lower()
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput bound {item!r} must be NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}")
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"goodput bound {item!r}: {value!r} is not a number of milliseconds") from None
        if not bound > 0 or math.isinf(bound):
            raise ValueError(f"goodput bound {item!r} must be a positive number of milliseconds")
        slos[name] = bound
    return slos


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A completed request within every bound given (TPOT is vacuous for a single output token)."""
    if record.rejected or not record.finished:
        return False
    observed = {"ttft": record.ttft, "e2el": record.e2e_latency, "tpot": record.tpot}
    return all(observed[name] is None or observed[name] * 1000.0 <= bound for name, bound in slos_ms.items())


def _distribution(prefix: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    """mean/median/std/p{P} in milliseconds (None when there are no values)."""
    values = np.asarray(values_s, dtype=np.float64) * 1000.0
    present = len(values) > 0
    stats = {f"mean_{prefix}_ms": float(values.mean()) if present else None,
             f"median_{prefix}_ms": float(np.median(values)) if present else None,
             f"std_{prefix}_ms": float(values.std()) if present else None}
    for percentile in percentiles:
        label = f"{percentile:g}".replace(".", "_")
        stats[f"p{label}_{prefix}_ms"] = float(np.percentile(values, percentile)) if present else None
    return stats


def _nan_to_none(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def compute_metrics(results: Sequence[RequestResult], duration: float, *, request_rate: float = math.inf,
                    goodput_ms: dict[str, float] | None = None,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES, cost_model: CostModel | None = None,
                    max_dop: int = 1, slo_scale: float = DEFAULT_SLO_SCALE) -> dict:
    if not results:
        raise ValueError("no request results to summarise")
    if not duration > 0:
        raise ValueError(f"run duration must be positive, got {duration}")
    records = [result.record(index) for index, result in enumerate(results)]
    done = [(result, record) for result, record in zip(results, records) if not record.rejected]
    total_input = sum(result.input_len for result, _ in done)
    total_output = sum(result.output_tokens for result, _ in done)
    metrics: dict = {
        "duration": float(duration),
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": int(total_input),
        "total_output_tokens": int(total_output),
        "request_throughput": len(done) / duration,
        "input_throughput": total_input / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    metrics.update(_distribution("ttft", [r.ttft for _, r in done], percentiles))
    metrics.update(_distribution("tpot", [r.tpot for _, r in done if r.tpot is not None], percentiles))
    metrics.update(_distribution("itl", [gap for res, _ in done for gap in res.inter_token_latencies()],
                                 percentiles))
    metrics.update(_distribution("e2el", [r.e2e_latency for _, r in done], percentiles))

    # LoongServe's normalised latencies, by the simulator's own definitions.
    specs = [RequestSpec(i, r.arrival_time, r.input_len, r.output_len) for i, r in enumerate(records)]
    isolated = (isolated_latencies(specs, cost_model, max_dop) if cost_model is not None
                else np.full(len(records), np.nan))
    simulated = summarize(records, isolated, request_rate if math.isfinite(request_rate) else 0.0, slo_scale)
    metrics["mean_normalized_latency_s"] = _nan_to_none(simulated.mean_normalized_latency)
    metrics["p90_normalized_latency_s"] = _nan_to_none(simulated.p90_normalized_latency)
    metrics["mean_normalized_input_latency_s"] = _nan_to_none(simulated.mean_normalized_input_latency)
    metrics["mean_normalized_output_latency_s"] = _nan_to_none(simulated.mean_output_latency)
    if cost_model is not None:
        metrics["loongserve_slo_scale"] = slo_scale
        metrics["loongserve_slo_attainment"] = _nan_to_none(simulated.slo_attainment)

    if goodput_ms:
        good = sum(meets_slos(record, goodput_ms) for record in records)
        metrics["goodput_slos_ms"] = dict(goodput_ms)
        metrics["request_goodput"] = good / duration
        metrics["slo_attainment"] = good / len(records)
    errors = [result.error for result in results if result.error]
    metrics["errors"] = sorted(set(errors))[:10]
    return metrics
