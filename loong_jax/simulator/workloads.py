"""Synthetic workloads and trace files for the simulator: request lengths plus Poisson (or traced) arrivals.

Data flow:
  1. `make_workload(name, num_requests, seed)` draws input and output lengths (seeded numpy) from the
     distribution of the named dataset and unit-rate Poisson arrival offsets (exponential gaps of mean 1 s);
     `load_trace(path)` reads (arrival, input_len, output_len) rows from CSV or JSONL instead.
  2. `workload.requests(rate)` scales the arrival offsets to `rate` requests per second (traces: to the
     requested mean rate; `rate=None` keeps the traced times). Lengths and the gap pattern stay the same at
     every rate (common random numbers), so SLO attainment changes with the load, not with the draw.

Length distributions (synthetic stand-ins; plug the real datasets in through a trace file):
  - sharegpt: chat. Input lognormal(median 100, σ 1.1), output lognormal(median 250, σ 0.8), mean ≈ 180
    in / 340 out as reported for ShareGPT; rejection-sampled to a total of 4–2,300 tokens.
  - leval: long-document QA and summarisation (L-Eval). Input lognormal(median 12K, σ 0.9), output
    lognormal(median 150, σ 0.8) capped at 1,024; total 2.7K–210.5K tokens.
  - lveval: LV-Eval's five length levels 16K/32K/64K/128K/256K with equal weight, each jittered by
    lognormal(0, 0.25); short answers, output lognormal(median 40, σ 0.7) capped at 256; total 15.1K–497.3K.
  - mixed: equal numbers of sharegpt, leval and lveval requests, shuffled.
  - zipf: total length k in [10, 200K] with P(k) ∝ k^(−α) (α = `zipf_alpha`, default 1.0); output
    lognormal(median 128, σ 0.8) capped at a quarter of the total; input = total − output.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

WORKLOADS = ("sharegpt", "leval", "lveval", "mixed", "zipf")
ZIPF_MIN_TOKENS, ZIPF_MAX_TOKENS = 10, 200_000


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    arrival_time: float  # seconds from the start of the run
    input_len: int
    output_len: int  # tokens generated, the first one by the prefill


@dataclass(frozen=True)
class Workload:
    name: str
    input_lens: np.ndarray  # [requests] int64
    output_lens: np.ndarray  # [requests] int64
    unit_arrivals: np.ndarray  # [requests] float64, arrival times at a mean rate of 1 request/s, ascending
    native_rate: float | None = None  # a trace's own mean rate (requests/s); None for synthetic workloads

    def __len__(self) -> int:
        return len(self.input_lens)

    def requests(self, rate: float | None) -> list[RequestSpec]:
        """Requests arriving at mean `rate` requests/s (None: a trace's own timing)."""
        if rate is None:
            if self.native_rate is None:
                raise ValueError(f"workload {self.name!r} has no native timing: give a request rate")
            rate = self.native_rate
        if rate <= 0:
            raise ValueError(f"request rate must be positive, got {rate}")
        arrivals = self.unit_arrivals / rate
        return [
            RequestSpec(index, float(arrivals[index]), int(self.input_lens[index]), int(self.output_lens[index]))
            for index in range(len(self))
        ]


# ---------------------------------------------------------------------------------------------------------------
# Length samplers: each returns (input_lens, output_lens) of `count` requests.
# ---------------------------------------------------------------------------------------------------------------
def _lognormal_ints(rng: np.random.Generator, median: float, sigma: float, count: int) -> np.ndarray:
    return np.maximum(1, np.rint(rng.lognormal(np.log(median), sigma, size=count))).astype(np.int64)


def _rejection(
    draw: Callable[[int], tuple[np.ndarray, np.ndarray]], count: int, total_range: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw batches until `count` requests have input+output inside `total_range` (inclusive)."""
    low, high = total_range
    inputs, outputs, have = [], [], 0
    while have < count:
        batch_in, batch_out = draw(max(2 * (count - have), 16))
        total = batch_in + batch_out
        keep = (total >= low) & (total <= high)
        inputs.append(batch_in[keep])
        outputs.append(batch_out[keep])
        have += int(keep.sum())
    return np.concatenate(inputs)[:count], np.concatenate(outputs)[:count]


def sharegpt_lengths(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    def draw(n: int):
        return np.maximum(2, _lognormal_ints(rng, 100, 1.1, n)), np.maximum(2, _lognormal_ints(rng, 250, 0.8, n))

    return _rejection(draw, count, (4, 2_300))


def leval_lengths(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    def draw(n: int):
        return _lognormal_ints(rng, 12_000, 0.9, n), np.minimum(1_024, _lognormal_ints(rng, 150, 0.8, n))

    return _rejection(draw, count, (2_700, 210_500))


def lveval_lengths(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    levels = np.array([16, 32, 64, 128, 256]) * 1024

    def draw(n: int):
        level = levels[rng.integers(0, len(levels), size=n)]
        inputs = np.rint(level * rng.lognormal(0.0, 0.25, size=n)).astype(np.int64)
        return inputs, np.minimum(256, _lognormal_ints(rng, 40, 0.7, n))

    return _rejection(draw, count, (15_100, 497_300))


def zipf_lengths(rng: np.random.Generator, count: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"zipf alpha must be positive, got {alpha}")
    support = np.arange(ZIPF_MIN_TOKENS, ZIPF_MAX_TOKENS + 1, dtype=np.float64)
    cumulative = np.cumsum(support**-alpha)
    cumulative /= cumulative[-1]
    totals = (ZIPF_MIN_TOKENS + np.searchsorted(cumulative, rng.random(count), side="right")).astype(np.int64)
    totals = np.minimum(totals, ZIPF_MAX_TOKENS)
    outputs = np.clip(_lognormal_ints(rng, 128, 0.8, count), 1, np.maximum(1, totals // 4))
    return totals - outputs, outputs


def mixed_lengths(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    shares = [count // 3 + (1 if i < count % 3 else 0) for i in range(3)]
    parts = [sampler(rng, share) for sampler, share in zip((sharegpt_lengths, leval_lengths, lveval_lengths), shares)]
    inputs = np.concatenate([p[0] for p in parts])
    outputs = np.concatenate([p[1] for p in parts])
    order = rng.permutation(count)
    return inputs[order], outputs[order]


def sample_lengths(name: str, count: int, rng: np.random.Generator, zipf_alpha: float = 1.0):
    if name == "sharegpt":
        return sharegpt_lengths(rng, count)
    if name == "leval":
        return leval_lengths(rng, count)
    if name == "lveval":
        return lveval_lengths(rng, count)
    if name == "mixed":
        return mixed_lengths(rng, count)
    if name == "zipf":
        return zipf_lengths(rng, count, zipf_alpha)
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")


def poisson_unit_arrivals(rng: np.random.Generator, count: int) -> np.ndarray:
    """Arrival times of a Poisson process of rate 1/s: cumulative exponential gaps."""
    return np.cumsum(rng.exponential(1.0, size=count))


def make_workload(name: str, num_requests: int, seed: int = 0, zipf_alpha: float = 1.0) -> Workload:
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    length_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    inputs, outputs = sample_lengths(name, num_requests, length_rng, zipf_alpha)
    label = f"zipf{zipf_alpha:g}" if name == "zipf" else name
    return Workload(label, inputs, outputs, poisson_unit_arrivals(arrival_rng, num_requests))


# ---------------------------------------------------------------------------------------------------------------
# Trace files.
# ---------------------------------------------------------------------------------------------------------------
_ARRIVAL_KEYS = ("arrival", "arrival_time", "timestamp")


def load_trace(path: str | Path, num_requests: int | None = None) -> Workload:
    """Read a trace of (arrival seconds, input_len, output_len): CSV with a header, or JSONL objects.

    Column / key names: `arrival` (or `arrival_time`, `timestamp`), `input_len`, `output_len`. Rows are sorted by
    arrival and times shifted so the first request arrives at 0; `num_requests` keeps the first n.
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise ValueError(f"{path}: trace is empty")
    arrivals, inputs, outputs = [], [], []
    for line_number, row in enumerate(rows, start=1):
        arrival_key = next((k for k in _ARRIVAL_KEYS if k in row), None)
        if arrival_key is None or "input_len" not in row or "output_len" not in row:
            raise ValueError(f"{path}: row {line_number} needs arrival, input_len and output_len; got {sorted(row)}")
        arrival, input_len, output_len = float(row[arrival_key]), int(row["input_len"]), int(row["output_len"])
        if arrival < 0 or input_len < 1 or output_len < 1:
            raise ValueError(f"{path}: row {line_number} has arrival < 0 or a length < 1: {row}")
        arrivals.append(arrival)
        inputs.append(input_len)
        outputs.append(output_len)
    order = np.argsort(np.asarray(arrivals), kind="stable")
    if num_requests is not None:
        order = order[:num_requests]
    arrival_times = np.asarray(arrivals, dtype=np.float64)[order]
    arrival_times -= arrival_times[0]
    span = float(arrival_times[-1])
    native_rate = (len(order) - 1) / span if span > 0 else float(len(order))
    return Workload(
        name=path.stem,
        input_lens=np.asarray(inputs, dtype=np.int64)[order],
        output_lens=np.asarray(outputs, dtype=np.int64)[order],
        unit_arrivals=arrival_times * native_rate,
        native_rate=native_rate,
    )
