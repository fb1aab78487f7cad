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
  - leval-docs, lveval-docs: shared documents (`make_document_workload`), several questions per long
    document as in L-Eval and LV-Eval: a document's length is drawn from the base dataset's input length,
    each of its `questions_per_document` questions adds lognormal(median 40, σ 0.6) tokens and has the base
    dataset's output length. A request carries its document id and length, so the simulator gives its
    prompt block hashes that equal documents share (`engine.prefix_cache.document_hashes`). Arrivals:
    "close" (a document's questions arrive in a burst, exponential gaps of mean 0.05 s at unit rate) or
    "spread" (each question arrives on its own in the unit-rate Poisson stream, its document drawn at random).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from loong_jax.engine.prefix_cache import document_hashes

DOCUMENT_WORKLOADS = ("leval-docs", "lveval-docs")
WORKLOADS = ("sharegpt", "leval", "lveval", "mixed", "zipf") + DOCUMENT_WORKLOADS
DOCUMENT_ARRIVALS = ("close", "spread")
ZIPF_MIN_TOKENS, ZIPF_MAX_TOKENS = 10, 200_000


@dataclass(frozen=True)
class RequestSpec:
    request_id: int
    arrival_time: float  # seconds from the start of the run
    input_len: int
    output_len: int  # tokens generated, the first one by the prefill
    document: int | None = None  # the shared document the prompt starts with (None: none)
    document_len: int = 0  # its tokens (a prefix of input_len)


@dataclass(frozen=True)
class Workload:
    name: str
    input_lens: np.ndarray  # [requests] int64
    output_lens: np.ndarray  # [requests] int64
    unit_arrivals: np.ndarray  # [requests] float64, arrival times at a mean rate of 1 request/s, ascending
    native_rate: float | None = None  # a trace's own mean rate (requests/s); None for synthetic workloads
    documents: np.ndarray | None = None  # [requests] int64 document id (-1: none), shared-document workloads
    document_lens: np.ndarray | None = None  # [requests] int64 tokens of that document

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
            RequestSpec(index, float(arrivals[index]), int(self.input_lens[index]), int(self.output_lens[index]),
                        *self._document_of(index))
            for index in range(len(self))
        ]

    def _document_of(self, index: int) -> tuple[int | None, int]:
        if self.documents is None or self.documents[index] < 0:
            return None, 0
        return int(self.documents[index]), int(self.document_lens[index])


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


def make_workload(name: str, num_requests: int, seed: int = 0, zipf_alpha: float = 1.0,
                  questions_per_document: int = 4, document_arrivals: str = "close") -> Workload:
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    if name in DOCUMENT_WORKLOADS:
        return make_document_workload(name.removesuffix("-docs"), num_requests, seed, questions_per_document,
                                      document_arrivals)
    length_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    inputs, outputs = sample_lengths(name, num_requests, length_rng, zipf_alpha)
    label = f"zipf{zipf_alpha:g}" if name == "zipf" else name
    return Workload(label, inputs, outputs, poisson_unit_arrivals(arrival_rng, num_requests))


def make_document_workload(base: str, num_requests: int, seed: int = 0, questions_per_document: int = 4,
                           arrivals: str = "close") -> Workload:
    """Several questions per shared document (see the module docstring); `base`: leval or lveval."""
    if questions_per_document < 1:
        raise ValueError(f"questions_per_document must be >= 1, got {questions_per_document}")
    if arrivals not in DOCUMENT_ARRIVALS:
        raise ValueError(f"document arrivals must be one of {', '.join(DOCUMENT_ARRIVALS)}, got {arrivals!r}")
    length_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    num_documents = -(-num_requests // questions_per_document)
    document_lens, _ = sample_lengths(base, num_documents, length_rng)
    _, outputs = sample_lengths(base, num_requests, length_rng)
    question_lens = _lognormal_ints(length_rng, 40, 0.6, num_requests)
    documents = np.repeat(np.arange(num_documents, dtype=np.int64), questions_per_document)[:num_requests]
    if arrivals == "close":  # documents at rate 1/q, each followed by a burst of its questions
        starts = np.cumsum(arrival_rng.exponential(questions_per_document, size=num_documents))
        times = starts[documents] + np.concatenate(
            [np.cumsum(arrival_rng.exponential(0.05, size=questions_per_document))] * num_documents)[:num_requests]
    else:  # every question on its own in the Poisson stream, its document at random
        documents = arrival_rng.permutation(documents)
        times = poisson_unit_arrivals(arrival_rng, num_requests)
    order = np.argsort(times, kind="stable")
    documents = documents[order]
    lens = document_lens[documents]
    label = f"{base}-docs{questions_per_document}-{arrivals}"
    return Workload(label, lens + question_lens, outputs, times[order], documents=documents, document_lens=lens)


class DocumentHashes:
    """Block hashes of each request's shared document, made once per document (requests share the tuple)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._by_document: dict[int, tuple] = {}

    def of(self, spec: RequestSpec) -> tuple | None:
        if spec.document is None:
            return None
        hashes = self._by_document.get(spec.document)
        if hashes is None:
            hashes = self._by_document[spec.document] = document_hashes(spec.document, spec.document_len,
                                                                         self.page_size)
        return hashes


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
