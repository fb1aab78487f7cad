"""Cost model: how long a prefill, a decode step or a migration takes on a group of d instances.

The scheduler reasons about time only through this file, and the simulator advances its virtual clock
with it, so one object serves both (no JAX here).

Data flow:
  1. A profile is a list of samples measured on real programs (or derived from hardware ceilings, see
     `roofline.py`): `PrefillSample(dop, lengths, seconds)`, `DecodeSample(dop, batch, total_context,
     seconds)`, `MigrationSample(num_bytes, seconds)`.
  2. `fit_cost_model(samples, ...)` (`fit.py`) fits, for every degree of parallelism d present in the profile,
       prefill(d, l_1..l_n)      = A_d + B_d·Σl + C_d·Σl²
       decode(d, batch, context) = a_d + b_d·batch + c_d·Σcontext
       migration(bytes)          = latency + seconds_per_byte·bytes
     by weighted least squares on RELATIVE error (weights 1/measured², i.e. every row divided by its
     measurement), with coefficients kept non-negative (exact: the best non-negative subset) and, from the
     second degree on, at least d'/d times those of the next smaller degree d' (`_floor_of`): a group of d
     is never faster than d instances' worth of work (`prefill_efficiency` ≤ 1 for every batch). A profile of
     one instance has no migration samples (nothing to move between): its model has no migration term
     (`has_migration` is False, saved as null) and serves one instance only (`check_instances`).
  3. The fitted `CostModel` (one tensor-parallel size `tp`, plus the KV geometry: bytes per token, pages
     per instance, page size) is saved to / loaded from JSON with a schema version; a file may hold
     several `tp` sections (`save_cost_models` / `CostModel.load_json(path, tp=...)`).
  4. Consumers call `check_instances(n)` once (a model without migration refuses n > 1), then
     `prefill_time(d, lengths)`, `decode_time(d, batch, total_context)`, `migration_time(n_tokens)`;
     `mean_relative_error(samples)` reports fit quality, `prefill_efficiency(d, lengths)` the width
     efficiency. `source` names the file a model was loaded from. What one request costs (isolated latency,
     least instance-seconds) is derived in `request_cost.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SCHEMA_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "cost_models"
DEFAULT_COST_MODEL_PATH = SHIPPED_DIR / "h200_llama2_7b.json"


# ---------------------------------------------------------------------------------------------------------------
# Profile samples (what a profiler measures).
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillSample:
    dop: int
    lengths: tuple[int, ...]  # prompt lengths packed into the one prefill batch
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    dop: int
    batch: int  # requests in the decode step
    total_context: int  # Σ context lengths (tokens of KV read) over the batch
    seconds: float


@dataclass(frozen=True)
class MigrationSample:
    num_bytes: int
    seconds: float


ProfileSample = PrefillSample | DecodeSample | MigrationSample


def sample_to_dict(sample: ProfileSample) -> dict:
    kind = {PrefillSample: "prefill", DecodeSample: "decode", MigrationSample: "migration"}[type(sample)]
    row = asdict(sample)
    if kind == "prefill":
        row["lengths"] = list(sample.lengths)
    return {"kind": kind, **row}


def sample_from_dict(row: dict) -> ProfileSample:
    kind = row["kind"]
    if kind == "prefill":
        return PrefillSample(int(row["dop"]), tuple(int(x) for x in row["lengths"]), float(row["seconds"]))
    if kind == "decode":
        return DecodeSample(int(row["dop"]), int(row["batch"]), int(row["total_context"]), float(row["seconds"]))
    if kind == "migration":
        return MigrationSample(int(row["num_bytes"]), float(row["seconds"]))
    raise ValueError(f"unknown profile sample kind {kind!r} (expected prefill, decode or migration)")


# ---------------------------------------------------------------------------------------------------------------
# Coefficients and the model.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillCoefficients:
    constant: float  # A_d, seconds
    per_token: float  # B_d, seconds per prompt token
    per_token_squared: float  # C_d, seconds per (prompt token)² (causal attention)

    def time(self, sum_lengths: float, sum_squares: float) -> float:
        return self.constant + self.per_token * sum_lengths + self.per_token_squared * sum_squares


@dataclass(frozen=True)
class DecodeCoefficients:
    constant: float  # a_d, seconds per step
    per_request: float  # b_d, seconds per request in the batch
    per_context_token: float  # c_d, seconds per token of KV read

    def time(self, batch: float, total_context: float) -> float:
        return self.constant + self.per_request * batch + self.per_context_token * total_context


@dataclass(frozen=True)
class CostModel:
    """Step times for one tensor-parallel size `tp`, per degree of parallelism d (number of instances)."""

    tp: int
    prefill: dict[int, PrefillCoefficients]
    decode: dict[int, DecodeCoefficients]
    migration_seconds_per_byte: float | None  # None: profiled on one instance, no migration term
    migration_latency_s: float
    kv_bytes_per_token: int  # bytes of K and V of one token, all layers, one instance
    pages_per_instance: int  # KV pool size of one instance
    page_size: int  # token slots per page
    description: str = ""
    provenance: str = "measured"  # "measured" (profiled) or "projected" (derived from hardware ceilings)
    metadata: dict = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)  # the file it was loaded from ("" = built in memory)

    # -- queries ------------------------------------------------------------------------------------------------
    @property
    def dops(self) -> tuple[int, ...]:
        """Degrees of parallelism with both a prefill and a decode entry, ascending."""
        return tuple(sorted(set(self.prefill) & set(self.decode)))

    @property
    def has_migration(self) -> bool:
        return self.migration_seconds_per_byte is not None

    def check_instances(self, num_instances: int) -> None:
        """ValueError unless the model can price every step on `num_instances` instances: one without a
        migration term (profiled on one instance) cannot price moving KV between two."""
        if num_instances > 1 and not self.has_migration:
            where = f" ({self.source})" if self.source else ""
            raise ValueError(f"the cost model{where} has no migration term (it was profiled on one instance), so "
                             f"it cannot serve {num_instances} instances; profile on at least two instances")

    @property
    def tokens_per_instance(self) -> int:
        return self.pages_per_instance * self.page_size

    def prefill_time(self, dop: int, lengths: Sequence[int]) -> float:
        """Seconds for one prefill batch of prompts `lengths` packed on a group of `dop` instances."""
        lengths_array = np.asarray(lengths, dtype=np.float64)
        return self._prefill_entry(dop).time(float(lengths_array.sum()), float(np.square(lengths_array).sum()))

    def prefill_time_from_sums(self, dop: int, sum_lengths: float, sum_squares: float) -> float:
        """Same as `prefill_time` from Σl and Σl² (what an incremental batcher keeps)."""
        return self._prefill_entry(dop).time(sum_lengths, sum_squares)

    def prefill_efficiency(self, dop: int, lengths: Sequence[int]) -> float:
        """Speed-up over the smallest degree divided by the width ratio: T_min(lengths)·min / (T_d(lengths)·d).
        At most 1 for a fitted model: widening a group never makes the same work cheaper in instance-time."""
        smallest = min(self.prefill)
        return self.prefill_time(smallest, lengths) * smallest / (self.prefill_time(dop, lengths) * dop)

    def decode_time(self, dop: int, batch: int, total_context: int) -> float:
        """Seconds for one decode step of `batch` requests reading `total_context` KV tokens on `dop` instances."""
        return self.decode_coefficients(dop).time(batch, total_context)

    def migration_time_bytes(self, num_bytes: float) -> float:
        if num_bytes <= 0:
            return 0.0
        if not self.has_migration:
            raise ValueError("the cost model has no migration term (profiled on one instance): "
                             "it cannot price a migration")
        return self.migration_latency_s + self.migration_seconds_per_byte * num_bytes

    def migration_time(self, n_tokens: int) -> float:
        """Seconds to move the KV of `n_tokens` tokens from one instance to another."""
        return self.migration_time_bytes(n_tokens * self.kv_bytes_per_token)

    def _prefill_entry(self, dop: int) -> PrefillCoefficients:
        try:
            return self.prefill[dop]
        except KeyError:
            raise ValueError(f"cost model (tp={self.tp}) has no prefill entry for DoP {dop}; has {sorted(self.prefill)}") from None

    def decode_coefficients(self, dop: int) -> DecodeCoefficients:
        """The decode step's coefficients at `dop` (a clear error when the model has none)."""
        try:
            return self.decode[dop]
        except KeyError:
            raise ValueError(f"cost model (tp={self.tp}) has no decode entry for DoP {dop}; has {sorted(self.decode)}") from None

    # -- fit quality --------------------------------------------------------------------------------------------
    def predict(self, sample: ProfileSample) -> float:
        if isinstance(sample, PrefillSample):
            return self.prefill_time(sample.dop, sample.lengths)
        if isinstance(sample, DecodeSample):
            return self.decode_time(sample.dop, sample.batch, sample.total_context)
        return self.migration_time_bytes(sample.num_bytes)

    def mean_relative_error(self, samples: Iterable[ProfileSample]) -> float:
        """Mean of |predicted − measured| / measured over the samples."""
        errors = [abs(self.predict(s) - s.seconds) / s.seconds for s in samples]
        if not errors:
            raise ValueError("mean_relative_error needs at least one sample")
        return float(np.mean(errors))

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "description": self.description,
            "provenance": self.provenance,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "pages_per_instance": self.pages_per_instance,
            "page_size": self.page_size,
            "migration_seconds_per_byte": self.migration_seconds_per_byte,
            "migration_latency_s": self.migration_latency_s,
            "prefill": {str(d): asdict(c) for d, c in sorted(self.prefill.items())},
            "decode": {str(d): asdict(c) for d, c in sorted(self.decode.items())},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, section: dict) -> "CostModel":
        return cls(
            tp=int(section["tp"]),
            prefill={int(d): PrefillCoefficients(**c) for d, c in section["prefill"].items()},
            decode={int(d): DecodeCoefficients(**c) for d, c in section["decode"].items()},
            migration_seconds_per_byte=_optional_float(section["migration_seconds_per_byte"]),
            migration_latency_s=float(section["migration_latency_s"]),
            kv_bytes_per_token=int(section["kv_bytes_per_token"]),
            pages_per_instance=int(section["pages_per_instance"]),
            page_size=int(section["page_size"]),
            description=section.get("description", ""),
            provenance=section.get("provenance", "measured"),
            metadata=dict(section.get("metadata", {})),
        )

    def save_json(self, path: str | Path, **header) -> None:
        save_cost_models(path, [self], **header)

    @classmethod
    def load_json(cls, path: str | Path | None = None, tp: int | None = None) -> "CostModel":
        """Load the section for `tp` of a cost-model file (default: the shipped H200 file).

        Without `tp`: the only section of the file, or else the tp=1 section.
        """
        path = Path(path) if path is not None else DEFAULT_COST_MODEL_PATH
        sections = load_cost_models(path)
        if tp is None:
            if len(sections) == 1:
                return next(iter(sections.values()))
            if 1 not in sections:
                raise ValueError(f"{path} holds tp sections {sorted(sections)}; pass tp=")
            tp = 1
        if tp not in sections:
            raise ValueError(f"{path} has no section for tp={tp}; it has {sorted(sections)}")
        return sections[tp]


def save_cost_models(path: str | Path, models: Sequence[CostModel], **header) -> None:
    """Write one JSON file holding one section per tp (extra keyword arguments go in the file header)."""
    tps = [m.tp for m in models]
    if len(set(tps)) != len(tps):
        raise ValueError(f"duplicate tp sections {tps}")
    document = {"schema_version": SCHEMA_VERSION, **header, "sections": [m.to_dict() for m in models]}
    Path(path).write_text(json.dumps(document, indent=1) + "\n")


def load_cost_models(path: str | Path) -> dict[int, CostModel]:
    document = json.loads(Path(path).read_text())
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: cost-model schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    models = (CostModel.from_dict(section) for section in document["sections"])
    return {m.tp: replace(m, source=str(path)) for m in models}


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
